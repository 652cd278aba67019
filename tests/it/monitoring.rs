//! The alert rules and the dashboard of `scripts/monitoring/` against a real Prometheus (Debian's
//! `prometheus`) scraping a real worker every second: a revoked grant fires the halted alert and
//! the grant's return resolves it; a malformed record fires the dead-letters alert; every panel of
//! the dashboard evaluates, and those the scenario exercises return data.

use crate::common;

use common::{free_local_addr, http_get, unique, wait_for, Setup, WAIT};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/monitoring/alerts.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/monitoring/dashboard.json");

/// The scrape job's name, which the rules expect of `up` and the process metrics.
const JOB: &str = "booking-worker";

/// What the test gives Grafana's `$__rate_interval`: eight scrapes.
const RATE_INTERVAL: &str = "8s";

/// How long an alert with `for: 1m` may take to fire, scrapes and evaluations included.
const FIRING: Duration = Duration::from_secs(180);

/// A Prometheus server of the test's own on a free loopback port, its TSDB in a temporary
/// directory. Dropping it (also when the test fails) stops it and removes the directory.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` with the rules of `alerts.yml`, or `None` when the
    /// binary is missing and services are not required.
    fn start(target: &str) -> Option<Prometheus> {
        if Command::new("prometheus").arg("--version").output().is_err() {
            let message = "prometheus not found (scripts/install-deps.sh installs Debian's prometheus package)";
            assert!(
                std::env::var("BOOKING_WORKER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "required service missing: {message}"
            );
            eprintln!("SKIPPED: {message}");
            return None;
        }
        let dir = std::env::temp_dir().join(unique("bw-prometheus"));
        std::fs::create_dir_all(&dir).expect("create Prometheus's directory");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {RULES:?}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{target:?}]\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create Prometheus's log");
        let addr = free_local_addr();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, dir, addr };
        wait_for("Prometheus to be ready", WAIT, || {
            http_get(&prometheus.addr, "/-/ready").is_some_and(|(status, _)| status == 200)
        });
        Some(prometheus)
    }

    /// The `data` of an API answer, or its error.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(&self.addr, path).ok_or_else(|| format!("no answer to {path}"))?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: {status} {e}: {body}"))?;
        if status != 200 || answer["status"] != "success" {
            return Err(format!("{path}: {status} {body}"));
        }
        Ok(answer["data"].clone())
    }

    /// The result of an instant query: its series, or the error Prometheus gave.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The active alerts (pending or firing) named `name`.
    fn alerts(&self, name: &str) -> Vec<Value> {
        let data = self.api("/api/v1/alerts").expect("the alerts");
        data["alerts"]
            .as_array()
            .expect("a list of alerts")
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }

    /// Waits until the worker has been scraped.
    fn wait_scraped(&self) {
        wait_for("Prometheus to scrape the worker", WAIT, || {
            self.query(&format!("up{{job=\"{JOB}\"}} == 1"))
                .is_ok_and(|r| !r.is_empty())
        });
    }

    /// Waits until alert `name` fires, noting each state it goes through; returns the states and
    /// the firing alert.
    fn wait_firing(&self, name: &str) -> (Vec<String>, Value) {
        let mut states: Vec<String> = Vec::new();
        let mut firing = Value::Null;
        wait_for(&format!("{name} to fire"), FIRING, || {
            for alert in self.alerts(name) {
                let state = alert["state"].as_str().unwrap_or_default().to_string();
                if states.last() != Some(&state) {
                    states.push(state.clone());
                }
                if state == "firing" {
                    firing = alert;
                }
            }
            !firing.is_null()
        });
        (states, firing)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("[prometheus] last log lines, newest first:\n{}", tail.join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_revoked_grant_fires_the_halted_alert_and_the_grant_resolves_it() {
    let Some(s) = Setup::new("mon_halt") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let (role, password) = s.db.worker_role();
    let worker = s.start_with(
        "mon_halt",
        &[
            ("DB_USER", &role),
            ("DB_PASSWORD", &password),
            ("RETRY_MAX_BACKOFF_MS", "500"),
        ],
    );
    let Some(prometheus) = Prometheus::start(&worker.metrics_addr) else {
        return;
    };
    for i in 0..5 {
        s.book(&format!("before{i}"), "owner", "room_1");
    }
    s.producer.flush();
    s.wait_rows(5);
    prometheus.wait_scraped();
    assert!(prometheus.alerts("BookingWorkerHalted").is_empty());

    s.db.exec(&format!("REVOKE INSERT ON bookings FROM {role}"));
    for i in 0..5 {
        s.book(&format!("after{i}"), "owner", "room_1");
    }
    s.producer.flush();
    let (states, alert) = prometheus.wait_firing("BookingWorkerHalted");
    assert_eq!(states, ["pending", "firing"], "held for its minute before firing");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["instance"], worker.metrics_addr.as_str());
    assert_eq!(alert["labels"]["job"], JOB);
    assert_eq!(
        alert["annotations"]["summary"],
        format!(
            "booking-worker {} is halted: the database does not take its writes",
            worker.metrics_addr
        )
    );
    assert_eq!(s.db.bookings().len(), 5, "nothing is applied while halted");

    s.db.exec(&format!("GRANT INSERT ON bookings TO {role}"));
    s.wait_rows(10);
    wait_for("the halted alert to resolve", WAIT, || {
        prometheus.alerts("BookingWorkerHalted").is_empty()
    });
    assert_eq!(worker.terminate(WAIT), 0);
}

#[test]
fn a_malformed_record_fires_the_dead_letters_alert_and_every_panel_evaluates() {
    let Some(s) = Setup::new("mon_dead") else { return };
    s.db.user("owner@example.com", "owner");
    s.db.room("room_1");
    let worker = s.start("mon_dead");
    let Some(prometheus) = Prometheus::start(&worker.metrics_addr) else {
        return;
    };
    for i in 0..20 {
        s.book(&format!("ok{i}"), "owner", "room_1");
    }
    s.producer
        .send(&s.bookings, "broken", b"{\"bookingId\": \"broken\", ", &[]);
    s.producer.flush();
    s.wait_rows(20);
    wait_for("the dead letter", WAIT, || !s.db.dead_letters().is_empty());
    let reasons: Vec<String> = s.db.dead_letters().into_iter().map(|l| l.reason).collect();
    assert_eq!(reasons, ["malformed_json"]);

    let (_, alert) = prometheus.wait_firing("BookingWorkerDeadLetters");
    assert_eq!(alert["labels"]["reason"], "malformed_json");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert!(prometheus.alerts("BookingWorkerHalted").is_empty());
    let started = prometheus
        .query(&format!("process_start_time_seconds{{job=\"{JOB}\"}}"))
        .expect("the start time");
    assert_eq!(started.len(), 1, "the restart alert's metric is scraped: {started:?}");
    // A rate needs two samples in its window: wait until the window of $__rate_interval is full.
    wait_for("a rate interval of scrapes", WAIT, || {
        prometheus
            .query(&format!("count_over_time(up{{job=\"{JOB}\"}}[{RATE_INTERVAL}]) >= 7"))
            .is_ok_and(|r| r.len() == 1)
    });
    check_dashboard(&prometheus, &worker.metrics_addr, &s.bookings);
    assert_eq!(worker.terminate(WAIT), 0);
}

/// A panel of the dashboard: its title and its PromQL queries as written.
struct Panel {
    title: String,
    exprs: Vec<String>,
}

/// The dashboard's panels (those inside rows too) with their queries.
fn panels(dashboard: &Value) -> Vec<Panel> {
    let mut found = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner);
        }
        let Some(targets) = panel["targets"].as_array() else {
            continue;
        };
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}: the datasource is the variable",
            panel["title"]
        );
        found.push(Panel {
            title: panel["title"].as_str().unwrap_or_default().to_string(),
            exprs: targets
                .iter()
                .map(|t| t["expr"].as_str().expect("a PromQL expression").to_string())
                .collect(),
        });
    }
    found
}

