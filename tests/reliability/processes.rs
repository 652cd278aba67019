//! The processes around a scenario: the workers' logs, kept after the workers are gone and
//! checked at the end. (The scenario's own broker is `common::own::OwnBroker`.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
