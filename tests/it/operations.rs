//! Operating the worker against the real broker and database: the metrics endpoint against what a
//! load-generator run produced, readiness following the database, health that answers at once
//! while the database or the broker hangs (SIGSTOP of services of the test's own), and every
//! subcommand.

use crate::common;

use booking_worker::readiness;
use common::own::{Frozen, OwnBroker, OwnPostgres};
use common::{
    booking_json, free_local_addr, http_get, metric_sum, parse_prometheus, unique, wait_for, CuttableProxy, Setup, WAIT,
};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// One sample of a Prometheus scrape: name, labels, value.
type Sample = (String, std::collections::BTreeMap<String, String>, f64);

fn worker_command(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_booking-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run booking-worker")
}

fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// What one load-generator run published: its JSON summary and its ledger.
struct Published {
    summary: serde_json::Value,
    ledger: serde_json::Value,
}

impl Published {
    fn records(&self) -> u64 {
        self.ledger["records"].as_u64().unwrap()
    }

    fn dead_letters(&self) -> u64 {
        self.ledger["dead_letters"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum()
    }
}

/// Runs the load generator for 400 bookings with every kind of trouble, into the setup's topics.
fn publish_with_loadgen(s: &Setup) -> Published {
    let ledger = std::env::temp_dir().join(format!("{}.json", unique("ledger")));
    let out = Command::new(env!("CARGO_BIN_EXE_booking-loadgen"))
        .args(["--count", "400", "--cancel-ratio", "0.3", "--unauthorized-ratio", "0.2"])
        .args([
            "--early-cancel-ratio",
            "0.2",
            "--duplicate-ratio",
            "0.05",
            "--bad-ratio",
            "0.05",
        ])
        .args([
            "--users",
            "user_123,bob,carol",
            "--rooms",
            "room_ocean_001,room_garden_101",
        ])
        .args(["--seed", "42", "--id-prefix", &unique("m")])
        .arg("--ledger")
        .arg(&ledger)
        .env("KAFKA_BROKERS", &s.services.brokers)
        .env("KAFKA_BOOKING_TOPIC", &s.bookings)
        .env("KAFKA_CANCELLATION_TOPIC", &s.cancels)
        .output()
        .expect("run booking-loadgen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let published = Published {
        summary: serde_json::from_slice(&out.stdout).expect("a JSON summary"),
        ledger: serde_json::from_slice(&std::fs::read(&ledger).unwrap()).unwrap(),
    };
    let _ = std::fs::remove_file(&ledger);
    assert_eq!(published.summary["delivered"].as_u64(), Some(published.records()));
    published
}

/// The counters of a scrape against what was published.
fn assert_counters_match(m: &[Sample], s: &Setup, published: &Published) {
    let bookings = published.ledger["bookings"].as_object().unwrap();
    let booking_records = published.records() - published.summary["cancellations"].as_u64().unwrap();
    assert_eq!(
        metric_sum(m, "booking_worker_events_total", &[("topic", &s.bookings)]),
        booking_records as f64
    );
    assert_eq!(
        metric_sum(
            m,
            "booking_worker_events_total",
            &[("topic", &s.bookings), ("end", "created")]
        ),
        bookings.len() as f64,
        "each distinct booking applied once"
    );
    for (reason, n) in published.ledger["dead_letters"].as_object().unwrap() {
        assert_eq!(
            metric_sum(m, "booking_worker_dead_letters_total", &[("reason", reason)]),
            n.as_f64().unwrap(),
            "dead letters of reason {reason}"
        );
    }
    let committed = metric_sum(m, "booking_worker_db_transactions_total", &[("result", "committed")]);
    assert!(committed >= 1.0);
    assert_eq!(metric_sum(m, "booking_worker_batch_size_count", &[]), committed);
    assert!(
        metric_sum(
            m,
            "booking_worker_processing_seconds_count",
            &[("event_type", "booking")]
        ) > 0.0
    );
    assert!(metric_sum(m, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(m.iter().any(|(n, _, _)| n == "booking_worker_channel_depth"));
    assert_eq!(metric_sum(m, "booking_worker_assigned_partitions", &[]), 8.0);
}

#[test]
fn metrics_match_what_a_load_generator_run_produced() {
    let Some(s) = Setup::new("metrics") else { return };
    for (email, name) in [
        ("a@example.com", "user_123"),
        ("b@example.com", "bob"),
        ("c@example.com", "carol"),
    ] {
        s.db.user(email, name);
    }
    for room in ["room_ocean_001", "room_garden_101"] {
        s.db.room(room);
    }
    let published = publish_with_loadgen(&s);
    let records = published.records();

    let worker = s.start_with(
        "metrics",
        &[
            ("KAFKA_STATS_INTERVAL_MS", "500"),
            ("PENDING_CHECK_INTERVAL_SECS", "1"),
            ("STATS_LOG_INTERVAL_SECS", "1"),
        ],
    );
    let bookings = published.ledger["bookings"].as_object().unwrap();
    wait_for("the ledger to be applied", WAIT, || {
        s.db.bookings().len() == bookings.len() && s.db.dead_letters().len() as u64 == published.dead_letters()
    });
    for row in s.db.bookings() {
        let want = &bookings[row.external_id.as_deref().unwrap()];
        assert_eq!(row.status, want["status"].as_str().unwrap(), "{row:?}");
    }

    let scrape = || parse_prometheus(&http_get(&worker.metrics_addr, "/metrics").expect("scrape").1);
    wait_for("every record counted and the lag at zero", WAIT, || {
        let m = scrape();
        metric_sum(&m, "booking_worker_events_total", &[]) == records as f64
            && m.iter().any(|(n, _, _)| n == "booking_worker_consumer_lag")
            && metric_sum(&m, "booking_worker_consumer_lag", &[]) == 0.0
            && metric_sum(&m, "booking_worker_parked_cancellations", &[]) == 0.0
    });
    assert_counters_match(&scrape(), &s, &published);

    wait_for("a stats line", WAIT, || {
        worker
            .json_lines()
            .iter()
            .any(|l| l["msg"] == "stats" && l["consumed"].as_u64() == Some(records))
    });
    assert_eq!(http_get(&worker.metrics_addr, "/healthz").unwrap().0, 200);
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn readiness_follows_the_database() {
    let Some(s) = Setup::new("ready") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    s.book("r0", "owner", "room_1");
    s.producer.flush();
    let proxy = CuttableProxy::start(&s.services.db_host, s.services.db_port);
    let port = proxy.port.to_string();
    let worker = s.start_with("ready", &[("DB_HOST", "127.0.0.1"), ("DB_PORT", &port)]);
    let ready = || http_get(&worker.metrics_addr, "/readyz").map(|(code, _)| code);
    wait_for("ready", WAIT, || ready() == Some(200));
    s.wait_rows(1);
    proxy.cut();
    wait_for("not ready while the database is away", WAIT, || ready() == Some(503));
    let body = http_get(&worker.metrics_addr, "/readyz").unwrap().1;
    assert!(body.contains("database"), "{body}");
    assert_eq!(
        http_get(&worker.metrics_addr, "/healthz").unwrap().0,
        200,
        "still alive"
    );
    proxy.restore();
    wait_for("ready again", WAIT, || ready() == Some(200));
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn check_reports_each_failure_with_its_exit_code() {
    let Some(s) = Setup::new("check") else { return };
    let env = s.env();
    let missing = worker_command(&env, &["check"]);
    assert_eq!(
        missing.status.code(),
        Some(5),
        "topics missing: {}",
        String::from_utf8_lossy(&missing.stdout)
    );
    s.book("c0", "nobody", "nowhere");
    s.producer.send(&s.cancels, "c0", b"{}", &[]);
    s.producer.flush();
    let ok = worker_command(&env, &["check"]);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&ok.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for check in ["config", "database", "kafka", "topics"] {
        assert!(lines.iter().any(|l| l["check"] == check), "{check} reported");
    }
    let no_db = worker_command(
        &with(&env, &[("DB_PORT", "1"), ("DB_CONNECT_TIMEOUT_SECS", "1")]),
        &["check"],
    );
    assert_eq!(no_db.status.code(), Some(3));
    let no_broker = worker_command(&with(&env, &[("KAFKA_BROKERS", "127.0.0.1:1")]), &["check"]);
    assert_eq!(no_broker.status.code(), Some(4));
    let bad_config = worker_command(&with(&env, &[("DB_SSLMODE", "sometimes")]), &["check"]);
    assert_eq!(bad_config.status.code(), Some(2));
}

#[test]
fn migrate_applies_once_and_refuses_a_database_without_the_schema() {
    let Some(s) = Setup::new("migratecmd") else { return };
    let out = worker_command(&s.env(), &["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"applied\":\"\""),
        "already migrated by the test setup"
    );
    s.db.exec("DROP SCHEMA booking_worker CASCADE; ALTER TABLE bookings DROP COLUMN external_id");
    let out = worker_command(&s.env(), &["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(
        "\"applied\":\"0001_booking_worker,0002_dead_letter_sqlstate,0003_legacy_match_index,0004_apply_batch,0005_apply_batch_v2\""
    ));
    s.db.exec("DROP TABLE bookings CASCADE");
    let out = worker_command(&s.env(), &["migrate"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sql/schema.sql"));
}

#[test]
fn a_dead_letter_is_listed_and_replayed_once_its_user_exists() {
    let Some(s) = Setup::new("replaycmd") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let payload = booking_json("late_b", "late_user", "room_1", 2, "2025-02-01", "2025-02-03");
    s.producer.send(
        &s.bookings,
        "late_b",
        payload.as_bytes(),
        &[("Baggage", b"trace-id=late")],
    );
    s.producer.send(
        &s.bookings,
        "ghost_b",
        booking_json("ghost_b", "ghost", "room_1", 1, "2025-02-01", "2025-02-02").as_bytes(),
        &[],
    );
    s.producer.flush();
    let worker = s.start("replaycmd");
    wait_for("two dead letters", WAIT, || s.db.dead_letters().len() == 2);
    assert_eq!(worker.terminate(WAIT), 0);
    let env = s.env();

    let list = worker_command(&env, &["dead-letters", "list", "--reason", "unknown_user"]);
    assert_eq!(list.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 2);
    let late = rows.iter().find(|r| r["booking_id"] == "late_b").unwrap();
    assert_eq!(late["baggage"], "trace-id=late");
    assert_eq!(late["topic"], s.bookings.as_str());
    assert!(late["payload"].as_str().unwrap().contains("late_user"));
    let bad_reason = worker_command(&env, &["dead-letters", "list", "--reason", "no_such_reason"]);
    assert_ne!(bad_reason.status.code(), Some(0));

    // Nothing changed yet: replaying fails again and says so.
    let id = late["id"].as_i64().unwrap().to_string();
    let again = worker_command(&env, &["dead-letters", "replay", "--id", &id]);
    assert_eq!(again.status.code(), Some(6));
    assert!(s.db.booking("late_b").is_none());

    s.db.user("late@example.com", "late_user");
    let replay = worker_command(&env, &["dead-letters", "replay", "--reason", "unknown_user"]);
    assert_eq!(replay.status.code(), Some(6), "ghost_b still has no user");
    let row = s.db.booking("late_b").expect("the replay created the booking");
    assert_eq!(
        (row.status.as_str(), row.start_date.as_str()),
        ("Accepted", "2025-02-01")
    );
    let pending = worker_command(&env, &["dead-letters", "list"]);
    let left: Vec<serde_json::Value> = String::from_utf8_lossy(&pending.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(left.len(), 1, "the replayed one is no longer listed");
    assert_eq!(left[0]["booking_id"], "ghost_b");
    let all = worker_command(&env, &["dead-letters", "list", "--include-replayed"]);
    let all = String::from_utf8_lossy(&all.stdout);
    let replayed: serde_json::Value = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["booking_id"] == "late_b")
        .unwrap();
    assert!(replayed["replayed_at"].is_string());
    let twice = worker_command(&env, &["dead-letters", "replay", "--id", &id]);
    assert_eq!(twice.status.code(), Some(0), "an already replayed letter is skipped");
    assert_eq!(s.db.bookings().len(), 1);
}

#[test]
fn healthcheck_asks_the_running_worker() {
    let Some(s) = Setup::new("health") else { return };
    let worker = s.start("health");
    let env = with(&s.env(), &[("METRICS_ADDR", &worker.metrics_addr)]);
    wait_for("a healthy worker", WAIT, || {
        worker_command(&env, &["healthcheck"]).status.code() == Some(0)
    });
    let nobody = with(&s.env(), &[("METRICS_ADDR", &free_local_addr())]);
    assert_eq!(worker_command(&nobody, &["healthcheck"]).status.code(), Some(1));
    let off = with(&s.env(), &[("METRICS_ADDR", "off")]);
    assert_eq!(worker_command(&off, &["healthcheck"]).status.code(), Some(1));
    assert_eq!(worker.terminate(WAIT), 0);
}

/// `GET path` and how long the answer took.
fn timed_get(addr: &str, path: &str) -> (Option<(u16, String)>, Duration) {
    let asked = Instant::now();
    let answer = http_get(addr, path);
    (answer, asked.elapsed())
}

/// The longest an endpoint may take to answer while a service hangs.
const PROMPT: Duration = Duration::from_millis(100);

/// Polls `/healthz` and `/metrics` every second for `span`: each must answer 200 within
/// [`PROMPT`]. Returns the `/readyz` answers seen meanwhile, with their time since the start.
fn poll_endpoints_for(addr: &str, span: Duration) -> Vec<(Duration, u16, String)> {
    let start = Instant::now();
    let mut readyz = Vec::new();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < span {
        for path in ["/healthz", "/metrics", "/readyz"] {
            let (answer, took) = timed_get(addr, path);
            let (status, body) = answer.unwrap_or_else(|| panic!("{path} did not answer"));
            assert!(took <= PROMPT, "{path} took {took:?} at {:?}", start.elapsed());
            slowest = slowest.max(took);
            if path == "/readyz" {
                readyz.push((start.elapsed(), status, body));
            } else {
                assert_eq!(status, 200, "{path} at {:?}: {body}", start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let first_503 = readyz
        .iter()
        .find(|(_, status, _)| *status == 503)
        .map(|(at, _, _)| *at);
    eprintln!("[endpoints] slowest answer {slowest:?}; /readyz first 503 after {first_503:?}");
    readyz
}

/// Every booking of the setup was written once: `n` rows, `n` distinct external ids.
fn assert_each_booking_once(s: &Setup, n: usize) {
    s.wait_rows(n);
    let rows = s.db.bookings();
    let ids: std::collections::BTreeSet<_> = rows.iter().map(|r| r.external_id.clone()).collect();
    assert_eq!((rows.len(), ids.len()), (n, n), "each booking once");
}

#[test]
fn health_answers_at_once_while_the_database_hangs() {
    let Some(around) = common::services() else { return };
    let pg = OwnPostgres::start();
    let s = Setup::with_services("dbhang", pg.services(&around));
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let worker = s.start_with("dbhang", &[("RETRY_MAX_BACKOFF_MS", "500")]);
    for i in 0..10 {
        s.book(&format!("h{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(10);
    wait_for("ready", WAIT, || {
        http_get(&worker.metrics_addr, "/readyz").is_some_and(|(c, _)| c == 200)
    });

    let frozen = Frozen::new(pg.pids());
    for i in 10..20 {
        s.book(&format!("h{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let readyz = poll_endpoints_for(&worker.metrics_addr, Duration::from_secs(30));
    drop(frozen);

    // The probe's deadline, one rest between probes and one poll of the test's.
    let bound = readiness::PROBE_DEADLINE + readiness::PROBE_EVERY + Duration::from_secs(2);
    let (at, _, body) = readyz
        .iter()
        .find(|(_, status, _)| *status == 503)
        .unwrap_or_else(|| panic!("/readyz never said 503: {readyz:?}"));
    assert!(*at <= bound, "503 only after {at:?}: {readyz:?}");
    assert!(body.contains("\"reason\":\"database: "), "{body}");
    assert!(
        readyz
            .iter()
            .filter(|(t, _, _)| *t > bound)
            .all(|(_, status, _)| *status == 503),
        "not ready for as long as the database hangs: {readyz:?}"
    );
    wait_for("ready again", WAIT, || {
        http_get(&worker.metrics_addr, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert_each_booking_once(&s, 20);
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn readiness_and_metrics_show_a_broker_that_does_not_answer() {
    let Some(around) = common::services() else { return };
    let broker = OwnBroker::start();
    let s = Setup::with_services(
        "brokerhang",
        common::Services {
            brokers: broker.brokers.clone(),
            ..around
        },
    );
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    for i in 0..5 {
        s.book(&format!("k{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let worker = s.start_with(
        "brokerhang",
        &[
            ("KAFKA_UNREACHABLE_READY_SECS", "5"),
            ("KAFKA_STATS_INTERVAL_MS", "500"),
        ],
    );
    s.wait_rows(5);
    wait_for("ready", WAIT, || {
        http_get(&worker.metrics_addr, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    let gauge = |name: &str| {
        let text = http_get(&worker.metrics_addr, "/metrics").unwrap().1;
        metric_sum(&parse_prometheus(&text), name, &[])
    };
    wait_for("a broker up", WAIT, || gauge("booking_worker_kafka_brokers_up") >= 1.0);
    assert!(gauge("booking_worker_kafka_last_contact_age_seconds") < 5.0);

    let frozen = Frozen::new(vec![broker.pid()]);
    let readyz = poll_endpoints_for(&worker.metrics_addr, Duration::from_secs(12));
    let age = gauge("booking_worker_kafka_last_contact_age_seconds");
    drop(frozen);
    let (_, _, body) = readyz
        .iter()
        .find(|(_, status, _)| *status == 503)
        .unwrap_or_else(|| panic!("/readyz never said 503: {readyz:?}"));
    assert!(body.contains("kafka: no broker has answered"), "{body}");
    assert!(age >= 5.0, "the last contact was {age} s ago");

    let mut last = None;
    let ready_again = |last: &mut Option<(u16, String)>| {
        *last = http_get(&worker.metrics_addr, "/readyz");
        last.as_ref().is_some_and(|(c, _)| *c == 200)
    };
    let deadline = Instant::now() + WAIT;
    while !ready_again(&mut last) {
        assert!(
            Instant::now() < deadline,
            "not ready again after the broker came back: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(gauge("booking_worker_kafka_last_contact_age_seconds") < 5.0);
    for i in 5..10 {
        s.book(&format!("k{i}"), "owner", "room_1");
    }
    s.producer.flush();
    assert_each_booking_once(&s, 10);
    assert_eq!(worker.terminate(WAIT), 0);
}
