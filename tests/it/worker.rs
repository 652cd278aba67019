//! The worker end to end, as a child process against the real broker and database: bookings,
//! cancellations, bad records, baggage in the logs, a database outage, SIGTERM and restart, and two
//! instances sharing a group.

use crate::common;

use common::{booking_json, unique, wait_for, CuttableProxy, Setup, WorkerProcess, WAIT};
use std::time::Duration;

/// A record to produce: payload, headers, and the dead-letter reason it must get (None: applied).
type BadCase = (Vec<u8>, Vec<(&'static str, Vec<u8>)>, Option<&'static str>);

/// Lines of a worker's log that report the end of a record (`end` field), by end name.
fn ends(worker: &WorkerProcess, end: &str) -> usize {
    worker.json_lines().iter().filter(|l| l["end"] == end).count()
}

/// The same count over lines kept after the worker has gone.
fn ends_in(lines: &std::sync::Mutex<Vec<String>>, end: &str) -> usize {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["end"] == end)
        .count()
}

fn total_ends(worker: &WorkerProcess) -> usize {
    worker.json_lines().iter().filter(|l| l.get("end").is_some()).count()
}

#[test]
fn bookings_are_created_with_every_column_and_baggage_is_logged() {
    let Some(s) = Setup::new("create") else { return };
    let by_id = s.db.user("by-id@example.com", "by_id");
    let by_email = s.db.user("alice@example.com", "alice");
    let by_username = s.db.user("bob@example.com", "user_123");
    let room = s.db.room("room_ocean_001");
    // Subscribing before the topics exist: the broker creates them.
    assert!(!common::topic_exists(&s.services, &s.cancels));
    let worker = s.start("create");
    wait_for("the subscription to create both topics", WAIT, || {
        common::topic_exists(&s.services, &s.bookings) && common::topic_exists(&s.services, &s.cancels)
    });

    let trace = unique("trace");
    let baggage = format!("trace-id={trace},span-id=def456");
    let events = [
        (
            "booking_1736950000_AbC123",
            by_id.to_string(),
            "2025-01-15T15:00:00Z",
            "2025-01-18T11:00:00Z",
        ),
        (
            "booking_by_email",
            "alice@example.com".to_string(),
            "2025-03-01",
            "2025-03-02",
        ),
        (
            "booking_by_username",
            "user_123".to_string(),
            "2025-01-15T23:30:00-05:00",
            "2025-01-16T01:00:00-05:00",
        ),
    ];
    for (i, (id, user, start, end)) in events.iter().enumerate() {
        let payload = booking_json(id, user, "room_ocean_001", 2 + i as i64, start, end);
        let headers: Vec<(&str, &[u8])> = if i == 0 {
            vec![("Baggage", baggage.as_bytes())]
        } else {
            vec![]
        };
        s.producer.send(&s.bookings, id, payload.as_bytes(), &headers);
    }
    s.producer.flush();
    s.wait_rows(3);

    let first = s.db.booking("booking_1736950000_AbC123").unwrap();
    assert_eq!((first.user_id, first.room_id, first.number_of_guests), (by_id, room, 2));
    assert_eq!(
        (first.start_date.as_str(), first.end_date.as_str()),
        ("2025-01-15", "2025-01-18")
    );
    assert_eq!(first.payment_id.as_deref(), Some("pay_booking_1736950000_AbC123"));
    assert_eq!(first.status, "Accepted");
    let second = s.db.booking("booking_by_email").unwrap();
    assert_eq!((second.user_id, second.number_of_guests), (by_email, 3));
    assert_eq!(
        (second.start_date.as_str(), second.end_date.as_str()),
        ("2025-03-01", "2025-03-02")
    );
    let third = s.db.booking("booking_by_username").unwrap();
    assert_eq!(third.user_id, by_username);
    assert_eq!(
        (third.start_date.as_str(), third.end_date.as_str()),
        ("2025-01-15", "2025-01-16")
    );
    assert!(s.db.dead_letters().is_empty());

    wait_for("the created lines", WAIT, || ends(&worker, "created") == 3);
    let lines = worker.json_lines();
    let about_first: Vec<_> = lines
        .iter()
        .filter(|l| l["booking_id"] == "booking_1736950000_AbC123")
        .collect();
    assert!(!about_first.is_empty());
    for line in &about_first {
        assert_eq!(line["baggage"], baggage.as_str(), "{line}");
        assert!(line["time"].is_string() && line["level"].is_string() && line["msg"].is_string());
    }
    let about_second = lines.iter().find(|l| l["booking_id"] == "booking_by_email").unwrap();
    assert!(about_second.get("baggage").is_none(), "{about_second}");
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn redelivered_and_replayed_records_change_nothing() {
    let Some(s) = Setup::new("replay") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.user("other@example.com", "other");
    s.db.room("room_1");
    for i in 0..20 {
        s.book(&format!("b{i}"), "owner", "room_1");
    }
    s.book("b0", "owner", "room_1");
    s.book("b1", "owner", "room_1");
    s.cancel("b2", "owner");
    s.cancel("b3", "other");
    s.cancel("late", "owner");
    s.producer.send(&s.bookings, "bad", b"{broken", &[]);
    s.producer.flush();
    let records = 26;

    let first = s.start("replay-1");
    wait_for("every record of the first run", WAIT, || total_ends(&first) == records);
    assert_eq!(s.db.bookings().len(), 20, "a redelivered booking made one row");
    assert_eq!(ends(&first, "duplicate"), 2);
    assert_eq!(first.terminate(WAIT), 0);
    let before = s.db.snapshot();
    assert_eq!(s.db.dead_letters().len(), 2);
    assert_eq!(s.db.parked(), ["late"]);

    // A new group reads both topics from offset 0 again.
    let replay = s.start_with("replay-2", &[("KAFKA_GROUP_ID", &unique("replay-group"))]);
    wait_for("every record of the replay", WAIT, || total_ends(&replay) == records);
    assert_eq!(replay.terminate(WAIT), 0);
    assert_eq!(s.db.snapshot(), before, "replaying the log changed the database");
}

#[test]
fn cancellations_follow_the_rules() {
    let Some(s) = Setup::new("cancel") else { return };
    let owner = s.db.user("owner@example.com", "owner");
    s.db.user("intruder@example.com", "intruder");
    let room = s.db.room("room_1");
    // A booking created by booking-management: no external id.
    s.db.exec(&format!(
        "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id)
         VALUES ({owner}, {room}, 1, '2025-05-01', '2025-05-03', 'pay_legacy')"
    ));
    let legacy_id = s.db.bookings()[0].id;
    // And one whose id has ten digits, as a SERIAL reaches after a billion rows.
    s.db.exec(&format!(
        "INSERT INTO bookings (id, user_id, room_id, number_of_guests, start_date, end_date, payment_id)
         VALUES (2000000000, {owner}, {room}, 1, '2025-06-01', '2025-06-03', 'pay_legacy_2')"
    ));

    let worker = s.start("cancel");
    s.book("own", "owner", "room_1");
    s.book("twice", "owner", "room_1");
    s.book("theirs", "owner", "room_1");
    s.producer.flush();
    s.wait_rows(5);

    s.cancel("own", "owner@example.com");
    s.cancel("theirs", "intruder");
    s.cancel("twice", "owner");
    s.cancel("twice", &owner.to_string());
    s.cancel(&legacy_id.to_string(), "owner");
    s.cancel("2000000000", "owner");
    s.producer.flush();
    s.wait_status("own", "Cancelled");
    s.wait_status("twice", "Cancelled");
    wait_for("the legacy booking to be cancelled", WAIT, || {
        s.db.bookings()
            .iter()
            .any(|b| b.id == legacy_id && b.status == "Cancelled")
    });
    wait_for("the ten-digit legacy booking to be cancelled", WAIT, || {
        s.db.bookings()
            .iter()
            .any(|b| b.id == 2_000_000_000 && b.status == "Cancelled")
    });
    wait_for("the repeated cancellation", WAIT, || {
        ends(&worker, "already_cancelled") == 1
    });
    wait_for("the unauthorized dead letter", WAIT, || !s.db.dead_letters().is_empty());

    let own = s.db.booking("own").unwrap();
    assert!(own.updated, "cancelling sets updated_at");
    let theirs = s.db.booking("theirs").unwrap();
    assert_eq!(theirs.status, "Accepted", "another user's cancellation changes nothing");
    assert!(!theirs.updated);
    let letters = s.db.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "unauthorized");
    assert_eq!(letters[0].booking_id.as_deref(), Some("theirs"));
    assert_eq!(letters[0].topic, s.cancels);
    let warned = worker
        .json_lines()
        .into_iter()
        .any(|l| l["end"] == "already_cancelled" && l["level"] == "WARN" && l["booking_id"] == "twice");
    assert!(warned, "a repeated cancellation is logged as a warning");

    // A cancellation before its booking: parked, then applied when the booking arrives.
    s.cancel("early", "owner");
    s.producer.flush();
    wait_for("the early cancellation to be parked", WAIT, || {
        s.db.parked() == ["early"]
    });
    assert!(s.db.booking("early").is_none());
    s.book("early", "owner", "room_1");
    s.producer.flush();
    s.wait_status("early", "Cancelled");
    assert!(s.db.parked().is_empty(), "the parked cancellation was used up");
    wait_for("the released cancellation line", WAIT, || {
        worker.logged("parked cancellation applied")
    });
    // All digits, but past the largest row id: no row can have it, so it is parked like any
    // unknown booking id (and the batch does not fail on the conversion).
    s.cancel("4294967296", "owner");
    s.producer.flush();
    wait_for("the out-of-range id to be parked", WAIT, || {
        s.db.parked() == ["4294967296"]
    });
    assert_eq!(s.db.dead_letters().len(), 1);
    assert_eq!(worker.terminate(WAIT), 0);
}

