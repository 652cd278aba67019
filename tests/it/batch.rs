//! The batch function on booking-management's schema, called as the writers call it: the rules of
//! one batch (duplicates, unknown users and rooms, cancellations in order, parking, dead letters
//! that stay so) decided in one statement, with no broker in between to pick the batches.

use crate::common::{booking_json, cancel_json, services, TestDb};
use booking_worker::handlers::{self, BatchResult, Rules};
use booking_worker::models::EventKind;
use booking_worker::offsets::TopicPartition;
use booking_worker::pipeline::{End, RecordMeta, Work};
use std::time::Instant;

const RULES: Rules = Rules {
    adopt_legacy_rows: true,
    replaying_dead_letters: false,
};

/// A consumed record at `offset` of partition 0 of the topic of its kind, decoded as a partition
/// thread decodes it.
fn work(kind: EventKind, offset: i64, payload: &str) -> Work {
    let topic = match kind {
        EventKind::Booking => "bookings",
        EventKind::Cancellation => "cancellations",
    };
    let meta = RecordMeta {
        tp: TopicPartition::new(topic, 0),
        offset,
        key: None,
        payload: payload.as_bytes().to_vec(),
        baggage: None,
        received_at: Instant::now(),
        produced_at_ms: None,
    };
    match kind.decode(&meta.payload, 65_536) {
        Ok(event) => Work::Apply { meta, event },
        Err(rejection) => Work::Reject { meta, rejection },
    }
}

fn booking(offset: i64, id: &str, user: &str, room: &str) -> Work {
    let json = booking_json(id, user, room, 2, "2026-03-01", "2026-03-04");
    work(EventKind::Booking, offset, &json)
}

fn cancel(offset: i64, id: &str, user: &str) -> Work {
    work(EventKind::Cancellation, offset, &cancel_json(id, user))
}

/// Each end's name, and the reason of a dead letter after a colon.
fn ends(outcomes: &[End]) -> Vec<String> {
    outcomes
        .iter()
        .map(|end| match end {
            End::DeadLettered(r) => format!("dead_lettered:{}", r.reason.as_str()),
            other => other.as_str().to_string(),
        })
        .collect()
}

/// A database of its own with the users alice and bob and the room room_1.
fn database(tag: &str) -> Option<TestDb> {
    let db = TestDb::create(&services()?, tag);
    db.user("alice@example.com", "alice");
    db.user("bob@example.com", "bob");
    db.room("room_1");
    Some(db)
}

fn apply(db: &TestDb, batch: &[Work]) -> BatchResult {
    handlers::apply_batch(&mut db.conn(), batch, RULES).expect("the batch applies")
}

#[test]
fn one_statement_decides_a_batch_by_the_rules_and_a_replay_changes_nothing() {
    let Some(db) = database("batch") else { return };
    let batch = vec![
        booking(0, "b1", "alice", "room_1"),
        booking(1, "b1", "alice", "room_1"),
        booking(2, "b2", "ghost", "room_1"),
        booking(3, "b3", "alice", "nowhere"),
        cancel(0, "b1", "bob"),
        cancel(1, "b1", "alice"),
        cancel(2, "b1", "alice"),
        cancel(3, "b9", "alice"),
        work(EventKind::Booking, 4, "{not json"),
    ];
    let first = apply(&db, &batch);
    let id = match first.outcomes[0] {
        End::Created { id } => id,
        ref other => panic!("b1 was not created: {other:?}"),
    };
    assert_eq!(
        ends(&first.outcomes),
        [
            "created",
            "duplicate",
            "dead_lettered:unknown_user",
            "dead_lettered:unknown_room",
            "dead_lettered:unauthorized",
            "cancelled",
            "already_cancelled",
            "parked",
            "dead_lettered:malformed_json",
        ]
    );
    assert_eq!(first.outcomes[5], End::Cancelled { id });
    assert_eq!(db.booking("b1").unwrap().status, "Cancelled");
    assert_eq!(db.parked(), ["b9"]);
    let letters = db.dead_letters();
    assert_eq!(letters.len(), 4, "{letters:?}");
    for (id, payload) in [("b2", &batch[2]), ("b3", &batch[3])] {
        let letter = letters.iter().find(|l| l.booking_id.as_deref() == Some(id)).unwrap();
        assert_eq!(letter.payload_len, payload.meta().payload.len() as i64, "{letter:?}");
    }

    // The same records again: nothing changes, and a dead letter stays one.
    let again = apply(&db, &batch);
    assert_eq!(
        ends(&again.outcomes),
        [
            "duplicate",
            "duplicate",
            "already_dead_lettered",
            "already_dead_lettered",
            "already_dead_lettered",
            "already_cancelled",
            "already_cancelled",
            "parked",
            "already_dead_lettered",
        ]
    );
    assert_eq!(db.dead_letters().len(), 4);
    assert_eq!(db.parked(), ["b9"]);
    assert_eq!(db.bookings().len(), 1);
}

