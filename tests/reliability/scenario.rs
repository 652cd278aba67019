//! The scenario runner: one scenario's database, topics, stream, workers and faults, the wait
//! for everything to be consumed, the comparison with the ledger, and the report of one JSON line.

use crate::common::{self, Setup, TestDb, TestProducer, WorkerProcess, WAIT};
use crate::ledger::{compare, planned, Fixtures, Tally};
use crate::processes::{check_logs, warnings, WorkerLog};
use crate::progress::{caught_up, first_write_after, longest_write_pause};
use crate::publisher::{publish, PlannedRecord, Topics};
use booking_worker::loadgen::Expected;
use chrono::{DateTime, Utc};
use rdkafka::consumer::BaseConsumer;
use rdkafka::ClientConfig;
use serde_json::json;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bookings per scenario in the normal test run.
const DEFAULT_BOOKINGS: usize = 2000;

/// Bookings per scenario: `RELIABILITY_EVENTS`, or the short default.
fn bookings() -> usize {
    match std::env::var("RELIABILITY_EVENTS") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("RELIABILITY_EVENTS must be a number, got {v:?}")),
        _ => DEFAULT_BOOKINGS,
    }
}

/// How long a stream of `bookings` flows when a scenario's short stream takes `base`: longer
/// streams are stretched (50 000 bookings: three times as long, about 700 records a second), so
/// that every fault still lands while records flow.
fn stream_duration(base: Duration, bookings: usize) -> Duration {
    base.mul_f64(1.0 + bookings as f64 / 25_000.0)
}

/// How long a scenario waits, after its stream, for everything to be consumed and committed.
fn settle_timeout(bookings: usize) -> Duration {
    Duration::from_secs(120 + (bookings / 200) as u64)
}