/// One record of each kind of bad input, in order, with the reason it is dead-lettered for, and a
/// valid booking last.
fn bad_cases() -> Vec<BadCase> {
    let valid = |id: &str| booking_json(id, "owner", "room_1", 2, "2025-01-15", "2025-01-18");
    let huge = format!(
        r#"{{"bookingId":"huge","userId":"owner","roomId":"room_1","guests":1,"startDate":"2025-01-15","endDate":"2025-01-16","paymentId":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    vec![
        (b"{not json".to_vec(), vec![], Some("malformed_json")),
        (
            br#"{"bookingId":"m1","userId":"owner"}"#.to_vec(),
            vec![],
            Some("missing_field"),
        ),
        (
            booking_json("u1", "ghost", "room_1", 2, "2025-01-15", "2025-01-18").into_bytes(),
            vec![],
            Some("unknown_user"),
        ),
        (
            booking_json("r1", "owner", "no_such_room", 2, "2025-01-15", "2025-01-18").into_bytes(),
            vec![],
            Some("unknown_room"),
        ),
        (
            booking_json("g1", "owner", "room_1", 0, "2025-01-15", "2025-01-18").into_bytes(),
            vec![],
            Some("invalid_guests"),
        ),
        (
            booking_json("d1", "owner", "room_1", 2, "2025-01-18", "2025-01-15").into_bytes(),
            vec![],
            Some("invalid_dates"),
        ),
        // A Baggage value that is not UTF-8 does not make a bad record: it applies, lossy baggage
        // and all.
        (
            valid("h1").into_bytes(),
            vec![("baggage", vec![b't', b'=', 0xff, 0xfe])],
            None,
        ),
        (huge.into_bytes(), vec![], Some("payload_too_large")),
        (valid("ok_after").into_bytes(), vec![], None),
    ]
}

