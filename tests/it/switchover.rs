//! Replacing the Go worker in the live system, against the real broker and database: its rows are
//! adopted, not inserted again (also where the server's time zone moved their days); the README's
//! duplicate check finds nothing; a fresh broker gives a clean first start and a readiness that
//! means every topic is assigned; `KAFKA_START_FROM` places a new group.

use crate::common;

use common::{booking_json, cancel_json, http_get, metric_sum, parse_prometheus, unique, wait_for, Setup, WAIT};
use std::time::Duration;

/// The duplicate check of the README's "Replacing the Go worker" section, as written there.
fn readme_duplicate_check() -> String {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Replacing the Go worker")
        .nth(1)
        .expect("the README has a section \"Replacing the Go worker\"");
    let sql = section
        .split("```sql\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a SQL check");
    sql.to_string()
}

/// A booking event whose dates are timestamps near midnight, in a time zone of its own.
fn event_dates(n: usize) -> (String, String) {
    let offsets = [
        "-11:00", "-05:00", "-03:30", "+00:00", "+05:45", "+09:00", "+12:00", "Z",
    ];
    let times = ["23:30:00", "00:15:00", "22:45:00", "01:59:59", "12:00:00"];
    let day = 1 + n % 27;
    let offset = offsets[n % offsets.len()];
    let time = times[(n / offsets.len()) % times.len()];
    (
        format!("2025-03-{day:02}T{time}{offset}"),
        format!("2025-04-{day:02}T{time}{offset}"),
    )
}

/// What the Go worker did with a booking event: its columns, no external id, status Accepted,
/// the event's timestamps bound to the DATE columns (so the server's TimeZone picked the day),
/// and client-side creation times.
fn go_worker_insert(s: &Setup, user: i32, room: i32, guests: i32, payment: &str, start: &str, end: &str) {
    let now = chrono::Utc::now().naive_utc();
    s.db.conn()
        .execute(
            "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status,
                                   created_at, updated_at)
             VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz, $6, 'Accepted', $7, $7)",
            &[&user, &room, &guests, &start, &end, &payment, &now],
        )
        .expect("the Go worker's insert");
}

/// A booking event as the test publishes it: booking id, room, start and end.
type Event = (String, String, String, String);

/// The payment id and dates of the twin: one legacy row that two events match.
const TWIN: (&str, &str, &str) = ("pay_twin", "2025-06-01T23:00:00-04:00", "2025-06-03T10:00:00-04:00");

/// The Go worker's rows for 500 bookings spread over five rooms, and one more (the twin); returns
/// the 500 events behind them.
fn write_as_the_go_worker(s: &Setup) -> Vec<Event> {
    let owner = s.db.user("owner@example.com", "owner");
    let rooms: Vec<(String, i32)> = (0..5)
        .map(|i| {
            let name = format!("room_{i}");
            let id = s.db.room(&name);
            (name, id)
        })
        .collect();
    let mut events = Vec::new();
    for n in 0..500 {
        let id = format!("booking_1736950000_{n:04}");
        let (start, end) = event_dates(n);
        let (room, room_id) = &rooms[n % rooms.len()];
        go_worker_insert(s, owner, *room_id, 2, &format!("pay_{id}"), &start, &end);
        events.push((id, room.clone(), start, end));
    }
    let (payment, start, end) = TWIN;
    go_worker_insert(s, owner, rooms[0].1, 3, payment, start, end);
    let legacy_rows: i64 = s.db.value("SELECT count(*) FROM bookings WHERE external_id IS NULL");
    assert_eq!(legacy_rows, 501);
    events
}

/// The server's time zone moved the day of many of the Go worker's rows away from the day written.
fn assert_days_moved(s: &Setup, events: &[Event]) {
    let stored: std::collections::HashMap<String, String> =
        s.db.rows("SELECT payment_id::text, start_date::text FROM bookings")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let shifted = events
        .iter()
        .filter(|(id, _, start, _)| stored[&format!("pay_{id}")] != start[..10])
        .count();
    assert!(shifted > 100, "only {shifted} of 500 days moved");
}

