//! The systemd unit (`scripts/booking-worker.service`) installed with its environment file in a
//! container whose PID 1 is systemd, starting the real binary against the real broker and
//! database: `systemctl start` returns once the worker sent READY=1, its StatusText says what it
//! does (starting, consuming, halted with the SQLSTATE, consuming again after the grant), a halted
//! worker keeps the watchdog fed, a writer wedged by a fail point stops the pings and systemd
//! restarts the worker without losing or doubling a booking; it applies records, stops cleanly
//! within `TimeoutStopSec`, is restarted after a `kill -9`, is not restarted after an invalid
//! configuration (exit 2), and its `MemoryMax` is reported as seen.

use crate::common;

use common::container_script as script;
use common::{http_get, metric_sum, parse_prometheus, wait_for, Setup, WAIT};
use std::collections::HashMap;
use std::time::Duration;

type Run<'a> = &'a dyn Fn(&[&str]) -> HashMap<String, String>;

/// Books `prefix{range}` and waits until the table holds `total` rows.
fn book(s: &Setup, range: std::ops::Range<usize>, total: usize) {
    for i in range {
        s.book(&format!("sd{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(total);
}

/// Waits until the unit's StatusText satisfies `want`; returns the last `state`.
fn wait_status(run: Run, what: &str, want: impl Fn(&str) -> bool) -> HashMap<String, String> {
    let mut last = HashMap::new();
    wait_for(what, WAIT, || {
        last = run(&["state"]);
        want(&last["STATUS_TEXT"])
    });
    last
}

/// Type=notify: `systemctl start` returns once READY=1 came; the status said "starting" before
/// and names the partitions the worker holds after.
fn starts_when_ready(run: Run, metrics_addr: &str) {
    // The fail point holds the worker before it subscribes, so that the starting phase is seen.
    run(&["dropin", "failpoint", "Environment=FAILPOINTS=subscribe=sleep(3000)"]);
    let started = run(&["start"]);
    run(&["dropin", "failpoint"]);
    assert_eq!(started["ACTIVE_STATE"], "active");
    assert_ne!(started["MAIN_UID"], "0", "the unit's dynamic user, not root");
    assert_eq!(started["ACTIVE_AFTER_START"], "active", "{started:?}");
    assert!(started["STARTING_STATUS"].starts_with("starting: "), "{started:?}");
    let (_, body) = http_get(metrics_addr, "/metrics").expect("metrics");
    let partitions = metric_sum(&parse_prometheus(&body), "booking_worker_assigned_partitions", &[]);
    assert!(partitions >= 2.0, "both topics assigned: {partitions}");
    assert_eq!(started["STATUS_TEXT"], format!("consuming {partitions} partitions"));
}

/// A revoked grant halts the worker: StatusText names the SQLSTATE and its remedy, and the
/// watchdog stays fed for longer than twice WatchdogSec (no restart); the grant back resumes it.
fn halts_and_resumes_under_the_watchdog(s: &Setup, run: Run, role: &str) {
    let before = run(&["state"]);
    s.db.exec(&format!("REVOKE INSERT ON bookings FROM {role}"));
    for i in 40..50 {
        s.book(&format!("sd{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let halted = wait_status(run, "StatusText to name SQLSTATE 42501", |t| {
        t.starts_with("halted: SQLSTATE 42501: ")
    });
    assert!(halted["STATUS_TEXT"].contains("grant it what the README"), "{halted:?}");
    std::thread::sleep(Duration::from_secs(25));
    let still = run(&["state"]);
    assert_eq!(
        (still["ACTIVE_STATE"].as_str(), &still["MAIN_PID"], &still["NRESTARTS"]),
        ("active", &before["MAIN_PID"], &before["NRESTARTS"]),
        "a halted worker keeps the watchdog fed: {still:?}"
    );
    assert!(
        still["STATUS_TEXT"].starts_with("halted: SQLSTATE 42501: "),
        "{still:?}"
    );
    assert_eq!(s.db.bookings().len(), 40, "nothing applied while halted");
    s.db.exec(&format!("GRANT INSERT ON bookings TO {role}"));
    s.wait_rows(50);
    wait_status(run, "StatusText to say consuming again", |t| {
        t.starts_with("consuming ")
    });
}

/// A fail point wedges every writer in its first batch: the pings stop, systemd kills the worker
/// (Result=watchdog) and starts it again, and the new worker applies the records once.
fn a_wedged_writer_is_restarted_by_the_watchdog(s: &Setup, run: Run) {
    run(&[
        "dropin",
        "failpoint",
        "Environment=FAILPOINTS=writer-batch=sleep(600000)",
    ]);
    assert_eq!(run(&["stop"])["EXEC_MAIN_STATUS"], "0");
    run(&["start"]);
    // The running worker keeps the fail point; the one systemd starts next has none.
    run(&["dropin", "failpoint"]);
    for i in 50..60 {
        s.book(&format!("sd{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let restarted = run(&["wait-restart"]);
    assert_eq!(restarted["SEEN_RESULT"], "watchdog", "{restarted:?}");
    assert!(
        restarted["WATCHDOG_TIMEOUTS"].parse::<u32>().unwrap() >= 1,
        "{restarted:?}"
    );
    s.wait_rows(60);
}

#[test]
fn the_unit_runs_the_worker_under_systemd() {
    let Some(s) = Setup::new("systemd") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let (role, password) = s.db.worker_role();
    let mut env = s.env();
    env.push(("DB_USER".into(), role.clone()));
    env.push(("DB_PASSWORD".into(), password));
    env.push(("RETRY_MAX_BACKOFF_MS".into(), "1000".into()));
    env.push(("KAFKA_PROP_SESSION_TIMEOUT_MS".into(), "6000".into()));
    env.push(("KAFKA_PROP_HEARTBEAT_INTERVAL_MS".into(), "500".into()));
    env.push(("WAIT_READY".into(), "1".into()));
    env.push((
        "SYSTEMD_CONTAINER".into(),
        common::unique("bw-systemd").replace('_', "-"),
    ));
    if script("scripts/container-image.sh", &["systemd"], &env).is_none() {
        return;
    }
    let run = |args: &[&str]| {
        script("tests/container/run-systemd.sh", args, &env)
            .expect("podman ran before")
            .0
    };
    run(&["down"]);
    let _down = Down(&env);
    let up = run(&["up"]);

    let unit = run(&["state"]);
    assert_eq!(
        (
            unit["TYPE"].as_str(),
            unit["NOTIFY_ACCESS"].as_str(),
            unit["WATCHDOG_SEC"].as_str()
        ),
        ("notify", "main", "90s"),
        "{unit:?}"
    );
    // A short watchdog for the whole run, so that a wedge is caught within the test's patience
    // and every other step shows it is fed.
    run(&["dropin", "watchdog", "WatchdogSec=10s"]);
    assert_eq!(run(&["state"])["WATCHDOG_SEC"], "10s");
    starts_when_ready(&run, &up["METRICS_ADDR"]);
    assert_eq!(run(&["state"])["WATCHDOG_USEC"], "10s", "the running worker is watched");
    book(&s, 0..20, 20);

    // kill -9 of the worker: Restart=on-failure brings it back, and it carries on.
    let killed = run(&["kill9"]);
    assert_ne!(killed["MAIN_PID"], killed["OLD_MAIN_PID"]);
    assert!(killed["NRESTARTS"].parse::<u32>().unwrap() >= 1, "{killed:?}");
    book(&s, 20..40, 40);
    let memory = run(&["memorymax"]);
    eprintln!(
        "[systemd] MemoryMax {} (limit {}, probe {})",
        memory["MEMORYMAX"], memory["MEMORY_LIMIT"], memory["MEMORYMAX_PROBE"]
    );

    halts_and_resumes_under_the_watchdog(&s, &run, &role);
    a_wedged_writer_is_restarted_by_the_watchdog(&s, &run);

    // systemctl stop: a clean drain within TimeoutStopSec.
    let stopped = run(&["stop"]);
    assert_eq!(
        (stopped["EXEC_MAIN_CODE"].as_str(), stopped["EXEC_MAIN_STATUS"].as_str()),
        ("exited", "0"),
        "{stopped:?}"
    );
    let seconds: f64 = stopped["STOP_SECONDS"].parse().unwrap();
    assert!(seconds < 45.0, "the stop took {seconds} s, past TimeoutStopSec");
    assert_eq!(
        stopped["STATUS_TEXT"], "draining: shutting down",
        "STOPPING=1 came with its status"
    );
    let journal = script("tests/container/run-systemd.sh", &["journal"], &env).unwrap().1;
    assert!(journal.lines().filter(|l| !l.is_empty()).count() > 20);
    for line in journal.lines().filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(
        journal.contains("watchdog pings stopped"),
        "the wedged worker said why the pings stopped"
    );

    // An invalid configuration exits 2, which the unit does not restart.
    let bad = run(&["bad-config"]);
    assert_eq!(
        (bad["EXEC_MAIN_STATUS"].as_str(), bad["NRESTARTS"].as_str()),
        ("2", "0"),
        "{bad:?}"
    );
    run(&["down"]);
    every_booking_once(&s, 60);
}

/// Removes the container when the test ends, also when it fails.
struct Down<'a>(&'a [(String, String)]);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| script("tests/container/run-systemd.sh", &["down"], self.0));
    }
}

/// Every published booking is in the table exactly once: none lost, none doubled.
fn every_booking_once(s: &Setup, n: usize) {
    let rows = s.db.bookings();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        *per_id.entry(row.external_id.clone().unwrap_or_default()).or_default() += 1;
    }
    let expected: Vec<String> = (0..n).map(|i| format!("sd{i}")).collect();
    let missing: Vec<&String> = expected.iter().filter(|id| !per_id.contains_key(*id)).collect();
    let doubled: Vec<(&String, &usize)> = per_id.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        missing.is_empty() && doubled.is_empty(),
        "lost {missing:?}, doubled {doubled:?}"
    );
    assert_eq!(rows.len(), n);
}