#[test]
fn a_new_booking_applies_its_parked_cancellations_before_the_batch_own() {
    let Some(db) = database("release") else { return };
    let parked = apply(&db, &[cancel(0, "b1", "bob"), cancel(1, "b1", "alice")]);
    assert_eq!(ends(&parked.outcomes), ["parked", "parked"]);

    let result = apply(&db, &[booking(0, "b1", "alice", "room_1"), cancel(2, "b1", "alice")]);
    assert_eq!(ends(&result.outcomes), ["created", "already_cancelled"]);
    let released: Vec<(i64, String)> = result
        .released
        .iter()
        .map(|(p, end)| (p.record.kafka_offset, ends(std::slice::from_ref(end))[0].clone()))
        .collect();
    assert_eq!(
        released,
        [
            (0, "dead_lettered:unauthorized".to_string()),
            (1, "cancelled".to_string())
        ]
    );
    assert!(result.more_parked.is_empty());
    assert!(db.parked().is_empty());
    assert_eq!(db.booking("b1").unwrap().status, "Cancelled");
    let letters = db.dead_letters();
    assert_eq!(letters.len(), 1);
    let bob = cancel_json("b1", "bob").len() as i64;
    assert_eq!(
        (letters[0].reason.as_str(), letters[0].payload_len),
        ("unauthorized", bob)
    );
}

/// A session keeps the batch function's plans. Ones made while the tables were small must not read
/// them whole once they have grown, neither by a sequential scan nor along a whole index.
#[test]
fn a_session_that_began_on_small_tables_reads_them_by_index_once_they_have_grown() {
    let Some(db) = database("plans") else { return };
    let tables = ["bookings", "dead_letters", "pending_cancellations"];
    // Statistics of empty tables, as a new database's first analysis leaves them.
    db.exec("VACUUM ANALYZE bookings, booking_worker.dead_letters, booking_worker.pending_cancellations");
    let mut conn = db.conn();
    // More calls than PostgreSQL makes custom plans before it keeps a generic one. Each creates a
    // booking that releases the cancellation the call before parked, parks one, cancels, and
    // dead-letters a malformed record, so that every step runs.
    let batch = |n: i64| {
        let (id, ahead, before) = (format!("small{n}"), format!("ahead{n}"), format!("ahead{}", n - 1));
        vec![
            booking(2 * n, &id, "alice", "room_1"),
            booking(2 * n + 1, &before, "alice", "room_1"),
            cancel(3 * n, &ahead, "alice"),
            cancel(3 * n + 1, &id, "alice"),
            work(EventKind::Cancellation, 3 * n + 2, "{"),
        ]
    };
    let expected = [
        "created",
        "created",
        "parked",
        "cancelled",
        "dead_lettered:malformed_json",
    ];
    for n in 0..8 {
        let result = handlers::apply_batch(&mut conn, &batch(n), RULES).expect("the batch applies");
        assert_eq!(ends(&result.outcomes), expected);
        assert_eq!(result.released.len(), usize::from(n > 0));
    }
    db.exec(
        "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status, \
         external_id, created_at, updated_at) \
         SELECT u.id, r.id, 2, DATE '2026-03-01', DATE '2026-03-04', 'pay' || n, 'Accepted', 'grown' || n, now(), now() \
         FROM generate_series(1, 20000) AS n, users u, rooms r WHERE u.username = 'alice' AND r.internal_id = 'room_1'; \
         INSERT INTO booking_worker.dead_letters (topic, kafka_partition, kafka_offset, payload, reason, error) \
         SELECT 'old', 0, n, '{}', 'malformed', 'old' FROM generate_series(1, 20000) AS n; \
         INSERT INTO booking_worker.pending_cancellations (booking_ref, user_ref, topic, kafka_partition, \
         kafka_offset, payload) \
         SELECT 'later' || n, 'alice', 'old', 0, n, '{}' FROM generate_series(1, 20000) AS n",
    );

    // The server's counters of what this session read that are not yet flushed: their growth
    // within one transaction is what the batch in it read.
    let read = |conn: &mut postgres::Client| -> Vec<(String, i64, i64)> {
        let sql = "SELECT relname::text, seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables \
                   WHERE relname = ANY ($1) ORDER BY relname";
        let rows = conn.query(sql, &[&tables.as_slice()]).unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    conn.batch_execute("BEGIN").unwrap();
    let before = read(&mut conn);
    let result = handlers::apply_batch(&mut conn, &batch(8), RULES).expect("the batch applies");
    let after = read(&mut conn);
    conn.batch_execute("COMMIT").unwrap();
    assert_eq!(ends(&result.outcomes), expected);
    assert_eq!(result.released.len(), 1);
    let scanned: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.1 > b.1 || a.2 - b.2 > 100)
        .map(|(b, a)| format!("{}: {} rows by scan, {} by index", a.0, a.1 - b.1, a.2 - b.2))
        .collect();
    assert!(scanned.is_empty(), "one batch read whole tables: {scanned:?}");
}
