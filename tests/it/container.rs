//! The container image built from the project's own Dockerfile and run with podman, against the
//! real broker and database: it answers its health check, runs as uid 10001 on a read-only root
//! filesystem, stops cleanly within the drain deadline, and a SIGKILL followed by a new container
//! loses and doubles nothing. The base image is a local stand-in built from Debian's packages
//! (`scripts/container-image.sh`).

use crate::common;

use common::{wait_for, Setup, WAIT};
use std::collections::HashMap;
use std::process::Command;

/// Runs a container script; `None` when podman cannot run here (and services are not required).
fn script(path: &str, args: &[&str], env: &[(String, String)]) -> Option<HashMap<String, String>> {
    common::container_script(path, args, env).map(|(values, _)| values)
}

/// The worker's settings for this test, with short group sessions as the other tests use.
fn settings(s: &Setup) -> Vec<(String, String)> {
    let mut env = s.env();
    env.push(("KAFKA_PROP_SESSION_TIMEOUT_MS".into(), "6000".into()));
    env.push(("KAFKA_PROP_HEARTBEAT_INTERVAL_MS".into(), "500".into()));
    env.push(("WAIT_READY".into(), "1".into()));
    env
}

/// Every booking `prefix0..prefix{n}` exists exactly once.
fn each_once(s: &Setup, prefix: &str, n: usize) {
    let rows = s.db.bookings();
    for i in 0..n {
        let id = format!("{prefix}{i}");
        let count = rows.iter().filter(|b| b.external_id.as_deref() == Some(&id)).count();
        assert_eq!(count, 1, "{id} has {count} rows");
    }
}

#[test]
fn the_image_runs_as_operators_run_it() {
    let Some(s) = Setup::new("image") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let env = settings(&s);
    let Some(built) = script("scripts/container-image.sh", &["worker"], &env) else {
        return;
    };
    eprintln!("[image] built {} in {} s", built["IMAGE"], built["IMAGE_SECONDS"]);
    let run = |args: &[&str]| script("tests/container/run-image.sh", args, &env).expect("podman ran before");
    let names = [unique_name("a"), unique_name("b"), unique_name("c")];
    for name in &names {
        run(&["rm", name]);
    }

    let started = run(&["start", &names[0]]);
    assert_eq!(started["READYZ"], "200", "{started:?}");
    for i in 0..20 {
        s.book(&format!("img{i}"), "owner", "room_1");
    }
    s.cancel("img0", "owner");
    s.producer.flush();
    s.wait_status("img0", "Cancelled");
    s.wait_rows(20);
    assert_eq!(run(&["health", &names[0]])["HEALTH"], "healthy");
    assert_eq!(run(&["uid", &names[0]])["UID"], "10001");
    let rootfs = run(&["rootfs", &names[0]]);
    assert_eq!(
        (rootfs["ROOT_WRITE"].as_str(), rootfs["TMP_WRITE"].as_str()),
        ("refused", "refused")
    );
    let stopped = run(&["stop", &names[0]]);
    assert_eq!(stopped["EXIT_CODE"], "0", "podman stop is a clean shutdown");
    let seconds: f64 = stopped["STOP_SECONDS"].parse().unwrap();
    assert!(seconds < 30.0, "the stop took {seconds} s, past SHUTDOWN_TIMEOUT_SECS");

    // SIGKILL mid-stream, then a new container: nothing lost, nothing doubled.
    run(&["start", &names[1]]);
    for i in 20..200 {
        s.book(&format!("img{i}"), "owner", "room_1");
    }
    s.producer.flush();
    wait_for("some of the new bookings", WAIT, || s.db.bookings().len() > 25);
    assert_eq!(run(&["kill", &names[1]])["EXIT_CODE"], "137");
    run(&["start", &names[2]]);
    s.wait_rows(200);
    std::thread::sleep(std::time::Duration::from_secs(1));
    each_once(&s, "img", 200);
    assert_eq!(s.db.bookings().len(), 200);
    assert!(s.db.dead_letters().is_empty());
    let logs = Command::new("bash")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/container/run-image.sh"),
            "logs",
            &names[2],
        ])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&logs.stdout).lines().filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert_eq!(run(&["stop", &names[2]])["EXIT_CODE"], "0");
    for name in &names {
        run(&["rm", name]);
    }
}

/// A container name of this test run.
fn unique_name(tag: &str) -> String {
    common::unique(&format!("bw-{tag}")).replace('_', "-")
}