#[test]
fn bad_records_are_dead_lettered_with_their_reason_and_later_records_still_apply() {
    let Some(s) = Setup::new("bad") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    // One key, so one partition and one order.
    let key = "same-partition";
    let valid = |id: &str| booking_json(id, "owner", "room_1", 2, "2025-01-15", "2025-01-18");
    let cases = bad_cases();
    for (payload, headers, _) in &cases {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        s.producer.send(&s.bookings, key, payload, &headers);
    }
    // A header whose name is not UTF-8 is not Baggage: the record applies normally.
    s.producer.send_raw_header_name(
        &s.bookings,
        key,
        valid("odd_header").as_bytes(),
        &[0xff, 0xfe, b'k'],
        b"v",
    );
    s.producer.send(&s.cancels, "c1", br#"{"userId":"owner"}"#, &[]);
    s.producer.flush();

    let worker = s.start("bad");
    wait_for("the valid bookings after the bad records", WAIT, || {
        s.db.booking("ok_after").is_some() && s.db.booking("odd_header").is_some() && s.db.booking("h1").is_some()
    });
    wait_for("all dead letters", WAIT, || s.db.dead_letters().len() == 8);
    let letters = s.db.dead_letters();
    let mut on_bookings: Vec<_> = letters.iter().filter(|l| l.topic == s.bookings).collect();
    on_bookings.sort_by_key(|l| l.kafka_offset);
    let expected: Vec<&str> = cases.iter().filter_map(|(_, _, reason)| *reason).collect();
    let got: Vec<&str> = on_bookings.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(got, expected);
    for l in &letters {
        assert!(!l.error.is_empty(), "{l:?}");
    }
    assert!(
        s.db.booking("h1").is_some(),
        "the booking with a Baggage value that is not UTF-8"
    );
    let h1_lines: Vec<_> = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["booking_id"] == "h1" && l["end"] == "created")
        .collect();
    assert_eq!(h1_lines.len(), 1);
    assert_eq!(
        h1_lines[0]["baggage"], "t=\u{fffd}\u{fffd}",
        "the baggage is carried lossily"
    );
    assert!(worker.logged("the Baggage header value is not UTF-8"));
    let huge_letter = on_bookings.iter().find(|l| l.reason == "payload_too_large").unwrap();
    assert!(huge_letter.payload_len > 1024 * 1024, "the raw payload is kept whole");
    // A booking's bytes go to the database only once it is a dead letter, and go whole.
    for (payload, _, reason) in &cases {
        if let Some(r @ ("unknown_user" | "unknown_room")) = reason {
            let letter = on_bookings.iter().find(|l| l.reason == *r).unwrap();
            assert_eq!(letter.payload_len, payload.len() as i64, "{letter:?}");
        }
    }
    let cancel_letter = letters.iter().find(|l| l.topic == s.cancels).unwrap();
    assert_eq!(cancel_letter.reason, "missing_field");
    assert_eq!(s.db.bookings().len(), 3);
    assert!(!worker.logged("panicked"));
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_database_outage_mid_stream_loses_nothing() {
    let Some(s) = Setup::new("outage") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let proxy = CuttableProxy::start(&s.services.db_host, s.services.db_port);
    let port = proxy.port.to_string();
    let worker = s.start_with(
        "outage",
        &[
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", &port),
            ("RETRY_MAX_BACKOFF_MS", "500"),
            ("BATCH_SIZE", "20"),
        ],
    );
    for i in 0..100 {
        s.book(&format!("o{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(100);

    proxy.cut();
    for i in 100..300 {
        s.book(&format!("o{i}"), "owner", "room_1");
    }
    s.producer.flush();
    wait_for("the worker to notice the outage", WAIT, || {
        worker.logged("database unavailable; retrying")
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        s.db.bookings().len(),
        100,
        "nothing is written while the database is away"
    );
    proxy.restore();
    s.wait_rows(300);

    // Backends terminated mid-stream, from the server side.
    for i in 300..500 {
        s.book(&format!("o{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.db.exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = '{}' AND application_name = 'booking-worker'",
        s.db.name
    ));
    s.wait_rows(500);
    let rows = s.db.bookings();
    assert_eq!(rows.len(), 500);
    assert!(
        s.db.dead_letters().is_empty(),
        "an outage never dead-letters: {:?}",
        s.db.dead_letters()
    );
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn sigterm_mid_stream_then_restart_applies_every_record_once() {
    let Some(s) = Setup::new("sigterm") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let total = 3000;
    for i in 0..total {
        s.book(&format!("s{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let slow = [
        ("BATCH_SIZE", "10"),
        ("WRITER_THREADS", "1"),
        ("SHUTDOWN_TIMEOUT_SECS", "20"),
    ];
    let first = s.start_with("sigterm-1", &slow);
    wait_for("some progress", WAIT, || !s.db.bookings().is_empty());
    let code = first.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "a clean shutdown exits 0 within the deadline");
    let after_first = s.db.bookings().len();
    assert!(
        after_first < total,
        "the stream was stopped in the middle ({after_first} of {total})"
    );

    let second = s.start("sigterm-2");
    s.wait_rows(total);
    wait_for("the second run to settle", WAIT, || {
        ends(&second, "created") == total - after_first
    });
    assert_eq!(
        ends(&second, "duplicate"),
        0,
        "the clean shutdown committed exactly what was durable"
    );
    assert_eq!(s.db.bookings().len(), total);
    assert!(s.db.dead_letters().is_empty());
    assert_eq!(second.terminate(WAIT), 0);
}

#[test]
fn two_instances_in_one_group_survive_one_stopping_mid_stream() {
    let Some(s) = Setup::new("group") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let total = 4000;
    for i in 0..total / 2 {
        s.book(&format!("g{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let slow = [("BATCH_SIZE", "10"), ("WRITER_THREADS", "1")];
    let a = s.start_with("group-a", &slow);
    let b = s.start_with("group-b", &slow);
    wait_for("both instances to hold partitions", WAIT, || {
        a.logged("partition assigned") && b.logged("partition assigned")
    });
    for i in total / 2..total {
        s.book(&format!("g{i}"), "owner", "room_1");
    }
    s.producer.flush();
    wait_for("some progress", WAIT, || !s.db.bookings().is_empty());
    let a_lines = std::sync::Arc::clone(&a.lines);
    assert_eq!(a.terminate(Duration::from_secs(40)), 0);
    s.wait_rows(total);
    wait_for("every record to reach an end", WAIT, || {
        ends_in(&a_lines, "created") + ends(&b, "created") == total
    });
    let rows = s.db.bookings();
    assert_eq!(rows.len(), total, "every booking applied exactly once");
    assert!(s.db.dead_letters().is_empty());
    let b_lines = std::sync::Arc::clone(&b.lines);
    assert_eq!(b.terminate(WAIT), 0);
    assert_eq!(ends_in(&a_lines, "created") + ends_in(&b_lines, "created"), total);
}

#[test]
fn a_parked_cancellation_expires_into_a_dead_letter_and_is_not_parked_again_on_replay() {
    let Some(s) = Setup::new("expiry") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    s.cancel("never_comes", "owner");
    s.producer.flush();
    let fast_expiry = [
        ("PENDING_CANCELLATION_TTL_SECS", "1"),
        ("PENDING_CHECK_INTERVAL_SECS", "1"),
    ];
    let worker = s.start_with("expiry-1", &fast_expiry);
    wait_for("the expired cancellation's dead letter", WAIT, || {
        s.db.dead_letters().iter().any(|l| l.reason == "cancellation_expired")
    });
    assert!(s.db.parked().is_empty());
    let letter = &s.db.dead_letters()[0];
    assert_eq!(letter.booking_id.as_deref(), Some("never_comes"));
    assert_eq!((letter.topic.as_str(), letter.kafka_offset), (s.cancels.as_str(), 0));
    assert_eq!(worker.terminate(WAIT), 0);

    let replay = s.start_with("expiry-2", &[("KAFKA_GROUP_ID", &unique("expiry-replay"))]);
    wait_for("the replayed cancellation", WAIT, || total_ends(&replay) == 1);
    assert_eq!(ends(&replay, "already_dead_lettered"), 1);
    assert!(
        s.db.parked().is_empty(),
        "a dead-lettered cancellation is not parked again"
    );
    assert_eq!(s.db.dead_letters().len(), 1);
    assert_eq!(replay.terminate(WAIT), 0);
}

#[test]
fn a_bad_environment_variable_is_refused_with_its_name_and_exit_code_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_booking-worker"))
        .env("WRITER_THREADS", "many")
        .output()
        .expect("run booking-worker");
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().expect("a log line")).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["variable"], "WRITER_THREADS");
    assert!(
        line["msg"].as_str().unwrap().contains("an integer from 1 to 256"),
        "{line}"
    );

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_booking-worker"))
        .arg("--help")
        .output()
        .expect("run booking-worker --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for name in ["KAFKA_BROKERS", "DB_PASSWORD", "SHUTDOWN_TIMEOUT_SECS", "Exit codes"] {
        assert!(text.contains(name), "--help mentions {name}");
    }
}

#[test]
fn a_parked_cancellation_has_one_end_line_and_one_outcome_line() {
    let Some(s) = Setup::new("oneend") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    s.cancel("first_cancel", "owner");
    s.producer.flush();
    let worker = s.start_with("oneend", &[("PENDING_CHECK_INTERVAL_SECS", "1")]);
    wait_for("the parked cancellation", WAIT, || s.db.parked() == ["first_cancel"]);
    let gauge = |name: &str| {
        common::http_get(&worker.metrics_addr, "/metrics").map_or(f64::NAN, |(_, text)| {
            common::metric_sum(&common::parse_prometheus(&text), name, &[])
        })
    };
    wait_for("the parked gauges to see it for over a second", WAIT, || {
        gauge("booking_worker_parked_cancellations") == 1.0 && gauge("booking_worker_oldest_parked_age_seconds") > 1.0
    });
    s.book("first_cancel", "owner", "room_1");
    s.producer.flush();
    s.wait_status("first_cancel", "Cancelled");
    wait_for("the released line", WAIT, || {
        worker.logged("parked cancellation applied")
    });
    wait_for("the parked gauges back to 0", WAIT, || {
        gauge("booking_worker_parked_cancellations") == 0.0 && gauge("booking_worker_oldest_parked_age_seconds") == 0.0
    });
    assert_eq!(
        total_ends(&worker),
        2,
        "one end per consumed record: parked, then created"
    );
    assert_eq!((ends(&worker, "parked"), ends(&worker, "created")), (1, 1));
    let released: Vec<_> = worker
        .json_lines()
        .into_iter()
        .filter(|l| l["outcome"] == "cancelled")
        .collect();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0]["booking_id"], "first_cancel");
    // The metrics count each end and outcome once, with the words of the log lines.
    let text = common::http_get(&worker.metrics_addr, "/metrics").expect("scrape").1;
    let m = common::parse_prometheus(&text);
    let count = |name: &str, labels: &[(&str, &str)]| common::metric_sum(&m, name, labels);
    assert_eq!(count("booking_worker_events_total", &[]), 2.0, "{text}");
    for end in ["parked", "created"] {
        assert_eq!(
            count("booking_worker_events_total", &[("end", end)]),
            1.0,
            "{end}: {text}"
        );
    }
    assert_eq!(count("booking_worker_parked_outcomes_total", &[]), 1.0, "{text}");
    assert_eq!(
        count(
            "booking_worker_parked_outcomes_total",
            &[("outcome", "cancelled"), ("reason", "")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_kafka_client_that_cannot_be_created_stops_the_worker_at_once_with_exit_code_4() {
    let Some(s) = Setup::new("badclient") else { return };
    // librdkafka refuses a fetch response cap below its message size cap.
    let mut worker = s.start_with("badclient", &[("KAFKA_FETCH_MAX_BYTES", "65536")]);
    assert_eq!(
        worker.wait(Duration::from_secs(20)),
        4,
        "the worker must not wait for a signal"
    );
    let failed = worker
        .json_lines()
        .into_iter()
        .find(|l| l["msg"] == "booking-worker failed")
        .expect("a line saying why the worker stopped");
    assert!(
        failed["error"].as_str().unwrap().contains("fetch.max.bytes"),
        "{failed}"
    );
}

/// A backlog in which every cancellation comes after its booking: 2,000 bookings, then
/// cancellations of 400 of them, all older than the worker's start. The cancellation topic is
/// small, so read at the same pace it runs ahead and parks many of its records; each one is
/// released when its booking arrives, and every cancellation applies.
#[test]
fn cancellations_that_run_ahead_of_a_booking_backlog_all_apply() {
    let Some(s) = Setup::new("backlog") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let id = |n: usize| format!("backlog_{n:04}");
    for n in 0..2000 {
        s.book(&id(n), "owner", "room_1");
    }
    s.producer.flush();
    for n in (0..2000).step_by(5) {
        s.cancel(&id(n), "owner");
    }
    s.producer.flush();
    let worker = s.start("backlog");
    wait_for("every booking, 400 of them cancelled", WAIT, || {
        s.db.value::<i64>("SELECT count(*) FROM bookings WHERE status = 'Cancelled'") == 400
            && s.db.bookings().len() == 2000
    });
    wait_for("no cancellation left parked", WAIT, || s.db.parked().is_empty());
    let parked = ends(&worker, "parked");
    eprintln!("cancellations parked on the way: {parked} of 400");
    assert!(parked <= 400, "each cancellation has one end");
    assert_eq!(worker.terminate(WAIT), 0);
}