/// The same events, two that match the twin, and cancellations of every fifth by its booking id.
fn publish_the_events_again(s: &Setup, events: &[Event]) {
    for (id, room, start, end) in events {
        let payload = booking_json(id, "owner", room, 2, start, end);
        s.producer.send(&s.bookings, id, payload.as_bytes(), &[]);
    }
    let (payment, start, end) = TWIN;
    for id in ["twin_a", "twin_b"] {
        let payload = booking_json(id, "owner", "room_0", 3, start, end).replace(&format!("pay_{id}"), payment);
        s.producer.send(&s.bookings, id, payload.as_bytes(), &[]);
    }
    for (id, ..) in events.iter().step_by(5) {
        s.producer
            .send(&s.cancels, id, cancel_json(id, "owner").as_bytes(), &[]);
    }
    s.producer.flush();
}

#[test]
fn the_switch_over_from_the_go_worker_duplicates_no_booking() {
    let Some(s) = Setup::new("switch") else { return };
    s.db.exec(&format!("ALTER DATABASE \"{}\" SET timezone = 'Asia/Tokyo'", s.db.name));
    let events = write_as_the_go_worker(&s);
    assert_days_moved(&s, &events);
    publish_the_events_again(&s, &events);

    let worker = s.start("switch");
    wait_for("every booking to carry its external id", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM bookings WHERE external_id IS NOT NULL") == 502
    });
    wait_for("100 cancellations", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM bookings WHERE status = 'Cancelled'") == 100
    });
    let rows = s.db.bookings();
    assert_eq!(rows.len(), 502, "500 adopted, one twin adopted and one inserted");
    let adopted = worker.json_lines().iter().filter(|l| l["end"] == "adopted").count();
    let created = worker.json_lines().iter().filter(|l| l["end"] == "created").count();
    assert_eq!((adopted, created), (501, 1));
    let twins = rows.iter().filter(|b| b.payment_id.as_deref() == Some(TWIN.0)).count();
    assert_eq!(twins, 2);
    for (id, ..) in events.iter().step_by(5) {
        assert_eq!(
            s.db.booking(id).map(|b| b.status),
            Some("Cancelled".to_string()),
            "{id}"
        );
    }
    assert!(s.db.dead_letters().is_empty(), "{:?}", s.db.dead_letters());
    assert!(s.db.parked().is_empty());

    // The README's check finds no booking twice.
    let duplicates = s.db.rows(&readme_duplicate_check());
    assert!(duplicates.is_empty(), "{} duplicates", duplicates.len());
    assert_eq!(worker.terminate(WAIT), 0);

    // A replay from offset 0 with a new group changes nothing.
    let before = s.db.snapshot();
    let replay = s.start_with("switch-replay", &[("KAFKA_GROUP_ID", &unique("switch-replay"))]);
    wait_for("the replay to reach every record", WAIT, || {
        replay.json_lines().iter().filter(|l| l.get("end").is_some()).count() == 602
    });
    assert_eq!(replay.terminate(WAIT), 0);
    assert_eq!(s.db.snapshot(), before, "a replay changed the database");
}

