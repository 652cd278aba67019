//! The systemd unit (`scripts/booking-worker.service`) installed with its environment file in a
//! container whose PID 1 is systemd, starting the real binary against the real broker and
//! database: it applies records, stops cleanly within `TimeoutStopSec`, is restarted after a
//! `kill -9`, is not restarted after an invalid configuration (exit 2), and its `MemoryMax` is
//! reported as seen.

mod common;

use common::Setup;

use common::container_script as script;

#[test]
fn the_unit_runs_the_worker_under_systemd() {
    let Some(s) = Setup::new("systemd") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let mut env = s.env();
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
    let run = |args: &[&str]| script("tests/container/run-systemd.sh", args, &env).expect("podman ran before");
    run(&["down"]);
    run(&["up"]);

    let started = run(&["start"]).0;
    assert_eq!(started["ACTIVE_STATE"], "active");
    assert_ne!(started["MAIN_UID"], "0", "the unit's dynamic user, not root");
    for i in 0..20 {
        s.book(&format!("sd{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(20);

    // kill -9 of the worker: Restart=on-failure brings it back, and it carries on.
    let killed = run(&["kill9"]).0;
    assert_ne!(killed["MAIN_PID"], killed["OLD_MAIN_PID"]);
    assert!(killed["NRESTARTS"].parse::<u32>().unwrap() >= 1, "{killed:?}");
    for i in 20..40 {
        s.book(&format!("sd{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(40);
    let (memory, _) = run(&["memorymax"]);
    eprintln!(
        "[systemd] MemoryMax {} (limit {}, probe {})",
        memory["MEMORYMAX"], memory["MEMORY_LIMIT"], memory["MEMORYMAX_PROBE"]
    );

    // systemctl stop: a clean drain within TimeoutStopSec.
    let stopped = run(&["stop"]).0;
    assert_eq!(
        (stopped["EXEC_MAIN_CODE"].as_str(), stopped["EXEC_MAIN_STATUS"].as_str()),
        ("exited", "0"),
        "{stopped:?}"
    );
    let seconds: f64 = stopped["STOP_SECONDS"].parse().unwrap();
    assert!(seconds < 45.0, "the stop took {seconds} s, past TimeoutStopSec");
    let (_, journal) = run(&["journal"]);
    assert!(journal.lines().filter(|l| !l.is_empty()).count() > 20);
    for line in journal.lines().filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }

    // An invalid configuration exits 2, which the unit does not restart.
    let bad = run(&["bad-config"]).0;
    assert_eq!(
        (bad["EXEC_MAIN_STATUS"].as_str(), bad["NRESTARTS"].as_str()),
        ("2", "0"),
        "{bad:?}"
    );
    run(&["down"]);
    let rows = s.db.bookings();
    assert_eq!(rows.len(), 40);
}