/// `expr` with Grafana's variables and the dashboard's own replaced by values for this worker.
fn substitute(expr: &str, instance: &str) -> String {
    if expr.contains("rate(") || expr.contains("increase(") {
        assert!(
            expr.contains("[$__rate_interval]"),
            "a rate over $__rate_interval: {expr}"
        );
    }
    let text = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", "2s")
        .replace("$__range", "5m")
        .replace("${datasource}", "prometheus")
        .replace("$job", JOB)
        .replace("$instance", instance);
    assert!(!text.contains('$'), "a variable the test does not know: {expr}");
    text
}

/// The dashboard's variables: the datasource, and the job and instance found by their queries.
fn check_variables(prometheus: &Prometheus, dashboard: &Value, instance: &str) {
    let variables = dashboard["templating"]["list"].as_array().expect("variables");
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for (name, expected) in [("job", JOB), ("instance", instance)] {
        let variable = variables.iter().find(|v| v["name"] == name).expect("the variable");
        let query = substitute(variable["query"]["query"].as_str().expect("its query"), ".*");
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(selector, label): {query}"));
        let path = format!("/api/v1/label/{label}/values?match[]={}", encode(selector));
        let values = prometheus.api(&path).unwrap_or_else(|e| panic!("${name}: {e}"));
        assert_eq!(values, serde_json::json!([expected]), "${name} from {query}");
    }
}

/// Runs every panel's queries: each must evaluate, and the panels this scenario exercises must
/// show what it did.
fn check_dashboard(prometheus: &Prometheus, instance: &str, topic: &str) {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read dashboard.json")).expect("JSON");
    check_variables(prometheus, &dashboard, instance);
    let mut results = std::collections::HashMap::new();
    for panel in panels(&dashboard) {
        let mut series = Vec::new();
        for expr in &panel.exprs {
            let promql = substitute(expr, instance);
            let result = prometheus
                .query(&promql)
                .unwrap_or_else(|e| panic!("panel {:?}: {promql}: {e}", panel.title));
            series.extend(result);
        }
        eprintln!("[monitoring] panel {:?}: {} series", panel.title, series.len());
        results.insert(panel.title, series);
    }
    let panel = |title: &str| results.get(title).unwrap_or_else(|| panic!("no panel {title:?}"));
    let value = |s: &Value| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    assert!(
        panel("Throughput by end")
            .iter()
            .any(|s| s["metric"]["topic"] == topic && s["metric"]["end"] == "created"),
        "throughput of applied bookings"
    );
    assert!(panel("Dead letters and parked cancellations")
        .iter()
        .any(|s| s["metric"]["reason"] == "malformed_json"));
    assert_eq!(
        panel("Dead letters and parked cancellations").len(),
        3,
        "dead letters of one reason, parked now, released"
    );
    assert_eq!(panel("Halted").iter().map(value).collect::<Vec<_>>(), [0.0]);
    assert_eq!(panel("Ready").iter().map(value).collect::<Vec<_>>(), [1.0]);
    assert!(panel("Ready and halted").len() >= 4);
    assert!(
        panel("Bytes in flight and RSS").iter().any(|s| value(s) > 1e6),
        "an RSS"
    );
    assert!(panel("CPU").iter().any(|s| value(s) >= 0.0), "a CPU rate");
    assert!(
        panel("Kafka brokers")
            .iter()
            .any(|s| s["metric"]["__name__"] == "booking_worker_kafka_brokers_up" && value(s) >= 1.0),
        "a broker up"
    );
}