#[test]
fn without_adoption_the_go_workers_rows_are_inserted_again() {
    // The check the README gives does find duplicates when they exist.
    let Some(s) = Setup::new("noadopt") else { return };
    let owner = s.db.user("owner@example.com", "owner");
    let room = s.db.room("room_0");
    go_worker_insert(
        &s,
        owner,
        room,
        2,
        "pay_legacy",
        "2025-03-01T23:30:00-05:00",
        "2025-03-03T10:00:00-05:00",
    );
    let payload = booking_json(
        "legacy",
        "owner",
        "room_0",
        2,
        "2025-03-01T23:30:00-05:00",
        "2025-03-03T10:00:00-05:00",
    );
    s.producer.send(&s.bookings, "legacy", payload.as_bytes(), &[]);
    s.producer.flush();
    let worker = s.start_with("noadopt", &[("ADOPT_LEGACY_ROWS", "false")]);
    s.wait_rows(2);
    assert_eq!(s.db.rows(&readme_duplicate_check()).len(), 1);
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_first_start_on_a_fresh_broker_is_clean_and_ready_only_with_both_topics() {
    let Some(s) = Setup::new("fresh") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    assert!(!common::topic_exists(&s.services, &s.bookings) && !common::topic_exists(&s.services, &s.cancels));
    // The fail point holds the worker for 3 s once its topics exist, just before it subscribes,
    // so that the window in which it must not be ready is seen whatever the machine's speed.
    let worker = s.start_with("fresh", &[("FAILPOINTS", "subscribe=sleep(3000)")]);
    let assigned_of = |topic: &str| {
        worker
            .json_lines()
            .iter()
            .filter(|l| l["msg"] == "partition assigned" && l["topic"] == topic)
            .count()
    };
    let mut unassigned_503 = false;
    wait_for("/readyz 200", WAIT, || {
        match http_get(&worker.metrics_addr, "/readyz") {
            Some((200, _)) => true,
            Some((503, body)) => {
                unassigned_503 |= body.contains("holds no assignment yet");
                false
            }
            _ => false,
        }
    });
    assert!(unassigned_503, "not ready, and saying why, before the assignment");
    let (bookings, cancels) = (assigned_of(&s.bookings), assigned_of(&s.cancels));
    assert!(
        bookings > 0 && cancels > 0,
        "ready with {bookings} + {cancels} partitions"
    );

    s.book("fresh_1", "owner", "room_1");
    s.cancel("fresh_1", "owner");
    s.producer.flush();
    s.wait_status("fresh_1", "Cancelled");
    assert_eq!(
        (assigned_of(&s.bookings), assigned_of(&s.cancels)),
        (bookings, cancels),
        "a second rebalance assigned partitions again"
    );
    let errors: Vec<_> = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "a first start logged errors: {errors:?}");
    let (_, body) = http_get(&worker.metrics_addr, "/metrics").unwrap();
    let samples = parse_prometheus(&body);
    let count = metric_sum(&samples, "booking_worker_end_to_end_seconds_count", &[]);
    let sum = metric_sum(&samples, "booking_worker_end_to_end_seconds_sum", &[]);
    assert_eq!(count, 2.0);
    eprintln!(
        "end-to-end latency of the first booking and cancellation: {:.1} ms on average",
        sum / count * 1000.0
    );
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_topic_that_never_appears_stops_the_start_with_exit_5() {
    let Some(s) = Setup::new("notopic") else { return };
    let worker = s.start_with(
        "notopic",
        &[
            ("KAFKA_ALLOW_AUTO_CREATE_TOPICS", "false"),
            ("KAFKA_TOPIC_WAIT_SECS", "3"),
        ],
    );
    let mut worker = worker;
    assert_eq!(worker.wait(WAIT), 5);
    assert!(worker.logged("have no partitions with a leader"));
}

#[test]
fn a_new_group_starts_where_kafka_start_from_says() {
    let Some(s) = Setup::new("startfrom") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    for i in 0..5 {
        s.book(&format!("old_{i}"), "owner", "room_1");
    }
    s.cancel("old_0", "owner");
    s.producer.flush();
    std::thread::sleep(Duration::from_millis(1500));
    let from = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        s.book(&format!("new_{i}"), "owner", "room_1");
    }
    s.producer.flush();

    let at_time = s.start_with(
        "startfrom-time",
        &[
            ("KAFKA_GROUP_ID", &unique("from-time")),
            ("KAFKA_START_FROM", &from.to_rfc3339()),
        ],
    );
    s.wait_rows(5);
    wait_for("the cancellation partitions to be placed", WAIT, || {
        at_time.logged("no committed offset; starting from KAFKA_START_FROM")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(s
        .db
        .bookings()
        .iter()
        .all(|b| b.external_id.as_deref().unwrap().starts_with("new_")));
    assert!(s.db.parked().is_empty(), "the old cancellation was read");
    assert_eq!(at_time.terminate(WAIT), 0);

    let latest = s.start_with(
        "startfrom-latest",
        &[
            ("KAFKA_GROUP_ID", &unique("from-latest")),
            ("KAFKA_START_FROM", "latest"),
        ],
    );
    wait_for("/readyz 200", WAIT, || {
        http_get(&latest.metrics_addr, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    std::thread::sleep(Duration::from_secs(3));
    s.book("latest_1", "owner", "room_1");
    s.producer.flush();
    s.wait_rows(6);
    std::thread::sleep(Duration::from_secs(1));
    let ends = latest.json_lines().iter().filter(|l| l.get("end").is_some()).count();
    assert_eq!(ends, 1, "only the record produced after the start was read");
    assert_eq!(latest.terminate(WAIT), 0);
}
