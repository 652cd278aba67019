//! The processes around a scenario: a broker of its own on free ports, and the workers' logs,
//! kept after the workers are gone and checked at the end.

use crate::common;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// A single-node broker of this test's own, from scripts/kafka.sh on free ports, that the test
/// can stop and start again with its data kept. Stopped, and its data deleted, when dropped.
pub struct OwnBroker {
    port: u16,
    controller_port: u16,
    state_dir: PathBuf,
    /// The bootstrap address of this broker.
    pub brokers: String,
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        let port = free_port_below_ephemeral(&[]);
        let controller_port = free_port_below_ephemeral(&[port]);
        let state_dir = std::env::temp_dir().join(common::unique("reliability-kafka"));
        let broker = OwnBroker {
            port,
            controller_port,
            state_dir,
            brokers: format!("127.0.0.1:{port}"),
        };
        broker.kafka("start", false);
        broker
    }

    /// Runs `scripts/kafka.sh command` for this broker; `keep_data` keeps its records on a stop.
    pub fn kafka(&self, command: &str, keep_data: bool) {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg(command)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("KAFKA_STATE_DIR", &self.state_dir)
            .env("KAFKA_KEEP_DATA", if keep_data { "1" } else { "0" })
            .env_remove("KAFKA_DATA_DIR")
            .output()
            .expect("run scripts/kafka.sh");
        assert!(
            out.status.success(),
            "scripts/kafka.sh {command} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg("stop")
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_STATE_DIR", &self.state_dir)
            .env("KAFKA_KEEP_DATA", "0")
            .output();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A free port in 20000-32199, below Linux's ephemeral range, so that no outgoing connection
/// takes it while a stopped broker is away.
fn free_port_below_ephemeral(avoid: &[u16]) -> u16 {
    let mut rng = fastrand::Rng::new();
    for _ in 0..500 {
        let port = rng.u16(20000..32200);
        if avoid.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            return port;
        }
    }
    panic!("no free port in 20000-32199");
}

/// A worker's stdout and stderr lines, kept after it is gone.
pub struct WorkerLog {
    pub name: String,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// Warnings and errors the workers logged, by message, most frequent first.
pub fn warnings(logs: &[WorkerLog]) -> Vec<(usize, String)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for log in logs {
        for line in log.stdout.lock().unwrap().iter() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let level = v["level"].as_str().unwrap_or_default();
            if (level == "WARN" || level == "ERROR") && v["msg"] != "record dead-lettered" {
                let msg = v["msg"].as_str().unwrap_or_default();
                *counts.entry(format!("{level} {msg:.120}")).or_default() += 1;
            }
        }
    }
    let mut out: Vec<(usize, String)> = counts.into_iter().map(|(m, n)| (n, m)).collect();
    out.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    out
}

/// No worker panicked, and every line on stdout is one JSON object.
pub fn check_logs(logs: &[WorkerLog]) {
    for WorkerLog { name, stdout, stderr } in logs {
        for line in stdout.lock().unwrap().iter() {
            assert!(!line.contains("panicked"), "{name} logged a panic: {line}");
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(
                parsed.as_ref().is_ok_and(serde_json::Value::is_object),
                "{name} wrote a line that is not a JSON object: {line:.300}"
            );
        }
        for line in stderr.lock().unwrap().iter() {
            assert!(!line.contains("panicked"), "{name} panicked: {line}");
        }
    }
}
