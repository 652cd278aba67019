//! The database boundary against the real PostgreSQL, on booking-management's schema: a changed
//! schema or a revoked grant halts the worker without a dead letter and it resumes by itself;
//! deadlocks and timeouts are retried, also when the server speaks German; a record the database
//! refuses is dead-lettered alone with its SQLSTATE; the circuit breaker; the server's time zone;
//! online migrations; `DB_MIGRATE`; TLS modes; named threads.

use crate::common;

use booking_worker::config::Config;
use booking_worker::database::{ErrorClass, Pool};
use common::{booking_json, http_get, metric_sum, parse_prometheus, wait_for, Setup, TestDb, WAIT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The offsets a group has committed on a topic, summed over its partitions.
fn committed_sum(s: &Setup, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.services.brokers)
        .set("group.id", &s.group)
        .create()
        .expect("offset client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// `/readyz` of a worker: status and body.
fn readyz(worker: &common::WorkerProcess) -> (u16, String) {
    http_get(&worker.metrics_addr, "/readyz").unwrap_or((0, String::new()))
}

fn metric(worker: &common::WorkerProcess, name: &str) -> f64 {
    let (_, body) = http_get(&worker.metrics_addr, "/metrics").expect("metrics");
    metric_sum(&parse_prometheus(&body), name, &[])
}

/// Produces bookings `prefix0..prefix{n}` for `owner` in `room`.
fn book_range(s: &Setup, prefix: &str, range: std::ops::Range<usize>, room: &str) {
    for i in range {
        s.book(&format!("{prefix}{i}"), "owner", room);
    }
    s.producer.flush();
}

/// The worker halts on a systemic error made by `break_it`, with no new dead letter and no
/// committed offset past the applied records; `mend_it` lets it resume by itself, and every
/// record is then applied exactly once. With `role`, the worker logs in as a role of its own with
/// the run-time rights only, named `{role}` in the two statements.
fn halts_and_resumes(tag: &str, sqlstate: &str, role: bool, break_it: &str, mend_it: &str) {
    let Some(s) = Setup::new(tag) else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let mut extra = vec![("RETRY_MAX_BACKOFF_MS".to_string(), "500".to_string())];
    let (mut break_it, mut mend_it) = (break_it.to_string(), mend_it.to_string());
    if role {
        let (user, password) = s.db.worker_role();
        break_it = break_it.replace("{role}", &user);
        mend_it = mend_it.replace("{role}", &user);
        extra.push(("DB_USER".into(), user));
        extra.push(("DB_PASSWORD".into(), password));
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = s.start_with(tag, &extra);
    book_range(&s, "b", 0..10, "room_1");
    s.wait_rows(10);
    wait_for("the first offsets to be committed", WAIT, || {
        committed_sum(&s, &s.bookings) == 10
    });

    s.db.exec(&break_it);
    book_range(&s, "b", 10..50, "room_1");
    wait_for(&format!("/readyz to name {sqlstate}"), WAIT, || {
        let (status, body) = readyz(&worker);
        status == 503 && body.contains(&format!("SQLSTATE {sqlstate}"))
    });
    assert_eq!(metric(&worker, "booking_worker_halted"), 1.0);
    assert!(metric(&worker, "booking_worker_halts_total") >= 1.0);
    std::thread::sleep(Duration::from_secs(3));
    assert!(s.db.dead_letters().is_empty(), "a halt dead-letters nothing");
    assert_eq!(s.db.value::<i64>("SELECT count(*) FROM bookings"), 10);
    assert_eq!(
        committed_sum(&s, &s.bookings),
        10,
        "no offset moves past an unapplied record"
    );
    let errors: Vec<serde_json::Value> = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" && l["sqlstate"] == sqlstate)
        .collect();
    assert!(!errors.is_empty(), "one ERROR line names the SQLSTATE");
    assert!(
        errors[0]["remedy"].as_str().is_some_and(|r| !r.is_empty()),
        "{}",
        errors[0]
    );

    s.db.exec(&mend_it);
    s.wait_rows(50);
    wait_for("/readyz to be 200 again", WAIT, || readyz(&worker).0 == 200);
    assert_eq!(metric(&worker, "booking_worker_halted"), 0.0);
    let rows = s.db.bookings();
    let mut ids: Vec<String> = rows.iter().filter_map(|b| b.external_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (50, 50), "every record applied exactly once");
    assert!(s.db.dead_letters().is_empty());
    wait_for("every offset committed", WAIT, || committed_sum(&s, &s.bookings) == 50);
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_renamed_column_halts_the_worker_until_it_is_renamed_back() {
    halts_and_resumes(
        "halt_rename",
        "42703",
        false,
        "ALTER TABLE bookings RENAME COLUMN payment_id TO payment_ref",
        "ALTER TABLE bookings RENAME COLUMN payment_ref TO payment_id",
    );
}

#[test]
fn a_revoked_grant_halts_the_worker_until_it_is_granted_again() {
    halts_and_resumes(
        "halt_revoke",
        "42501",
        true,
        "REVOKE INSERT ON bookings FROM {role}",
        "GRANT INSERT ON bookings TO {role}",
    );
}

/// A systemic error at start-up (here the role may not read the worker's schema) halts the worker
/// as it would mid-stream: it keeps running, `/readyz` names the SQLSTATE, and once the grant is
/// back it starts by itself and applies what was published meanwhile.
#[test]
fn a_systemic_error_at_start_up_halts_until_it_clears() {
    let Some(s) = Setup::new("halt_start") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let (role, password) = s.db.worker_role();
    s.db.exec(&format!("REVOKE USAGE ON SCHEMA booking_worker FROM {role}"));
    let mut worker = s.start_with(
        "halt_start",
        &[
            ("DB_USER", &role),
            ("DB_PASSWORD", &password),
            ("RETRY_MAX_BACKOFF_MS", "500"),
        ],
    );
    wait_for("/readyz to name 42501", WAIT, || {
        let (status, body) = readyz(&worker);
        status == 503 && body.contains("halted: SQLSTATE 42501")
    });
    assert_eq!(metric(&worker, "booking_worker_halted"), 1.0);
    book_range(&s, "start", 0..5, "room_1");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        worker.is_running(),
        "a systemic error at start-up does not end the process"
    );
    assert!(s.db.bookings().is_empty());
    let errors = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" && l["sqlstate"] == "42501")
        .count();
    assert!(errors >= 1, "one ERROR line names the SQLSTATE");

    s.db.exec(&format!("GRANT USAGE ON SCHEMA booking_worker TO {role}"));
    s.wait_rows(5);
    wait_for("/readyz to be 200", WAIT, || readyz(&worker).0 == 200);
    assert_eq!(metric(&worker, "booking_worker_halted"), 0.0);
    assert!(worker.logged("database ready; migrations up to date"));
    assert_eq!(worker.terminate(WAIT), 0);
}

/// Waits until one of the worker's sessions waits for a lock.
fn wait_until_worker_waits(db: &TestDb) {
    wait_for("the worker to wait for a lock", WAIT, || {
        db.value::<i64>(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'booking-worker' AND datname = current_database()
                AND wait_event_type = 'Lock'",
        ) > 0
    });
}

/// The `error` texts of the worker's retry lines for one SQLSTATE.
fn retries(worker: &common::WorkerProcess, sqlstate: &str) -> Vec<String> {
    worker
        .json_lines()
        .iter()
        .filter(|l| l["msg"] == "database unavailable; retrying the batch")
        .filter_map(|l| l["error"].as_str().map(str::to_string))
        .filter(|e| e.contains(&format!("(SQLSTATE {sqlstate})")))
        .collect()
}

/// Holds a row lock on a room until the returned guard is dropped.
fn lock_room(db: &TestDb, room: i32) -> postgres::Client {
    let mut holder = db.conn();
    holder.batch_execute("BEGIN").unwrap();
    holder
        .execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", &[&room])
        .unwrap();
    holder
}

/// A deadlock, a lock timeout and a statement timeout, each provoked for real by a second session
/// holding locks: each is retried, none is dead-lettered. With `lc_messages` in German the server's
/// texts change and the classes do not.
fn transient_errors_are_retried(tag: &str, lc_messages: Option<&str>) {
    let Some(s) = Setup::new(tag) else { return };
    if let Some(lc) = lc_messages {
        s.db.exec(&format!("ALTER DATABASE \"{}\" SET lc_messages = '{lc}'", s.db.name));
        assert_eq!(s.db.value::<String>("SHOW lc_messages"), lc);
    }
    s.db.user("owner@example.com", "owner");
    let room = s.db.room("room_1");
    let english = ["deadlock detected", "canceling statement due to"];

    // A deadlock: the worker holds the advisory lock of its booking and waits for the room's row;
    // the holder has that row and asks for the advisory lock. The worker's deadlock_timeout (1 s)
    // runs out first, so it is the one PostgreSQL cancels.
    let worker = s.start_with(&format!("{tag}-deadlock"), &[("DB_LOCK_TIMEOUT_MS", "0")]);
    let mut holder = lock_room(&s.db, room);
    holder.batch_execute("SET LOCAL deadlock_timeout = '60s'").unwrap();
    book_range(&s, "dl", 0..1, "room_1");
    wait_until_worker_waits(&s.db);
    holder
        .execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&"dl0"])
        .expect("the worker, not this session, is the deadlock's victim");
    holder.batch_execute("COMMIT").unwrap();
    s.wait_status("dl0", "Accepted");
    let seen = retries(&worker, "40P01");
    assert!(!seen.is_empty(), "the deadlock was retried");
    assert_eq!(worker.terminate(WAIT), 0);

    // A lock timeout, then a statement timeout, while the holder keeps the room's row.
    for (name, settings, sqlstate) in [
        (
            "lock",
            [("DB_LOCK_TIMEOUT_MS", "300"), ("DB_STATEMENT_TIMEOUT_MS", "30000")],
            "55P03",
        ),
        (
            "statement",
            [("DB_LOCK_TIMEOUT_MS", "0"), ("DB_STATEMENT_TIMEOUT_MS", "300")],
            "57014",
        ),
    ] {
        let worker = s.start_with(&format!("{tag}-{name}"), &settings);
        let holder = lock_room(&s.db, room);
        let id = format!("{name}_timeout");
        s.book(&id, "owner", "room_1");
        s.producer.flush();
        wait_for(&format!("a retried {sqlstate}"), WAIT, || {
            !retries(&worker, sqlstate).is_empty()
        });
        drop(holder);
        s.wait_status(&id, "Accepted");
        let texts = retries(&worker, sqlstate);
        if lc_messages.is_some() {
            for text in texts.iter().chain(&seen) {
                assert!(!english.iter().any(|e| text.contains(e)), "not translated: {text}");
            }
        }
        assert_eq!(worker.terminate(WAIT), 0);
    }
    assert!(s.db.dead_letters().is_empty(), "{:?}", s.db.dead_letters());
    assert_eq!(s.db.bookings().len(), 3);
}

#[test]
fn deadlocks_and_timeouts_are_retried_never_dead_lettered() {
    transient_errors_are_retried("transient", None);
}

#[test]
fn deadlocks_and_timeouts_are_retried_when_the_server_speaks_german() {
    transient_errors_are_retried("transient_de", Some("de_DE.UTF-8"));
}

#[test]
fn a_record_the_database_refuses_is_dead_lettered_alone_with_its_sqlstate() {
    let Some(s) = Setup::new("refused") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_keep");
    let gone = s.db.room("room_gone");
    let worker = s.start_with("refused", &[("WRITER_THREADS", "1"), ("BATCH_LINGER_MS", "300")]);

    // A payment id longer than booking-management's VARCHAR(255): 22001.
    s.book("ok_1", "owner", "room_keep");
    let long = booking_json("long_payment", "owner", "room_keep", 2, "2025-01-15", "2025-01-18")
        .replace("pay_long_payment", &"p".repeat(300));
    s.producer.send(&s.bookings, "long_payment", long.as_bytes(), &[]);
    s.book("ok_2", "owner", "room_keep");
    s.producer.flush();
    s.wait_rows(2);
    wait_for("the long payment's dead letter", WAIT, || {
        s.db.dead_letters().len() == 1
    });

    // A room deleted while the batch waits for it: the insert fails with 23503 and nothing of the
    // batch is written. Applied alone, the booking finds no room: a dead letter as unknown_room.
    let mut holder = lock_room(&s.db, gone);
    s.book("ok_3", "owner", "room_keep");
    s.book("room_deleted", "owner", "room_gone");
    s.book("ok_4", "owner", "room_keep");
    s.producer.flush();
    wait_until_worker_waits(&s.db);
    holder.execute("DELETE FROM rooms WHERE id = $1", &[&gone]).unwrap();
    holder.batch_execute("COMMIT").unwrap();
    s.wait_status("ok_4", "Accepted");
    wait_for("the deleted room's dead letter", WAIT, || {
        s.db.dead_letters().len() == 2
    });
    let isolated = worker.lines.lock().unwrap().iter().any(|l| {
        l.contains("database refused a record of the batch; applying its records one by one") && l.contains("23503")
    });
    assert!(isolated, "the batch's 23503 set its records apart");

    let letters = s.db.dead_letters();
    let by_id = |id: &str| letters.iter().find(|l| l.booking_id.as_deref() == Some(id)).unwrap();
    let long = by_id("long_payment");
    assert_eq!(
        (long.reason.as_str(), long.sqlstate.as_deref()),
        ("database_rejected", Some("22001")),
        "{long:?}"
    );
    assert!(!long.error.is_empty());
    let deleted = by_id("room_deleted");
    assert_eq!(
        (deleted.reason.as_str(), deleted.sqlstate.as_deref()),
        ("unknown_room", None),
        "{deleted:?}"
    );
    for id in ["ok_1", "ok_2", "ok_3", "ok_4"] {
        assert_eq!(s.db.booking(id).map(|b| b.status), Some("Accepted".into()), "{id}");
    }
    assert_eq!(s.db.bookings().len(), 4);
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_not_null_column_trips_the_circuit_breaker_and_nothing_more_is_dead_lettered() {
    let Some(s) = Setup::new("breaker") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let worker = s.start_with("breaker", &[("RETRY_MAX_BACKOFF_MS", "500")]);
    book_range(&s, "before", 0..5, "room_1");
    s.wait_rows(5);
    s.db.exec(
        "ALTER TABLE bookings ADD COLUMN channel TEXT NOT NULL DEFAULT 'web';
         ALTER TABLE bookings ALTER COLUMN channel DROP DEFAULT",
    );
    // In small steps, so that refusals are committed as dead letters before the limit is reached.
    for step in 0..12 {
        book_range(&s, "after", step * 5..step * 5 + 5, "room_1");
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_for("/readyz to name 23502", WAIT, || {
        let (status, body) = readyz(&worker);
        status == 503 && body.contains("SQLSTATE 23502")
    });
    let at_halt = s.db.dead_letters().len();
    assert!(
        (1..=25).contains(&at_halt),
        "{at_halt} dead letters before the breaker tripped"
    );
    assert_eq!(metric(&worker, "booking_worker_circuit_breaker_trips_total"), 1.0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        s.db.dead_letters().len(),
        at_halt,
        "nothing is dead-lettered once halted"
    );
    assert!(s
        .db
        .dead_letters()
        .iter()
        .all(|l| l.sqlstate.as_deref() == Some("23502")));

    s.db.exec("ALTER TABLE bookings ALTER COLUMN channel SET DEFAULT 'web'");
    wait_for("every record to reach its end", WAIT, || {
        s.db.bookings().len() + s.db.dead_letters().len() == 65
    });
    wait_for("/readyz to be 200 again", WAIT, || readyz(&worker).0 == 200);
    assert_eq!(s.db.dead_letters().len(), at_halt);
    assert_eq!(
        metric(&worker, "booking_worker_circuit_breaker_trips_total"),
        1.0,
        "the retries of the refused records are the same trip"
    );
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn timestamps_come_from_the_server_clock_in_its_time_zone() {
    let Some(s) = Setup::new("timezone") else { return };
    s.db.exec(&format!(
        "ALTER DATABASE \"{}\" SET timezone = 'America/New_York'",
        s.db.name
    ));
    let user = s.db.user("owner@example.com", "owner");
    let room = s.db.room("room_1");
    let worker = s.start("timezone");
    s.book("tz_worker", "owner", "room_1");
    s.producer.flush();
    s.wait_status("tz_worker", "Accepted");
    // booking-management's own insert, with its column defaults, right after.
    s.db.conn()
        .execute(
            "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id)
             VALUES ($1, $2, 2, '2025-02-01', '2025-02-03', 'pay_bm')",
            &[&user, &room],
        )
        .unwrap();
    let apart: f64 = s.db.value(
        "SELECT abs(extract(epoch FROM (SELECT created_at FROM bookings WHERE external_id = 'tz_worker')
                                     - (SELECT created_at FROM bookings WHERE payment_id = 'pay_bm')))::float8",
    );
    assert!(apart < 60.0, "worker and booking-management rows are {apart} s apart");
    let drift: f64 = s.db.value(
        "SELECT abs(extract(epoch FROM (SELECT created_at FROM bookings WHERE external_id = 'tz_worker')
                                     - localtimestamp))::float8",
    );
    assert!(drift < 3600.0, "created_at is {drift} s from the server's local time");
    assert_eq!(worker.terminate(WAIT), 0);
}