/// The seed of this run's random choices: `RELIABILITY_SEED`, or the clock (printed either way).
fn seed() -> u64 {
    std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// A fault whose end was at `end`.
struct Fault {
    what: String,
    end: DateTime<Utc>,
}

/// One scenario: its database, topics, group, stream, workers and faults.
pub struct Scenario {
    name: &'static str,
    pub setup: Setup,
    pub fixtures: Fixtures,
    pub records: Vec<PlannedRecord>,
    pub expected: Expected,
    stream: Duration,
    started: Instant,
    /// When publishing began (wall clock, which the database shares on this machine).
    published_utc: Option<DateTime<Utc>>,
    /// The scenario's random choices, from the run's seed.
    pub rng: fastrand::Rng,
    faults: Vec<Fault>,
    /// Every worker's log, also of those already gone.
    logs: Vec<WorkerLog>,
    publisher: Option<JoinHandle<usize>>,
    published_at: Option<Instant>,
}

impl Scenario {
    /// A scenario on the suite's broker, whose short stream lasts `base`.
    pub fn new(name: &'static str, base: Duration) -> Option<Scenario> {
        let setup = Setup::new(name)?;
        Some(Scenario::with_setup(name, setup, base))
    }

    /// A scenario on a broker of its own.
    pub fn on_broker(name: &'static str, base: Duration, brokers: &str) -> Option<Scenario> {
        let mut services = common::services()?;
        services.brokers = brokers.to_string();
        let setup = Setup {
            db: TestDb::create(&services, name),
            producer: TestProducer::new(&services),
            bookings: common::unique(&format!("booking-events-{name}")),
            cancels: common::unique(&format!("booking-cancellations-{name}")),
            group: common::unique(&format!("group-{name}")),
            services,
        };
        Some(Scenario::with_setup(name, setup, base))
    }

    fn with_setup(name: &'static str, setup: Setup, base: Duration) -> Scenario {
        let seed = seed();
        let n = bookings();
        eprintln!("[{name}] {n} bookings, seed {seed} (RELIABILITY_SEED={seed} repeats the random choices)");
        let fixtures = Fixtures::create(&setup.db);
        let (records, expected) = planned(&fixtures, n, name, seed);
        Scenario {
            name,
            setup,
            fixtures,
            records,
            expected,
            stream: stream_duration(base, n),
            started: Instant::now(),
            published_utc: None,
            rng: fastrand::Rng::with_seed(seed),
            faults: Vec::new(),
            logs: Vec::new(),
            publisher: None,
            published_at: None,
        }
    }

    /// Starts a worker of this scenario's group.
    pub fn spawn(&mut self, name: &str, extra: &[(&str, &str)]) -> WorkerProcess {
        let worker = self.setup.start_with(name, extra);
        self.logs.push(WorkerLog {
            name: name.to_string(),
            stdout: Arc::clone(&worker.lines),
            stderr: Arc::clone(&worker.stderr_lines),
        });
        worker
    }

    /// Starts publishing the stream; it flows for `self.stream`.
    pub fn publish(&mut self) {
        let records = Arc::new(self.records.clone());
        self.published_at = Some(Instant::now());
        self.published_utc = Some(Utc::now());
        let topics = Topics {
            bookings: self.setup.bookings.clone(),
            cancellations: self.setup.cancels.clone(),
        };
        self.publisher = Some(publish(&self.setup.services, topics, records, self.stream));
    }

    /// Sleeps until `fraction` of the stream's duration has passed since publishing began.
    pub fn at(&self, fraction: f64) {
        let due = self.published_at.expect("publishing started") + self.stream.mul_f64(fraction);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Notes that a fault ended now.
    pub fn fault_ended(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!(
            "[{}] {:>6.1}s fault over: {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        self.faults.push(Fault { what, end: Utc::now() });
    }

    /// Prints `what` with the scenario's name and the seconds since it began.
    pub fn note(&self, what: &str) {
        eprintln!("[{}] {:>6.1}s {what}", self.name, self.started.elapsed().as_secs_f64());
    }

    /// Waits until the worker has written something after `since` (or `timeout` passes).
    pub fn wait_progress(&self, since: DateTime<Utc>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while first_write_after(&self.setup.db, since).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the stream to be published, consumed and committed; stops the workers still
    /// running (each must exit 0); compares the database with the ledger; checks every log line;
    /// reports; and fails on anything lost or doubled.
    pub fn finish(mut self, workers: Vec<WorkerProcess>) {
        self.wait_published();
        let consumed = self.wait_consumed(settle_timeout(bookings()));
        if consumed {
            self.note("every record consumed and committed");
        } else {
            self.note("NOT everything was consumed and committed in time");
        }
        stop(workers);
        let tally = compare(&self.setup.db, &self.fixtures, &self.expected, self.records.len());
        let worst = self.note_recoveries();
        let stall = longest_write_pause(&self.setup.db, self.published_utc.expect("publishing started"));
        self.note(&format!("longest pause between durable writes: {stall:.2}s"));
        for (n, msg) in warnings(&self.logs).iter().take(12) {
            self.note(&format!("logged {n:>5} x {msg}"));
        }
        let line = self.report_line(&tally, worst, stall);
        eprintln!("[{}] {line}", self.name);
        append_to_report(&line);
        check_logs(&self.logs);
        assert!(
            tally.lost == 0 && tally.duplicated == 0 && tally.mismatched == 0,
            "[{}] lost {}, duplicated {}, mismatched {}, parked left {}:\n{}",
            self.name,
            tally.lost,
            tally.duplicated,
            tally.mismatched,
            tally.parked_left,
            tally.problems.join("\n")
        );
        assert!(consumed, "the stream was not consumed and committed in time");
    }

    /// Waits for the publisher to deliver the whole stream, every record of it.
    fn wait_published(&mut self) {
        let failed = self
            .publisher
            .take()
            .expect("publishing started")
            .join()
            .expect("the publisher thread");
        assert_eq!(failed, 0, "deliveries failed: the stream is not the planned one");
        self.note("stream published");
    }

    /// Notes how soon the worker wrote after each fault; returns the slowest (None: no write
    /// after any fault, or no fault).
    fn note_recoveries(&self) -> Option<f64> {
        let recover: Vec<(String, Option<f64>)> = self
            .faults
            .iter()
            .map(|f| (f.what.clone(), first_write_after(&self.setup.db, f.end)))
            .collect();
        for (what, seconds) in &recover {
            match seconds {
                Some(s) => self.note(&format!("recovered {s:.2}s after: {what}")),
                None => self.note(&format!("no write after: {what}")),
            }
        }
        recover
            .iter()
            .filter_map(|(_, s)| *s)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
    }

    /// The scenario's figures as one JSON object: what the comparison found, the slowest
    /// recovery, the longest pause between writes and how long the scenario took.
    fn report_line(&self, tally: &Tally, worst: Option<f64>, stall: f64) -> serde_json::Value {
        let seconds = self.started.elapsed().as_secs_f64();
        let test = std::thread::current().name().unwrap_or_default().to_string();
        json!({
            "scenario": self.name,
            "test": test,
            "events": tally.events,
            "bookings": self.expected.bookings.len(),
            "applied": tally.applied,
            "dead_lettered": tally.dead_lettered,
            "lost": tally.lost,
            "duplicated": tally.duplicated,
            "mismatched": tally.mismatched,
            "faults": self.faults.len(),
            "recover_seconds": worst.map(|s| (s * 100.0).round() / 100.0),
            "longest_pause_seconds": (stall * 100.0).round() / 100.0,
            "seconds": (seconds * 10.0).round() / 10.0,
        })
    }

    /// Waits until the group's committed offsets reach the end of every partition of both topics.
    fn wait_consumed(&self, timeout: Duration) -> bool {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.setup.services.brokers)
            .set("group.id", &self.setup.group)
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("create the offsets client");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if caught_up(&consumer, &[&self.setup.bookings, &self.setup.cancels]) == Some(true) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }
}

/// Stops the workers still running with SIGTERM; each must exit 0.
fn stop(workers: Vec<WorkerProcess>) {
    for mut w in workers {
        if w.is_running() {
            w.signal("TERM");
        }
        let code = w.wait(WAIT);
        assert_eq!(code, 0, "{} did not stop cleanly", w.name);
    }
}

/// Appends `line` to the file `RELIABILITY_REPORT` names, when it names one.
fn append_to_report(line: &serde_json::Value) {
    if let Ok(path) = std::env::var("RELIABILITY_REPORT") {
        if !path.is_empty() {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open RELIABILITY_REPORT {path}: {e}"));
            file.write_all(format!("{line}\n").as_bytes())
                .expect("append to RELIABILITY_REPORT");
        }
    }
}
