//! Failing loud and staying bounded, against the real broker and database: a panic in any thread
//! ends the process at once and the restart loses and doubles nothing; a replay of the log keeps
//! dead letters dead; memory stays bounded under records near the size limit and a flood of
//! cancellations for one booking; settings that would break the invariants are refused.

use crate::common;

use common::{booking_json, cancel_json, unique, wait_for, Setup, WorkerProcess, WAIT};
use std::time::{Duration, Instant};

/// Makes one thread panic through a fail point (the binary is built with `--features
/// failpoints`): the process exits with 70 soon after, logging one line that names the thread;
/// a restart then applies every booking exactly once.
fn a_panic_ends_the_process(tag: &str, failpoint: &str, thread_prefixes: &[&str]) {
    let Some(s) = Setup::new(tag) else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let mut worker = s.start_with(tag, &[("FAILPOINTS", failpoint)]);
    // In two parts, so that there is more than one batch whatever the timing.
    for i in 0..100 {
        s.book(&format!("p{i}"), "owner", "room_1");
    }
    s.producer.flush();
    wait_for("a first batch, or the exit", WAIT, || {
        !s.db.bookings().is_empty() || !worker.is_running()
    });
    for i in 100..300 {
        s.book(&format!("p{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let deadline = Instant::now() + WAIT;
    while worker.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exited_at = chrono::Utc::now();
    assert_eq!(worker.wait(Duration::from_secs(5)), 70, "a panic exits with 70");
    let panics: Vec<serde_json::Value> = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["msg"].as_str().is_some_and(|m| m.starts_with("a thread panicked")))
        .collect();
    assert_eq!(panics.len(), 1, "one line about the panic");
    assert_eq!(panics[0]["level"], "ERROR");
    let thread = panics[0]["thread"].as_str().unwrap_or_default();
    assert!(
        thread_prefixes.iter().any(|p| thread.starts_with(p)),
        "the line names the thread: {thread}"
    );
    let logged_at = chrono::DateTime::parse_from_rfc3339(panics[0]["time"].as_str().unwrap()).unwrap();
    let lag = (exited_at - logged_at.with_timezone(&chrono::Utc)).num_milliseconds();
    assert!(lag < 5_000, "the process went on for {lag} ms after the panic");
    eprintln!("[{tag}] exit seen {lag} ms after the panic line");

    let restart = s.start(&format!("{tag}-restart"));
    s.wait_rows(300);
    std::thread::sleep(Duration::from_secs(1));
    let rows = s.db.bookings();
    let mut ids: Vec<String> = rows.iter().filter_map(|b| b.external_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (300, 300), "lost or doubled after the restart");
    assert!(s.db.dead_letters().is_empty());
    assert_eq!(restart.terminate(WAIT), 0);
}

#[test]
fn a_writer_panic_ends_the_process_and_the_restart_loses_nothing() {
    a_panic_ends_the_process("panic_writer", "writer-batch=1*off->panic", &["writer-"]);
}

#[test]
fn a_consumer_poll_panic_ends_the_process_and_the_restart_loses_nothing() {
    a_panic_ends_the_process("panic_poll", "consumer-poll=40*off->panic", &["consumer-poll"]);
}

#[test]
fn a_partition_thread_panic_ends_the_process_and_the_restart_loses_nothing() {
    a_panic_ends_the_process(
        "panic_partition",
        "partition-thread=30*off->panic",
        &["bk-events/", "cancels/"],
    );
}

/// Every end line of a worker's log.
fn ends(worker: &WorkerProcess) -> usize {
    worker.json_lines().iter().filter(|l| l.get("end").is_some()).count()
}

#[test]
fn a_replay_of_the_log_keeps_dead_letters_dead() {
    let Some(s) = Setup::new("deaddead") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let settings = [
        ("PENDING_CANCELLATION_TTL_SECS", "1"),
        ("PENDING_CHECK_INTERVAL_SECS", "1"),
    ];
    let first = s.start_with("deaddead", &settings);
    // A booking of a user who does not exist yet, and a cancellation that expires before its
    // booking comes.
    s.book("for_later", "later", "room_1");
    s.cancel("cancelled_late", "owner");
    s.producer.flush();
    wait_for("both dead letters", WAIT, || s.db.dead_letters().len() == 2);
    s.book("cancelled_late", "owner", "room_1");
    s.producer.flush();
    s.wait_status("cancelled_late", "Accepted");
    assert_eq!(first.terminate(WAIT), 0);
    let reasons: Vec<String> = s.db.dead_letters().into_iter().map(|l| l.reason).collect();
    assert_eq!(reasons, ["unknown_user", "cancellation_expired"]);

    // The missing user exists now; a new group reads the whole log again.
    s.db.user("later@example.com", "later");
    let before = s.db.snapshot();
    let replay = s.start_with("deaddead-replay", &[("KAFKA_GROUP_ID", &unique("deaddead-replay"))]);
    wait_for("the replay to reach every record", WAIT, || ends(&replay) == 3);
    let again = replay
        .json_lines()
        .iter()
        .filter(|l| l["end"] == "already_dead_lettered")
        .count();
    assert_eq!(again, 2, "both records stay dead letters");
    assert_eq!(replay.terminate(WAIT), 0);
    assert_eq!(s.db.snapshot(), before, "a replay applied a dead letter");
    assert!(s.db.booking("for_later").is_none());
    assert_eq!(s.db.booking("cancelled_late").unwrap().status, "Accepted");
}

/// The peak resident memory of a process, from the kernel.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// The peak RSS this test allows the worker under its load; the README states it.
const PEAK_RSS_LIMIT_MIB: f64 = 48.0;

/// `MAX_IN_FLIGHT_BYTES` in the memory test.
const IN_FLIGHT_CAP: usize = 8 << 20;

/// The worker's `booking_worker_in_flight_bytes`.
fn in_flight_bytes(worker: &WorkerProcess) -> f64 {
    let (_, body) = common::http_get(&worker.metrics_addr, "/metrics").unwrap_or_default();
    common::metric_sum(&common::parse_prometheus(&body), "booking_worker_in_flight_bytes", &[])
}

#[test]
fn memory_stays_bounded_under_large_records_and_a_flood_of_cancellations() {
    let Some(s) = Setup::new("bounded") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.user("other@example.com", "other");
    s.db.room("room_1");
    // 1,500 records just under MAX_PAYLOAD_BYTES (64 KiB), bookings padded with a field the
    // contract does not know: 94 MiB, more than the writers' channels hold (2 x 512 records).
    // The padding is random, as real payloads do not shrink a thousandfold when compressed.
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..1_500 {
        let padding: String = (0..65_536 - 400).map(|_| rng.alphanumeric()).collect();
        let id = format!("big_{i}");
        let payload = booking_json(&id, "owner", "room_1", 2, "2025-01-15", "2025-01-18").replacen(
            '{',
            &format!("{{\"notes\":\"{padding}\","),
            1,
        );
        assert!(payload.len() < 65_536);
        s.producer.send(&s.bookings, &id, payload.as_bytes(), &[]);
    }
    s.producer.flush();

    // booking-management holds a lock on bookings: the writers stand still, and the records pile
    // up between the partition threads and the writers, up to the cap.
    let mut holder = s.db.conn();
    holder
        .batch_execute("BEGIN; LOCK TABLE bookings IN EXCLUSIVE MODE")
        .unwrap();
    let cap = IN_FLIGHT_CAP.to_string();
    let worker = s.start_with("bounded", &[("MAX_IN_FLIGHT_BYTES", cap.as_str())]);
    let mut most = 0.0f64;
    wait_for("the records in flight to reach the cap", WAIT, || {
        most = most.max(in_flight_bytes(&worker));
        most >= (IN_FLIGHT_CAP - 65_536) as f64
    });
    for _ in 0..20 {
        most = most.max(in_flight_bytes(&worker));
        std::thread::sleep(Duration::from_millis(100));
    }
    let stalled_peak = peak_rss_mib(worker.pid());
    holder.batch_execute("COMMIT").unwrap();
    assert!(
        most <= (IN_FLIGHT_CAP + 65_536) as f64,
        "{most} bytes in flight, over the cap of {IN_FLIGHT_CAP}"
    );

    s.wait_rows(1_500);
    // 10,000 cancellations for one booking that comes last: every one is parked, then all are
    // released by the booking, a page per transaction.
    for i in 0..10_000 {
        let user = if i % 2 == 0 { "owner" } else { "other" };
        s.producer
            .send(&s.cancels, "flooded", cancel_json("flooded", user).as_bytes(), &[]);
    }
    s.producer.flush();
    wait_for("the flood to be parked", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM booking_worker.pending_cancellations") == 10_000
    });
    s.book("flooded", "owner", "room_1");
    s.producer.flush();
    wait_for("every record to reach its end", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM bookings") == 1_501
            && s.db
                .value::<i64>("SELECT count(*) FROM booking_worker.pending_cancellations")
                == 0
    });
    let peak = peak_rss_mib(worker.pid());
    eprintln!(
        "[bounded] in flight at most {most} bytes; peak RSS {stalled_peak:.1} MiB while stalled, {peak:.1} MiB in all"
    );
    assert_eq!(s.db.booking("flooded").unwrap().status, "Cancelled");
    // The 5,000 cancellations by someone else are dead letters; the owner's first cancels the
    // booking and the other 4,999 find it cancelled already.
    let unauthorized: i64 =
        s.db.value("SELECT count(*) FROM booking_worker.dead_letters WHERE reason = 'unauthorized'");
    assert_eq!(unauthorized, 5_000);
    assert!(s.db.dead_letters().iter().all(|l| l.reason == "unauthorized"));
    assert!(peak < PEAK_RSS_LIMIT_MIB, "peak RSS {peak:.1} MiB");
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_property_the_worker_relies_on_is_refused_at_start_up_naming_it() {
    let Some(s) = Setup::new("refused_prop") else { return };
    let mut worker = s.start_with("refused_prop", &[("KAFKA_PROP_ENABLE_AUTO_COMMIT", "false")]);
    assert_eq!(worker.wait(WAIT), 2);
    assert!(worker.logged("KAFKA_PROP_ENABLE_AUTO_COMMIT"));
}

#[test]
fn check_reaches_a_sasl_cluster_through_kafka_prop_settings() {
    let Some(s) = Setup::new("sasl") else { return };
    let (Ok(brokers), Ok(user), Ok(password)) = (
        std::env::var("KAFKA_SASL_BROKERS"),
        std::env::var("KAFKA_SASL_USERNAME"),
        std::env::var("KAFKA_SASL_PASSWORD"),
    ) else {
        assert!(
            std::env::var("BOOKING_WORKER_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "no SASL listener: scripts/kafka.sh starts one and scripts/test.sh exports KAFKA_SASL_*"
        );
        eprintln!("SKIPPED: no SASL listener configured");
        return;
    };
    // The topics must exist for `check` to pass.
    s.book("sasl_topic", "nobody", "nowhere");
    s.cancel("sasl_topic", "nobody");
    s.producer.flush();
    let check = |password: &str| {
        let mut env = s.env();
        env.retain(|(k, _)| k != "KAFKA_BROKERS");
        env.extend(
            [
                ("KAFKA_BROKERS", brokers.as_str()),
                ("KAFKA_PROP_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("KAFKA_PROP_SASL_MECHANISMS", "PLAIN"),
                ("KAFKA_PROP_SASL_USERNAME", user.as_str()),
                ("KAFKA_PROP_SASL_PASSWORD", password),
                ("METRICS_ADDR", "off"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        std::process::Command::new(env!("CARGO_BIN_EXE_booking-worker"))
            .arg("check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .expect("run check")
    };
    let ok = check(&password);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    let refused = check("not-the-password");
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
}

#[test]
fn parked_pages_reach_every_booking_and_a_refused_booking_does_not_hold_its_writer() {
    let Some(s) = Setup::new("pages") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    // More than a page for one booking, one for another parked after them, and more than a page
    // for a booking the database will refuse.
    for _ in 0..600 {
        s.cancel("many", "owner");
    }
    s.cancel("one", "owner");
    for _ in 0..600 {
        s.cancel("refused", "owner");
    }
    s.producer.flush();
    let worker = s.start_with("pages", &[("WRITER_THREADS", "1"), ("BATCH_LINGER_MS", "300")]);
    wait_for("every cancellation to be parked", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM booking_worker.pending_cancellations") == 1_201
    });
    s.book("many", "owner", "room_1");
    s.book("one", "owner", "room_1");
    let refused = booking_json("refused", "owner", "room_1", 2, "2025-01-15", "2025-01-18")
        .replace("pay_refused", &"p".repeat(300));
    s.producer.send(&s.bookings, "refused", refused.as_bytes(), &[]);
    s.producer.flush();
    s.wait_status("many", "Cancelled");
    s.wait_status("one", "Cancelled");
    wait_for("the refused booking's dead letter", WAIT, || {
        s.db.dead_letters()
            .iter()
            .any(|l| l.booking_id.as_deref() == Some("refused"))
    });
    // Its cancellations stay parked, and the writer goes on.
    s.book("after", "owner", "room_1");
    s.producer.flush();
    s.wait_status("after", "Accepted");
    let parked: Vec<String> = s.db.parked();
    assert_eq!(parked.len(), 600);
    assert!(parked.iter().all(|r| r == "refused"));
    assert_eq!(worker.terminate(WAIT), 0);
}