/// Runs a worker subcommand to its end, with this environment.
fn worker_command(env: &[(String, String)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_booking-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("METRICS_ADDR", "off")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run booking-worker")
}

#[test]
fn a_migration_never_blocks_booking_managements_inserts_longer_than_its_lock_timeout() {
    let Some(services) = common::services() else { return };
    let db = TestDb::create_empty(&services, "online");
    db.exec(include_str!("../../sql/schema.sql"));
    let user = db.user("owner@example.com", "owner");
    let room = db.room("room_1");
    db.exec(&format!(
        "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id)
         SELECT {user}, {room}, 2, DATE '2020-01-01' + (i % 1000), DATE '2020-01-02' + (i % 1000), 'pay_' || i
           FROM generate_series(1, 200000) AS i"
    ));

    // booking-management inserting continuously, its slowest insert measured.
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let inserter = {
        let (stop, slowest, mut conn) = (Arc::clone(&stop), Arc::clone(&slowest), db.conn());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                conn.execute(
                    "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date)
                     VALUES ($1, $2, 1, '2030-01-01', '2030-01-02')",
                    &[&user, &room],
                )
                .expect("booking-management's insert");
                let took = started.elapsed();
                let mut s = slowest.lock().unwrap();
                *s = (*s).max(took);
                n += 1;
            }
            n
        })
    };
    // A long transaction of booking-management's holds a lock on bookings for 4 s, so that the
    // migration's ALTER TABLE must wait for it.
    let holder = {
        let mut conn = db.conn();
        std::thread::spawn(move || {
            let mut tx = conn.transaction().unwrap();
            tx.execute("SELECT 1 FROM bookings WHERE id = 1 FOR UPDATE", &[])
                .unwrap();
            std::thread::sleep(Duration::from_secs(4));
            tx.commit().unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let env = [
        ("DB_HOST", services.db_host.clone()),
        ("DB_PORT", services.db_port.to_string()),
        ("DB_USER", services.db_user.clone()),
        ("DB_PASSWORD", services.db_password.clone()),
        ("DB_NAME", db.name.clone()),
        ("DB_SSLMODE", "disable".into()),
        ("DB_MIGRATION_LOCK_TIMEOUT_MS", "200".into()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let out = worker_command(&env, &["migrate"]);
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    holder.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let inserted = inserter.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("did not get its lock in time; retrying"),
        "no lock wait to prove: {log}"
    );
    assert!(log.contains("bookings_external_id_key"), "{log}");
    let slowest = *slowest.lock().unwrap();
    assert!(inserted > 100, "only {inserted} inserts ran");
    assert!(
        slowest < Duration::from_millis(1500),
        "an insert waited {slowest:?} behind the migration (the holder kept its lock for 4 s)"
    );
    assert!(db.value::<bool>("SELECT indisvalid FROM pg_index WHERE indexrelid = 'bookings_external_id_key'::regclass"));
}

#[test]
fn an_invalid_index_left_by_a_failed_build_is_dropped_and_built_again() {
    let Some(services) = common::services() else { return };
    let db = TestDb::create(&services, "invalid");
    let user = db.user("owner@example.com", "owner");
    let room = db.room("room_1");
    // Two rows with one external id make a unique build fail and leave an INVALID index.
    db.exec(&format!(
        "DROP INDEX bookings_external_id_key;
         INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, external_id)
         VALUES ({user}, {room}, 1, '2030-01-01', '2030-01-02', 'same'),
                ({user}, {room}, 1, '2030-01-01', '2030-01-02', 'same')"
    ));
    let failed = db
        .conn()
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY bookings_external_id_key ON bookings (external_id)");
    assert!(failed.is_err());
    assert!(
        !db.value::<bool>("SELECT indisvalid FROM pg_index WHERE indexrelid = 'bookings_external_id_key'::regclass")
    );
    db.exec("DELETE FROM bookings WHERE external_id = 'same'; DELETE FROM booking_worker.schema_migrations");
    let mut conn = db.conn();
    let applied = booking_worker::repository::migrate(&mut conn, Duration::from_secs(2)).expect("migrate");
    assert_eq!(applied.len(), booking_worker::repository::migrations::MIGRATIONS.len());
    assert!(db.value::<bool>("SELECT indisvalid FROM pg_index WHERE indexrelid = 'bookings_external_id_key'::regclass"));
}

#[test]
fn a_pending_migration_the_worker_may_not_apply_refuses_the_start_with_exit_7() {
    let Some(s) = Setup::new("pending") else { return };
    let fresh = TestDb::create_empty(&s.services, "pending_fresh");
    fresh.exec(include_str!("../../sql/schema.sql"));
    let mut env = s.env();
    env.retain(|(k, _)| k != "DB_NAME");
    env.push(("DB_NAME".into(), fresh.name.clone()));

    let mut off = env.clone();
    off.push(("DB_MIGRATE".into(), "off".into()));
    let out = worker_command(&off, &["run"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{log}");
    assert!(
        log.contains("0001_booking_worker") && log.contains("booking-worker migrate"),
        "{log}"
    );
    assert!(log.contains("DB_MIGRATE=off"), "{log}");
    assert!(!fresh.value::<bool>("SELECT to_regnamespace('booking_worker') IS NOT NULL"));

    let (role, password) = fresh.worker_role();
    let mut limited = env.clone();
    limited.push(("DB_USER".into(), role));
    limited.push(("DB_PASSWORD".into(), password));
    let out = worker_command(&limited, &["run"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{log}");
    assert!(log.contains("0001_booking_worker") && log.contains("42501"), "{log}");
    let out = worker_command(&limited, &["migrate"]);
    assert_eq!(out.status.code(), Some(7));
}

/// The CA certificates the test cluster's server certificate is checked against:
/// `ca.crt` signed it, `other-ca.crt` did not.
fn test_cas(db: &TestDb) -> Option<(String, String)> {
    if db.value::<String>("SHOW ssl") != "on" {
        return None;
    }
    let cert: String = db.value("SHOW ssl_cert_file");
    let dir = std::path::Path::new(&cert).parent()?.to_path_buf();
    Some((
        dir.join("ca.crt").display().to_string(),
        dir.join("other-ca.crt").display().to_string(),
    ))
}

#[test]
fn each_sslmode_connects_as_libpq_would() {
    let Some(services) = common::services() else { return };
    let db = TestDb::create(&services, "tls");
    let Some((ca, other_ca)) = test_cas(&db) else {
        assert!(
            std::env::var("BOOKING_WORKER_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "the test PostgreSQL offers no TLS (scripts/postgres.sh turns it on)"
        );
        eprintln!("SKIPPED: the PostgreSQL server offers no TLS");
        return;
    };
    let connect = |mode: &str, host: &str, root: Option<&str>| {
        let mut vars = db.worker_env();
        vars.retain(|(k, _)| k != "DB_SSLMODE" && k != "DB_HOST");
        vars.push(("DB_SSLMODE".into(), mode.into()));
        vars.push(("DB_HOST".into(), host.into()));
        if let Some(root) = root {
            vars.push(("DB_SSLROOTCERT".into(), root.into()));
        }
        vars.push(("DB_CONNECT_TIMEOUT_SECS".into(), "2".into()));
        let config = Config::from_vars(&vars).unwrap();
        let pool = Pool::new(&config.database)?;
        let mut conn = pool.get()?;
        let row = conn
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .map_err(booking_worker::database::DbError::from)?;
        Ok::<bool, booking_worker::database::DbError>(row.get(0))
    };
    assert_eq!(connect("disable", "127.0.0.1", None), Ok(false));
    assert_eq!(connect("prefer", "127.0.0.1", None), Ok(true));
    assert_eq!(connect("require", "127.0.0.1", None), Ok(true));
    assert_eq!(
        connect("require", "127.0.0.1", Some(&other_ca)).map_err(|e| e.class),
        Err(ErrorClass::Systemic)
    );
    assert_eq!(connect("verify-ca", "127.0.0.1", Some(&ca)), Ok(true));
    assert_eq!(connect("verify-full", "127.0.0.1", Some(&ca)), Ok(true));
    assert_eq!(connect("verify-full", "localhost", Some(&ca)), Ok(true));
    let wrong = connect("verify-ca", "127.0.0.1", Some(&other_ca)).expect_err("a CA that did not sign it");
    assert_eq!(wrong.class, ErrorClass::Systemic, "{wrong}");
}

/// The name of every thread of a process, as a thread dump shows it (`/proc/PID/task/*/comm`),
/// by thread id.
fn thread_names(pid: u32) -> Vec<(u32, String)> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let tid: u32 = task.file_name().to_string_lossy().parse().unwrap();
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // a short-lived thread that ended meanwhile
        };
        names.push((tid, comm.trim().to_string()));
    }
    names
}

#[test]
fn every_thread_of_a_running_worker_is_named_in_full_and_apart() {
    let Some(s) = Setup::new("threads") else { return };
    let worker = s.start_with("threads", &[("WRITER_THREADS", "3")]);
    wait_for("the worker to be ready", WAIT, || readyz(&worker).0 == 200);
    let pid = worker.pid();
    let partitions = |topic: &str| {
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &s.services.brokers)
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), WAIT).unwrap();
        metadata.topics()[0].partitions().len()
    };
    let mut expected: Vec<String> = [
        "consumer-poll",
        "writer-1",
        "writer-2",
        "writer-3",
        "housekeeping",
        "http-1",
        "http-2",
        "http-3",
        "ready-probe",
        "ctrl-c",
        "shutdown-timer",
    ]
    .iter()
    .map(|n| n.to_string())
    .collect();
    let (bookings, cancels) = (partitions(&s.bookings), partitions(&s.cancels));
    assert!(bookings > 1 && cancels > 1, "{bookings} and {cancels} partitions");
    expected.extend((0..bookings).map(|p| format!("bk-events/{p}")));
    expected.extend((0..cancels).map(|p| format!("cancels/{p}")));
    let names = thread_names(pid);
    for name in &expected {
        assert!(name.len() <= 15, "{name} is longer than Linux keeps");
        let found = names.iter().filter(|(_, n)| n == name).count();
        assert_eq!(found, 1, "{name} once, under its full name, in {names:?}");
    }
    // Besides the process's main thread, the only others are librdkafka's own (rdk:…) and the
    // connection pool's (r2d2-worker-N, which open connections in the background).
    let unexpected: Vec<&(u32, String)> = names
        .iter()
        .filter(|(tid, n)| {
            *tid != pid && !expected.contains(n) && !n.starts_with("rdk:") && !n.starts_with("r2d2-worker-")
        })
        .collect();
    assert!(unexpected.is_empty(), "threads the test does not know: {unexpected:?}");
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_read_only_session_is_dropped_so_that_a_writable_primary_is_picked_up() {
    // A session opened while the database is read-only stays read-only, as a connection to a
    // standby does after a failover: only a new connection can write again.
    let Some(s) = Setup::new("readonly") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let worker = s.start_with("readonly", &[("RETRY_MAX_BACKOFF_MS", "300"), ("WRITER_THREADS", "1")]);
    book_range(&s, "ro", 0..1, "room_1");
    s.wait_rows(1);
    let db = &s.db.name;
    // From another database: once this one is read-only, its own sessions cannot change that.
    let mut admin = s.services.connect(&s.services.db_name);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_read_only = on"
        ))
        .unwrap();
    s.db.exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = '{db}' AND application_name = 'booking-worker'"
    ));
    book_range(&s, "ro", 1..5, "room_1");
    wait_for("a retried 25006", WAIT, || !retries(&worker, "25006").is_empty());
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_read_only = off"
        ))
        .unwrap();
    s.wait_rows(5);
    assert!(s.db.dead_letters().is_empty());
    assert_eq!(worker.terminate(WAIT), 0);
}
