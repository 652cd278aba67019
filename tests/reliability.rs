//! The reliability harness: a known stream (the load generator's plan, and hostile records) flows
//! through the real broker and database while faults are injected, then the final database is
//! compared row by row with the exact expected ledger: nothing lost, nothing doubled.
//!
//! One test per scenario: SIGKILL ten times; PostgreSQL refusing connections and then having its
//! backends terminated; the broker stopped and restarted; three instances in one group rebalancing
//! (eager and cooperative); a flood of hostile records. `RELIABILITY_EVENTS` sets the bookings per
//! scenario (a few thousand by default; `scripts/reliability.sh` runs 50 000), and
//! `RELIABILITY_REPORT`, when set, is a file each scenario appends one JSON line of figures to.

mod common;

use booking_worker::loadgen::{plan, Expected, ExpectedBooking, PlanConfig, Topic};
use booking_worker::models::{EventKind, Reason};
use chrono::{DateTime, Utc};
use common::{CuttableProxy, Services, Setup, TestDb, TestProducer, WorkerProcess, WAIT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
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

/// One record to publish.
#[derive(Debug, Clone)]
struct Outgoing {
    topic: Topic,
    key: String,
    payload: Vec<u8>,
    /// Headers with UTF-8 names (values are raw bytes).
    headers: Vec<(String, Vec<u8>)>,
    /// One header whose name is raw bytes (not UTF-8), sent through librdkafka directly.
    raw_header: Option<(Vec<u8>, Vec<u8>)>,
}

impl Outgoing {
    fn new(topic: Topic, key: &str, payload: impl Into<Vec<u8>>) -> Outgoing {
        Outgoing {
            topic,
            key: key.to_string(),
            payload: payload.into(),
            headers: Vec::new(),
            raw_header: None,
        }
    }

    fn header(mut self, name: &str, value: &[u8]) -> Outgoing {
        self.headers.push((name.to_string(), value.to_vec()));
        self
    }
}

/// Publishes records at an even pace over `duration` on a thread of its own, through an
/// idempotent producer (so a broker restart cannot write a record twice). Returns how many
/// deliveries failed.
fn publish(
    services: &Services,
    topics: (String, String),
    records: Arc<Vec<Outgoing>>,
    duration: Duration,
) -> JoinHandle<usize> {
    let services = services.clone();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let producer = TestProducer::with_config(
                &services,
                &[
                    ("enable.idempotence", "true"),
                    ("message.timeout.ms", "300000"),
                    ("queue.buffering.max.messages", "1000000"),
                    ("queue.buffering.max.kbytes", "1048576"),
                ],
            );
            let start = Instant::now();
            let step = duration.div_f64(records.len().max(1) as f64);
            for (i, r) in records.iter().enumerate() {
                let due = start + step.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let topic = match r.topic {
                    Topic::Bookings => &topics.0,
                    Topic::Cancellations => &topics.1,
                };
                match &r.raw_header {
                    Some((name, value)) => producer.send_raw_header_name(topic, &r.key, &r.payload, name, value),
                    None => {
                        let headers: Vec<(&str, &[u8])> =
                            r.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
                        producer.send(topic, &r.key, &r.payload, &headers);
                    }
                }
            }
            producer.flush_within(Duration::from_secs(300));
            producer.failed()
        })
        .expect("start the publisher")
}

/// A single-node broker of this test's own, from scripts/kafka.sh on free ports, that the test
/// can stop and start again with its data kept. Stopped, and its data deleted, when dropped.
struct OwnBroker {
    port: u16,
    controller_port: u16,
    state_dir: PathBuf,
    brokers: String,
}

impl OwnBroker {
    fn start() -> OwnBroker {
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

    fn kafka(&self, command: &str, keep_data: bool) {
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

/// The users of a scenario, by the identifier the stream uses for them (id, email or username).
struct World {
    user_ids: HashMap<String, i32>,
    room_ids: HashMap<String, i32>,
}

impl World {
    /// Four users named in each of the three ways, and three rooms.
    fn create(db: &TestDb) -> World {
        let mut user_ids = HashMap::new();
        let alice = db.user("alice@reliability.example", "rel_alice");
        user_ids.insert("rel_alice".to_string(), alice);
        let bob = db.user("bob@reliability.example", "rel_bob");
        user_ids.insert("bob@reliability.example".to_string(), bob);
        let carol = db.user("carol@reliability.example", "rel_carol");
        user_ids.insert(carol.to_string(), carol);
        let dave = db.user("dave@reliability.example", "rel_dave");
        user_ids.insert("rel_dave".to_string(), dave);
        let mut room_ids = HashMap::new();
        for room in ["room_ocean_001", "room_garden_101", "room_city_201"] {
            room_ids.insert(room.to_string(), db.room(room));
        }
        World { user_ids, room_ids }
    }

    fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.user_ids.keys().cloned().collect();
        users.sort();
        users
    }

    fn rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self.room_ids.keys().cloned().collect();
        rooms.sort();
        rooms
    }
}

/// The planned stream for `bookings` bookings: 20% get a cancellation (10% of those before their
/// booking, 5% by someone else), 2% are sent twice, 1% bad records, 30% carry baggage.
fn planned(world: &World, bookings: usize, prefix: &str, seed: u64) -> (Vec<Outgoing>, Expected) {
    let (records, expected) = plan(&PlanConfig {
        bookings,
        cancel_ratio: 0.2,
        early_cancel_ratio: 0.1,
        unauthorized_ratio: 0.05,
        duplicate_ratio: 0.02,
        bad_ratio: 0.01,
        baggage_ratio: 0.3,
        users: world.users(),
        rooms: world.rooms(),
        id_prefix: prefix.to_string(),
        seed,
    });
    let out = records
        .into_iter()
        .map(|r| Outgoing {
            topic: r.topic,
            key: r.key,
            payload: r.payload,
            headers: r.baggage.map(|b| vec![("Baggage".to_string(), b)]).unwrap_or_default(),
            raw_header: None,
        })
        .collect();
    (out, expected)
}

/// A fault whose end was at `end`.
struct Fault {
    what: String,
    end: DateTime<Utc>,
}

/// A worker's stdout and stderr lines, kept after it is gone.
struct WorkerLog {
    name: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// What a scenario found.
#[derive(Debug, Default)]
struct Figures {
    events: usize,
    applied: usize,
    dead_lettered: usize,
    lost: usize,
    duplicated: usize,
    mismatched: usize,
    parked_left: usize,
    problems: Vec<String>,
}

/// One scenario's world: its database, topics, group, stream, workers and faults.
struct Scenario {
    name: &'static str,
    setup: Setup,
    world: World,
    records: Vec<Outgoing>,
    expected: Expected,
    stream: Duration,
    started: Instant,
    /// When publishing began (wall clock, which the database shares on this machine).
    published_utc: Option<DateTime<Utc>>,
    rng: fastrand::Rng,
    faults: Vec<Fault>,
    /// Every worker's log, also of those already gone.
    logs: Vec<WorkerLog>,
    publisher: Option<JoinHandle<usize>>,
    published_at: Option<Instant>,
}

impl Scenario {
    /// A scenario on the suite's broker, whose short stream lasts `base`.
    fn new(name: &'static str, base: Duration) -> Option<Scenario> {
        let setup = Setup::new(name)?;
        Some(Scenario::with_setup(name, setup, base))
    }

    /// A scenario on a broker of its own.
    fn on_broker(name: &'static str, base: Duration, brokers: &str) -> Option<Scenario> {
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
        let world = World::create(&setup.db);
        let (records, expected) = planned(&world, n, name, seed);
        Scenario {
            name,
            setup,
            world,
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
    fn spawn(&mut self, name: &str, extra: &[(&str, &str)]) -> WorkerProcess {
        let worker = self.setup.start_with(name, extra);
        self.logs.push(WorkerLog {
            name: name.to_string(),
            stdout: Arc::clone(&worker.lines),
            stderr: Arc::clone(&worker.stderr_lines),
        });
        worker
    }

    /// Starts publishing the stream; it flows for `self.stream`.
    fn publish(&mut self) {
        let records = Arc::new(self.records.clone());
        self.published_at = Some(Instant::now());
        self.published_utc = Some(Utc::now());
        self.publisher = Some(publish(
            &self.setup.services,
            (self.setup.bookings.clone(), self.setup.cancels.clone()),
            records,
            self.stream,
        ));
    }

    /// Sleeps until `fraction` of the stream's duration has passed since publishing began.
    fn at(&self, fraction: f64) {
        let due = self.published_at.expect("publishing started") + self.stream.mul_f64(fraction);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Notes that a fault ended now.
    fn fault_ended(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!(
            "[{}] {:>6.1}s fault over: {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        self.faults.push(Fault { what, end: Utc::now() });
    }

    fn note(&self, what: &str) {
        eprintln!("[{}] {:>6.1}s {what}", self.name, self.started.elapsed().as_secs_f64());
    }

    /// Waits until the worker has written something after `since` (or `timeout` passes).
    fn wait_progress(&self, since: DateTime<Utc>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while first_write_after(&self.setup.db, since).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the stream to be published, consumed and committed; stops the workers still
    /// running (each must exit 0); compares the database with the ledger; checks every log line;
    /// reports; and fails on anything lost or doubled.
    fn finish(mut self, workers: Vec<WorkerProcess>) {
        let failed = self
            .publisher
            .take()
            .expect("publishing started")
            .join()
            .expect("the publisher thread");
        assert_eq!(failed, 0, "deliveries failed: the stream is not the planned one");
        self.note("stream published");
        let consumed = self.wait_consumed(settle_timeout(bookings()));
        if consumed {
            self.note("every record consumed and committed");
        } else {
            self.note("NOT everything was consumed and committed in time");
        }
        for mut w in workers {
            if w.is_running() {
                w.signal("TERM");
            }
            let code = w.wait(WAIT);
            assert_eq!(code, 0, "{} did not stop cleanly", w.name);
        }
        let figures = compare(&self.setup.db, &self.world, &self.expected, self.records.len());
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
        let worst = recover
            .iter()
            .filter_map(|(_, s)| *s)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        let stall = longest_write_pause(&self.setup.db, self.published_utc.expect("publishing started"));
        self.note(&format!("longest pause between durable writes: {stall:.2}s"));
        for (n, msg) in warnings(&self.logs).iter().take(12) {
            self.note(&format!("logged {n:>5} x {msg}"));
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let test = std::thread::current().name().unwrap_or_default().to_string();
        let line = json!({
            "scenario": self.name,
            "test": test,
            "events": figures.events,
            "bookings": self.expected.bookings.len(),
            "applied": figures.applied,
            "dead_lettered": figures.dead_lettered,
            "lost": figures.lost,
            "duplicated": figures.duplicated,
            "mismatched": figures.mismatched,
            "faults": self.faults.len(),
            "recover_seconds": worst.map(|s| (s * 100.0).round() / 100.0),
            "longest_pause_seconds": (stall * 100.0).round() / 100.0,
            "seconds": (seconds * 10.0).round() / 10.0,
        });
        eprintln!("[{}] {line}", self.name);
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
        check_logs(&self.logs);
        assert!(
            figures.lost == 0 && figures.duplicated == 0 && figures.mismatched == 0,
            "[{}] lost {}, duplicated {}, mismatched {}, parked left {}:\n{}",
            self.name,
            figures.lost,
            figures.duplicated,
            figures.mismatched,
            figures.parked_left,
            figures.problems.join("\n")
        );
        assert!(consumed, "the stream was not consumed and committed in time");
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

/// Whether the group of `consumer` has committed the end offset of every partition of `topics`
/// (None: the broker could not say).
fn caught_up(consumer: &BaseConsumer, topics: &[&str]) -> Option<bool> {
    let timeout = Duration::from_secs(5);
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == *topic)?
            .partitions()
            .len();
        if partitions == 0 {
            return None;
        }
        for p in 0..partitions as i32 {
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
            ends.insert((topic.to_string(), p), high);
            tpl.add_partition(topic, p);
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    Some(committed.elements().iter().all(|e| {
        let end = ends[&(e.topic().to_string(), e.partition())];
        match e.offset() {
            Offset::Offset(o) => o >= end,
            _ => end == 0,
        }
    }))
}

/// Seconds from `after` to the first durable write the worker made after it: a booking created
/// or cancelled, a dead letter, a parked cancellation. None when nothing was written after it.
fn first_write_after(db: &TestDb, after: DateTime<Utc>) -> Option<f64> {
    // booking-management's columns are TIMESTAMP without time zone, in the server's zone.
    db.conn()
        .query_one(
            "SELECT extract(epoch FROM least(
                    (SELECT min(created_at::timestamptz) FROM bookings WHERE created_at::timestamptz > $1),
                    (SELECT min(updated_at::timestamptz) FROM bookings WHERE updated_at::timestamptz > $1),
                    (SELECT min(created_at) FROM booking_worker.dead_letters WHERE created_at > $1),
                    (SELECT min(parked_at) FROM booking_worker.pending_cancellations WHERE parked_at > $1))
                - $1)::float8 AS s",
            &[&after],
        )
        .expect("time of the first write after a fault")
        .get(0)
}

/// The longest pause between durable writes from `from` to the last write: how long the worker
/// stood still at worst (a fault's outage plus its recovery).
fn longest_write_pause(db: &TestDb, from: DateTime<Utc>) -> f64 {
    let times: Vec<f64> = db
        .conn()
        .query(
            "SELECT DISTINCT extract(epoch FROM t)::float8 AS t FROM (
                SELECT created_at::timestamptz AS t FROM bookings
                UNION ALL SELECT updated_at::timestamptz FROM bookings WHERE updated_at > created_at
                UNION ALL SELECT created_at FROM booking_worker.dead_letters
                UNION ALL SELECT parked_at FROM booking_worker.pending_cancellations) AS w
          WHERE t >= $1 ORDER BY 1",
            &[&from],
        )
        .expect("times of the writes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let start = from.timestamp_micros() as f64 / 1e6;
    let mut last = start;
    let mut longest: f64 = 0.0;
    for t in times {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}

/// Warnings and errors the workers logged, by message, most frequent first.
fn warnings(logs: &[WorkerLog]) -> Vec<(usize, String)> {
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

struct BookingCmp {
    id: i32,
    external_id: Option<String>,
    user_id: i32,
    room_id: i32,
    status: String,
}

struct LetterCmp {
    id: i64,
    booking_id: Option<String>,
    record_key: Option<Vec<u8>>,
    reason: String,
    topic: String,
    kafka_offset: i64,
}

/// Compares the bookings, dead letters and parked cancellations with the ledger, row by row.
///
/// - every expected booking exists once, with its user (the identifier resolved to `users.id`),
///   room and status; a missing one is lost, a wrong one mismatched, one not in the ledger doubled;
/// - every dead letter the ledger names by booking id (or record key) exists once with its reason;
///   the others are counted by reason; a shortfall is lost, an excess doubled;
/// - no cancellation is left parked (each was released by its booking): one left is lost.
fn compare(db: &TestDb, world: &World, expected: &Expected, events: usize) -> Figures {
    let mut f = Figures {
        events,
        ..Figures::default()
    };
    let mut conn = db.conn();
    let rows: Vec<BookingCmp> = conn
        .query(
            "SELECT id, external_id::text, user_id, room_id, status::text FROM bookings ORDER BY id",
            &[],
        )
        .expect("read bookings")
        .iter()
        .map(|r| BookingCmp {
            id: r.get(0),
            external_id: r.get(1),
            user_id: r.get(2),
            room_id: r.get(3),
            status: r.get(4),
        })
        .collect();
    let mut by_external: HashMap<&str, Vec<&BookingCmp>> = HashMap::new();
    for row in &rows {
        match &row.external_id {
            Some(x) => by_external.entry(x.as_str()).or_default().push(row),
            None => {
                f.duplicated += 1;
                f.problems.push(format!("booking row {} has no external id", row.id));
            }
        }
    }
    for (id, want) in &expected.bookings {
        let Some(found) = by_external.get(id.as_str()) else {
            f.lost += 1;
            f.problems.push(format!("missing booking {id:?}"));
            continue;
        };
        if found.len() > 1 {
            f.duplicated += found.len() - 1;
            f.problems.push(format!("booking {id:?} has {} rows", found.len()));
        }
        let row = found[0];
        let user = world.user_ids.get(&want.user).copied();
        let room = world.room_ids.get(&want.room).copied();
        if Some(row.user_id) != user || Some(row.room_id) != room || row.status != want.status {
            f.mismatched += 1;
            f.problems.push(format!(
                "booking {id:?}: user {} room {} status {}, expected user {user:?} room {room:?} status {}",
                row.user_id, row.room_id, row.status, want.status
            ));
        } else {
            f.applied += 1;
            if row.status == "Cancelled" {
                f.applied += 1;
            }
        }
    }
    for (id, found) in &by_external {
        if !expected.bookings.contains_key(*id) {
            f.duplicated += found.len();
            f.problems.push(format!("booking {id:?} is not in the ledger"));
        }
    }

    let letters: Vec<LetterCmp> = conn
        .query(
            "SELECT id, booking_id, record_key, reason, topic, kafka_offset
               FROM booking_worker.dead_letters ORDER BY id",
            &[],
        )
        .expect("read dead letters")
        .iter()
        .map(|r| LetterCmp {
            id: r.get(0),
            booking_id: r.get(1),
            record_key: r.get(2),
            reason: r.get(3),
            topic: r.get(4),
            kafka_offset: r.get(5),
        })
        .collect();
    f.dead_lettered = letters.len();
    let mut keyed_expected: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for (id, reason) in &expected.dead_letter_ids {
        *keyed_expected.entry((id.clone(), reason)).or_default() += 1;
    }
    let mut unkeyed_expected: BTreeMap<&str, usize> = expected.dead_letters.iter().map(|(r, n)| (*r, *n)).collect();
    for ((_, reason), n) in &keyed_expected {
        let left = unkeyed_expected.entry(*reason).or_default();
        *left = left
            .checked_sub(*n)
            .expect("the ledger's keyed dead letters fit its counts");
    }
    let mut keyed_actual: BTreeMap<(String, &str), usize> = BTreeMap::new();
    let mut unkeyed_actual: BTreeMap<String, Vec<&LetterCmp>> = BTreeMap::new();
    for l in &letters {
        let key = l.record_key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned());
        let matched = [l.booking_id.clone(), key].into_iter().flatten().find_map(|id| {
            keyed_expected
                .get_key_value(&(id, l.reason.as_str()))
                .map(|(k, _)| k.clone())
        });
        match matched {
            Some(k) => *keyed_actual.entry(k).or_default() += 1,
            None => unkeyed_actual.entry(l.reason.clone()).or_default().push(l),
        }
    }
    for (k, want) in &keyed_expected {
        let got = keyed_actual.get(k).copied().unwrap_or(0);
        if got < *want {
            f.lost += want - got;
            f.problems.push(format!("missing dead letter {k:?}"));
        } else if got > *want {
            f.duplicated += got - want;
            f.problems.push(format!("dead letter {k:?} {got} times"));
        }
    }
    let reasons: std::collections::BTreeSet<String> = unkeyed_expected
        .keys()
        .map(|r| r.to_string())
        .chain(unkeyed_actual.keys().cloned())
        .collect();
    for reason in reasons {
        let want = unkeyed_expected.get(reason.as_str()).copied().unwrap_or(0);
        let got = unkeyed_actual.get(&reason).map_or(0, Vec::len);
        if got < want {
            f.lost += want - got;
            f.problems
                .push(format!("{} dead letters of reason {reason} missing", want - got));
        } else if got > want {
            f.duplicated += got - want;
            let examples: Vec<String> = unkeyed_actual[&reason]
                .iter()
                .take(5)
                .map(|l| format!("#{} {}@{} {:?}", l.id, l.topic, l.kafka_offset, l.booking_id))
                .collect();
            f.problems.push(format!(
                "{} dead letters of reason {reason} beyond the ledger, e.g. {}",
                got - want,
                examples.join(", ")
            ));
        }
    }

    let parked = db.parked();
    f.parked_left = parked.len();
    if !parked.is_empty() {
        f.lost += parked.len();
        f.problems.push(format!(
            "{} cancellations still parked, e.g. {:?}",
            parked.len(),
            &parked[..parked.len().min(5)]
        ));
    }
    f.problems.truncate(40);
    f
}

/// No worker panicked, and every line on stdout is one JSON object.
fn check_logs(logs: &[WorkerLog]) {
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

// ---------------------------------------------------------------------------------------------
// The scenarios

#[test]
fn sigkill_at_ten_random_moments_then_restart_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("sigkill", Duration::from_secs(30)) else {
        return;
    };
    // A killed member leaves the group only when its session times out, and the restarted worker
    // waits for that: a short session keeps ten kills within the stream.
    let session = [
        ("KAFKA_PROP_SESSION_TIMEOUT_MS", "2000"),
        ("KAFKA_PROP_HEARTBEAT_INTERVAL_MS", "250"),
    ];
    let mut moments: Vec<f64> = (0..10).map(|_| 0.05 + 0.85 * sc.rng.f64()).collect();
    moments.sort_by(f64::total_cmp);
    let mut worker = sc.spawn("sigkill-0", &session);
    let mut spawned = Utc::now();
    sc.publish();
    for (i, moment) in moments.iter().enumerate() {
        // At a random moment, but only once the worker is writing again, so that every kill
        // lands on a working worker and every restart's recovery is seen.
        sc.at(*moment);
        sc.wait_progress(spawned, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(sc.rng.u64(0..1000)));
        worker.signal("KILL");
        let code = worker.wait(WAIT);
        assert_eq!(code, -1, "killed by a signal");
        sc.note(&format!("SIGKILL {} of 10 (pid {})", i + 1, worker.pid()));
        worker = sc.spawn(&format!("sigkill-{}", i + 1), &session);
        spawned = Utc::now();
        sc.fault_ended(format!("restart after SIGKILL {}", i + 1));
    }
    sc.finish(vec![worker]);
}

#[test]
fn postgres_refusing_connections_then_terminating_backends_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("postgres", Duration::from_secs(30)) else {
        return;
    };
    let proxy = CuttableProxy::start(&sc.setup.services.db_host, sc.setup.services.db_port);
    let port = proxy.port.to_string();
    let worker = sc.spawn("postgres", &[("DB_HOST", "127.0.0.1"), ("DB_PORT", &port)]);
    sc.publish();
    let outage = Duration::from_secs(10);

    sc.at(0.12);
    sc.note("PostgreSQL refuses connections");
    proxy.refuse();
    std::thread::sleep(outage);
    proxy.restore();
    sc.fault_ended("connections accepted again");

    sc.at(0.55);
    sc.note("terminating the worker's backends for 10 s");
    let mut admin = sc.setup.db.conn();
    let until = Instant::now() + outage;
    let (mut terminated, mut in_transaction) = (0i64, 0i64);
    while Instant::now() < until {
        let k = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n_all,
                        count(*) FILTER (WHERE state <> 'idle') AS n_busy
                   FROM pg_stat_activity
                  WHERE datname = $1 AND application_name = 'booking-worker' AND pid <> pg_backend_pid()",
                &[&sc.setup.db.name],
            )
            .expect("terminate the worker's backends");
        terminated += k.get::<_, i64>(0);
        in_transaction += k.get::<_, i64>(1);
        std::thread::sleep(Duration::from_millis(100));
    }
    sc.fault_ended(format!(
        "backends no longer terminated ({terminated} terminated, {in_transaction} of them busy)"
    ));
    assert!(terminated > 0, "the worker had connections to terminate");
    sc.finish(vec![worker]);
}

#[test]
fn kafka_broker_stopped_and_restarted_mid_stream_loses_and_doubles_nothing() {
    if common::services().is_none() {
        return;
    }
    let broker = OwnBroker::start();
    let Some(mut sc) = Scenario::on_broker("kafka", Duration::from_secs(24), &broker.brokers) else {
        return;
    };
    let mut worker = sc.spawn("kafka", &[]);
    sc.publish();
    sc.at(0.2);
    sc.note("stopping the broker (data kept)");
    broker.kafka("stop", true);
    sc.note("broker stopped; down for 10 s");
    std::thread::sleep(Duration::from_secs(10));
    assert!(worker.is_running(), "the worker rides out the broker's absence");
    broker.kafka("start", false);
    sc.fault_ended("broker started again");
    assert!(worker.is_running(), "the worker recovers without a restart of its own");
    let pid = worker.pid();
    sc.note(&format!("the same worker (pid {pid}) carries on"));
    sc.finish(vec![worker]);
    drop(broker);
}

fn three_instances_in_turns(name: &'static str, extra: &[(&str, &str)]) {
    let Some(mut sc) = Scenario::new(name, Duration::from_secs(30)) else {
        return;
    };
    let extra = extra.to_vec();
    let a1 = sc.spawn(&format!("{name}-a1"), &extra);
    sc.publish();
    sc.at(0.08);
    let b1 = sc.spawn(&format!("{name}-b1"), &extra);
    sc.fault_ended("b1 joined");
    sc.at(0.18);
    let c1 = sc.spawn(&format!("{name}-c1"), &extra);
    sc.fault_ended("c1 joined");
    sc.at(0.30);
    assert_eq!(a1.terminate(WAIT), 0, "a1 stops cleanly mid-stream");
    sc.fault_ended("a1 stopped (SIGTERM)");
    sc.at(0.42);
    let a2 = sc.spawn(&format!("{name}-a2"), &extra);
    sc.fault_ended("a2 joined");
    sc.at(0.54);
    let mut b1 = b1;
    b1.signal("KILL");
    assert_eq!(b1.wait(WAIT), -1);
    sc.fault_ended("b1 killed (SIGKILL)");
    sc.at(0.64);
    let b2 = sc.spawn(&format!("{name}-b2"), &extra);
    sc.fault_ended("b2 joined");
    sc.at(0.74);
    assert_eq!(c1.terminate(WAIT), 0, "c1 stops cleanly mid-stream");
    sc.fault_ended("c1 stopped (SIGTERM)");
    sc.at(0.84);
    let c2 = sc.spawn(&format!("{name}-c2"), &extra);
    sc.fault_ended("c2 joined");
    sc.finish(vec![a2, b2, c2]);
}

#[test]
fn three_instances_started_and_stopped_in_turns_eager_loses_and_doubles_nothing() {
    three_instances_in_turns("group-eager", &[]);
}

#[test]
fn three_instances_started_and_stopped_in_turns_cooperative_loses_and_doubles_nothing() {
    three_instances_in_turns(
        "group-coop",
        &[("KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY", "cooperative-sticky")],
    );
}

#[test]
fn three_instances_started_and_stopped_in_turns_kip_848_consumer_protocol_loses_and_doubles_nothing() {
    three_instances_in_turns("group-consumer", &[("KAFKA_GROUP_PROTOCOL", "consumer")]);
}

#[test]
fn a_flood_of_hostile_records_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("hostile", Duration::from_secs(12)) else {
        return;
    };
    let flood = (sc.expected.bookings.len() / 10).max(200);
    let hostile = hostile_records(&sc.setup.db, &mut sc.world, &mut sc.expected, flood, &mut sc.rng);
    // Hostile records at random places in the stream, in their own order.
    let mut places: Vec<usize> = (0..hostile.len()).map(|_| sc.rng.usize(..=sc.records.len())).collect();
    places.sort_unstable();
    let mut merged = Vec::with_capacity(sc.records.len() + hostile.len());
    let mut hostile = hostile.into_iter().peekable();
    let mut places = places.into_iter().peekable();
    for (i, r) in std::mem::take(&mut sc.records).into_iter().enumerate() {
        while places.peek() == Some(&i) {
            places.next();
            merged.push(hostile.next().expect("one record per place"));
        }
        merged.push(r);
    }
    merged.extend(hostile);
    sc.records = merged;
    sc.expected.records = sc.records.len();
    sc.expected.dead_letter_ids.sort();
    sc.note(&format!("{} records, {flood} of the flood hostile", sc.records.len()));

    let worker = sc.spawn("hostile", &[("MAX_PAYLOAD_BYTES", "1048576")]);
    sc.publish();
    sc.finish(vec![worker]);
}

// ---------------------------------------------------------------------------------------------
// Hostile records

/// SQL metacharacters, array-literal syntax and non-ASCII text, without NUL or control
/// characters, that must be stored exactly as written.
const META: &str = "q'uo\"te; DROP TABLE bookings;-- \\back\\slash %_ {1,2} NULL $1 ü日本🏨";

/// How a hostile record must end.
enum End {
    /// A booking with its final status.
    Booking {
        id: String,
        user: String,
        room: String,
        status: &'static str,
    },
    /// A dead letter with this reason, found by booking id or record key.
    Dead { id: String, reason: &'static str },
    /// Nothing of its own (a cancellation folded into its booking's status).
    Folded,
}

fn booking_payload(id: &str, user: &str, room: &str) -> serde_json::Value {
    json!({
        "userId": user, "roomId": room, "guests": 2, "startDate": "2026-04-01T15:00:00Z",
        "endDate": "2026-04-03", "bookingId": id, "paymentId": format!("pay_{id}"),
    })
}

fn with_field(mut v: serde_json::Value, field: &str, value: serde_json::Value) -> Vec<u8> {
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v.to_string().into_bytes()
}

fn cancel_payload(id: &str, user: &str) -> Vec<u8> {
    json!({"bookingId": id, "userId": user, "timestamp": "2026-03-01T10:00:00Z"})
        .to_string()
        .into_bytes()
}

/// Random bytes that the decoder must call malformed.
fn random_bytes(rng: &mut fastrand::Rng) -> Vec<u8> {
    loop {
        let len = rng.usize(1..2048);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if rng.bool() {
            // Mostly printable, sometimes JSON-looking.
            const ALPHABET: &[u8] = b" {}[]\":,0123456789abcdefnulltrue\\'";
            for b in bytes.iter_mut() {
                *b = ALPHABET[usize::from(*b) % ALPHABET.len()];
            }
        }
        let rejected = EventKind::Booking.decode(&bytes, 1 << 20).err();
        if rejected.is_some_and(|r| r.reason == Reason::MalformedJson) {
            return bytes;
        }
    }
}

/// The hostile records (a fixed catalogue and `flood` random ones), with the ledger extended by
/// how each must end. Creates the user and the room whose names are full of SQL metacharacters.
fn hostile_records(
    db: &TestDb,
    world: &mut World,
    expected: &mut Expected,
    flood: usize,
    rng: &mut fastrand::Rng,
) -> Vec<Outgoing> {
    use Topic::{Bookings as B, Cancellations as C};
    let meta_user = format!("user {META}");
    let meta_email = format!("o'brien+\"{META}\"@例え.jp");
    let meta_user_id = db.user(&meta_email, &meta_user);
    // booking-management's rooms.internal_id is VARCHAR(50).
    let meta_room: String = format!("room {META}").chars().take(50).collect();
    let meta_room_id = db.room(&meta_room);
    let users = world.users();
    let owner = users[0].clone();
    let other = users[1].clone();
    let room = world.rooms()[0].clone();
    let numeric_user: i64 = world
        .user_ids
        .keys()
        .find_map(|k| k.parse().ok())
        .expect("one user is named by its id");

    let mut out: Vec<(Outgoing, End)> = Vec::new();
    let booking = |id: &str, user: &str, room: &str, status: &'static str| End::Booking {
        id: id.to_string(),
        user: user.to_string(),
        room: room.to_string(),
        status,
    };
    let dead = |id: &str, reason: &'static str| End::Dead {
        id: id.to_string(),
        reason,
    };

    // SQL metacharacters in every field of valid events: applied exactly as written.
    let m1 = format!("bk1 {META}");
    let m1_payload = json!({
        "userId": meta_user, "roomId": meta_room, "guests": 3, "startDate": "2026-05-01",
        "endDate": "2026-05-04", "bookingId": m1, "paymentId": format!("pay {META}"),
    });
    out.push((
        Outgoing::new(B, &m1, m1_payload.to_string()).header("Baggage", format!("k={META}").as_bytes()),
        booking(&m1, &meta_user, &meta_room, "Accepted"),
    ));
    let m2 = format!("bk2 {META}");
    // Its cancellation first (parked, with a NUL in its baggage), by the owner named by email.
    out.push((
        Outgoing::new(C, &m2, cancel_payload(&m2, &meta_email)).header("baggage", b"t=nul\0inside"),
        End::Folded,
    ));
    out.push((
        Outgoing::new(B, &m2, booking_payload(&m2, &meta_user, &meta_room).to_string()),
        booking(&m2, &meta_user, &meta_room, "Cancelled"),
    ));
    out.push((
        Outgoing::new(C, &m1, cancel_payload(&m1, &other)),
        dead(&m1, "unauthorized"),
    ));
    for id in ["NULL", "{a,b}", "\\", "'", "%", "--", "\"", "ü"] {
        out.push((
            Outgoing::new(B, id, booking_payload(id, &owner, &room).to_string()),
            booking(id, &owner, &room, "Accepted"),
        ));
    }
    let m3 = format!("bk3 {META}");
    out.push((
        Outgoing::new(
            B,
            &m3,
            booking_payload(&m3, &format!("x'); DROP TABLE users; -- {META}"), &room).to_string(),
        ),
        dead(&m3, "unknown_user"),
    ));
    let m4 = format!("bk4 {META}");
    out.push((
        Outgoing::new(
            B,
            &m4,
            booking_payload(&m4, &owner, &format!("'; TRUNCATE rooms; -- {META}")).to_string(),
        ),
        dead(&m4, "unknown_room"),
    ));
    let m5 = format!("bk5 {META}");
    out.push((
        Outgoing::new(
            B,
            &m5,
            json!({"userId": META, "roomId": META, "guests": META, "startDate": META,
                   "endDate": META, "bookingId": m5, "paymentId": META})
            .to_string(),
        ),
        dead(&m5, "invalid_field"),
    ));
    let m6 = format!("bk6 {META}");
    out.push((
        Outgoing::new(
            B,
            &m6,
            with_field(
                booking_payload(&m6, &owner, &room),
                "startDate",
                json!("2026-01-01'; DROP TABLE bookings; --"),
            ),
        ),
        dead(&m6, "invalid_field"),
    ));
    let m7 = format!("bk7 {META}");
    out.push((
        Outgoing::new(
            C,
            &m7,
            json!({"bookingId": m7, "userId": owner, "timestamp": META}).to_string(),
        ),
        dead(&m7, "invalid_field"),
    ));

    // Wrong types.
    let base = |id: &str| booking_payload(id, &owner, &room);
    let wrong: Vec<(&str, serde_json::Value, &'static str)> = vec![
        ("guests", json!("2"), "invalid_field"),
        ("guests", json!(2.5), "invalid_field"),
        ("guests", json!(true), "invalid_field"),
        ("guests", json!([2]), "invalid_field"),
        ("guests", json!({"n": 2}), "invalid_field"),
        ("guests", json!(1e300), "invalid_field"),
        ("guests", json!(0), "invalid_guests"),
        ("guests", json!(-5), "invalid_guests"),
        ("guests", json!(2_147_483_648u64), "invalid_guests"),
        ("guests", json!(u64::MAX), "invalid_guests"),
        ("userId", json!(null), "missing_field"),
        ("userId", json!(""), "missing_field"),
        ("userId", json!("   "), "missing_field"),
        ("userId", json!(["a"]), "invalid_field"),
        ("userId", json!(-1), "invalid_field"),
        ("userId", json!(1.5), "invalid_field"),
        ("userId", json!("bell\u{7}"), "invalid_field"),
        ("userId", json!("x".repeat(256)), "invalid_field"),
        ("roomId", json!({"internal": room}), "invalid_field"),
        ("paymentId", json!(false), "invalid_field"),
        ("paymentId", json!("tab\there"), "invalid_field"),
        ("startDate", json!(20_260_401), "invalid_field"),
        ("endDate", json!(null), "missing_field"),
    ];
    for (n, (field, value, reason)) in wrong.into_iter().enumerate() {
        let id = format!("wrong_{n}_{field}");
        out.push((
            Outgoing::new(B, &id, with_field(base(&id), field, value)),
            dead(&id, reason),
        ));
    }
    for (n, value) in [json!({"id": 1}), json!([1]), json!(true), json!(-7), json!(0.5)]
        .into_iter()
        .enumerate()
    {
        let key = format!("wrong_booking_id_{n}");
        out.push((
            Outgoing::new(B, &key, with_field(base("x"), "bookingId", value)),
            dead(&key, "invalid_field"),
        ));
    }
    // A numeric booking id and a numeric user id are fine.
    out.push((
        Outgoing::new(
            B,
            "9876543210123",
            with_field(base("x"), "bookingId", json!(9_876_543_210_123u64)),
        ),
        booking("9876543210123", &owner, &room, "Accepted"),
    ));
    let by_number = "numeric_user_booking";
    out.push((
        Outgoing::new(B, by_number, with_field(base(by_number), "userId", json!(numeric_user))),
        booking(by_number, &numeric_user.to_string(), &room, "Accepted"),
    ));
    for (n, payload) in ["[1,2]", "\"text\"", "42", "null", "true", "", "\u{feff}{}"]
        .iter()
        .enumerate()
    {
        let key = format!("not_object_{n}");
        out.push((Outgoing::new(B, &key, payload.as_bytes()), dead(&key, "malformed_json")));
    }

    // Invalid and edge-case dates.
    let bad_dates = [
        "2026-02-30",
        "2026-13-01",
        "2026-00-10",
        "15/01/2026",
        "2026-1-5",
        "",
        "tomorrow",
        "2026-01-15T25:00:00Z",
        "2026-01-15T10:00:00",
        "+12345-01-01",
        "2026-01-15T10:00:00+25:00",
        "２０２６-０１-１５",
    ];
    for (n, date) in bad_dates.iter().enumerate() {
        let id = format!("bad_date_{n}");
        out.push((
            Outgoing::new(B, &id, with_field(base(&id), "startDate", json!(date))),
            dead(&id, "invalid_field"),
        ));
    }
    for (n, (start, end)) in [("2026-04-03", "2026-04-03"), ("2026-04-03", "2026-04-01")]
        .iter()
        .enumerate()
    {
        let id = format!("backwards_{n}");
        let mut v = base(&id);
        v["startDate"] = json!(start);
        v["endDate"] = json!(end);
        out.push((Outgoing::new(B, &id, v.to_string()), dead(&id, "invalid_dates")));
    }
    for (n, (start, end)) in [
        ("2024-02-29", "2024-03-01"),
        ("0001-01-01", "0001-01-02"),
        ("9999-12-30", "9999-12-31"),
        ("2026-01-15T23:30:00-05:00", "2026-01-16T01:00:00+09:00"),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("edge_date_{n}");
        let mut v = base(&id);
        v["startDate"] = json!(start);
        v["endDate"] = json!(end);
        out.push((
            Outgoing::new(B, &id, v.to_string()),
            booking(&id, &owner, &room, "Accepted"),
        ));
    }

    // Deep nesting and huge strings (the worker runs with MAX_PAYLOAD_BYTES = 1 MiB).
    let deep = 100_000;
    let nested: Vec<(&str, String)> = vec![
        ("deep_arrays", format!("{}{}", "[".repeat(deep), "]".repeat(deep))),
        (
            "deep_objects",
            format!("{}1{}", "{\"a\":".repeat(deep), "}".repeat(deep)),
        ),
        ("deep_unclosed", "[".repeat(deep)),
        ("deep_in_event", {
            let mut v = base("deep_in_event").to_string();
            v.pop();
            format!("{v},\"extra\":{}{}}}", "[".repeat(deep), "]".repeat(deep))
        }),
    ];
    for (key, payload) in nested {
        out.push((Outgoing::new(B, key, payload), dead(key, "malformed_json")));
    }
    let shallow = "shallow_nesting";
    let mut v = base(shallow).to_string();
    v.pop();
    out.push((
        Outgoing::new(
            B,
            shallow,
            format!("{v},\"extra\":{}{}}}", "[".repeat(100), "]".repeat(100)),
        ),
        booking(shallow, &owner, &room, "Accepted"),
    ));
    let big = 3 << 20;
    let huge_id = "huge_payment";
    out.push((
        Outgoing::new(
            B,
            huge_id,
            with_field(base(huge_id), "paymentId", json!("x".repeat(big))),
        ),
        dead(huge_id, "payload_too_large"),
    ));
    out.push((
        Outgoing::new(C, "huge_cancel", format!("\"{}\"", "y".repeat(big))),
        dead("huge_cancel", "payload_too_large"),
    ));
    let notes = "notes_60k";
    out.push((
        Outgoing::new(
            B,
            notes,
            with_field(base(notes), "notes", json!("n'; --".repeat(10_240))),
        ),
        booking(notes, &owner, &room, "Accepted"),
    ));
    let long_user = "user_60k";
    out.push((
        Outgoing::new(
            B,
            long_user,
            with_field(base(long_user), "userId", json!("u".repeat(60 * 1024))),
        ),
        dead(long_user, "invalid_field"),
    ));
    let longest = "é".repeat(255);
    out.push((
        Outgoing::new(
            B,
            &longest,
            with_field(base(&longest), "paymentId", json!("🏨".repeat(255))),
        ),
        booking(&longest, &owner, &room, "Accepted"),
    ));
    let too_long = "é".repeat(256);
    out.push((
        Outgoing::new(B, &too_long, base(&too_long).to_string()),
        dead(&too_long, "invalid_field"),
    ));

    // Headers whose names or values are not UTF-8.
    let h1 = "header_raw_name";
    let mut r = Outgoing::new(B, h1, base(h1).to_string());
    r.raw_header = Some((vec![0xff, 0xfe, b'k'], b"v".to_vec()));
    out.push((r, booking(h1, &owner, &room, "Accepted")));
    let h2 = "header_raw_name_and_value";
    let mut r = Outgoing::new(B, h2, base(h2).to_string());
    r.raw_header = Some((vec![0xc3, 0x28, b'B'], vec![0xff, 0x00, 0xfe]));
    out.push((r, booking(h2, &owner, &room, "Accepted")));
    let h3 = "header_baggage_not_utf8";
    out.push((
        Outgoing::new(B, h3, base(h3).to_string()).header("Baggage", &[b't', b'=', 0xff, 0xfe]),
        dead(h3, "invalid_header"),
    ));
    let h4 = "header_baggage_upper";
    out.push((
        Outgoing::new(B, h4, base(h4).to_string()).header("BAGGAGE", format!("k={META}").as_bytes()),
        booking(h4, &owner, &room, "Accepted"),
    ));
    let h5 = "header_baggage_first_wins";
    out.push((
        Outgoing::new(B, h5, base(h5).to_string())
            .header("baggage", b"first=1")
            .header("Baggage", &[0xff]),
        booking(h5, &owner, &room, "Accepted"),
    ));
    let h6 = "header_baggage_huge";
    out.push((
        Outgoing::new(B, h6, base(h6).to_string()).header("Baggage", "k=v,".repeat(25_000).as_bytes()),
        booking(h6, &owner, &room, "Accepted"),
    ));
    let h7 = "header_empty_name";
    out.push((
        Outgoing::new(B, h7, base(h7).to_string())
            .header("", b"")
            .header("x", &[0xff; 64]),
        booking(h7, &owner, &room, "Accepted"),
    ));
    let h8 = "header_nul_baggage_dead";
    out.push((
        Outgoing::new(B, h8, booking_payload(h8, "nobody_here", &room).to_string()).header("Baggage", b"a=\0\0b"),
        dead(h8, "unknown_user"),
    ));
    let h9 = "header_cancel_not_utf8";
    out.push((
        Outgoing::new(C, h9, cancel_payload(h9, &owner)).header("Baggage", &[0xc0, 0x80]),
        dead(h9, "invalid_header"),
    ));

    // The flood: random records of the kinds above.
    for n in 0..flood {
        let id = format!("flood_{n}");
        let (record, end) = match rng.u8(..6) {
            0 | 1 => {
                let topic = if rng.bool() { B } else { C };
                (
                    Outgoing::new(topic, &id, random_bytes(rng)),
                    dead(&id, "malformed_json"),
                )
            }
            2 => {
                let (field, value, reason) = match rng.u8(..4) {
                    0 => ("guests", json!(format!("{}", rng.u8(..))), "invalid_field"),
                    1 => (
                        "startDate",
                        json!(bad_dates[rng.usize(..bad_dates.len())]),
                        "invalid_field",
                    ),
                    2 => ("userId", json!(rng.f64() * 1e9), "invalid_field"),
                    _ => ("roomId", json!([META]), "invalid_field"),
                };
                (
                    Outgoing::new(B, &id, with_field(base(&id), field, value)),
                    dead(&id, reason),
                )
            }
            3 => (
                Outgoing::new(B, &id, booking_payload(&id, &format!("{META} {n}"), &room).to_string()),
                dead(&id, "unknown_user"),
            ),
            4 => {
                let mut value: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
                value.push(0xff);
                (
                    Outgoing::new(B, &id, base(&id).to_string()).header("Baggage", &value),
                    dead(&id, "invalid_header"),
                )
            }
            _ => {
                let mut r = Outgoing::new(B, &id, base(&id).to_string());
                let mut name: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(1..)).collect();
                name.push(0xfe);
                r.raw_header = Some((name, (0..rng.usize(..32)).map(|_| rng.u8(..)).collect()));
                (r, booking(&id, &owner, &room, "Accepted"))
            }
        };
        out.push((record, end));
    }

    let mut records = Vec::with_capacity(out.len());
    for (record, end) in out {
        match end {
            End::Booking { id, user, room, status } => {
                assert!(
                    expected
                        .bookings
                        .insert(id.clone(), ExpectedBooking { user, room, status })
                        .is_none(),
                    "hostile booking id {id:?} is used twice"
                );
            }
            End::Dead { id, reason } => {
                *expected.dead_letters.entry(reason).or_default() += 1;
                expected.dead_letter_ids.push((id, reason));
            }
            End::Folded => {}
        }
        records.push(record);
    }
    // The ledger resolves these identifiers too.
    world.user_ids.insert(meta_user, meta_user_id);
    world.user_ids.insert(meta_email, meta_user_id);
    world.room_ids.insert(meta_room, meta_room_id);
    records
}
