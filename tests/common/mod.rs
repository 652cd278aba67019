//! Shared integration-test support: reaching the real Kafka broker and PostgreSQL started by
//! `scripts/test.sh`, a fresh database per test, a producer, the worker as a child process with its
//! log lines captured, and a TCP proxy that can cut the database away.
#![allow(dead_code)]

pub mod own;

use postgres::{Client, NoTls, Row};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the services are, from the environment `scripts/test.sh` sets.
#[derive(Debug, Clone)]
pub struct Services {
    pub brokers: String,
    pub db_host: String,
    pub db_port: u16,
    pub db_user: String,
    pub db_password: String,
    pub db_name: String,
}

fn reachable(host: &str, port: u16) -> bool {
    match (host, port).to_socket_addrs() {
        Ok(addrs) => addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()),
        Err(_) => false,
    }
}

/// The services, or `None` (with a loud message) when they are not reachable and not required.
/// Under `BOOKING_WORKER_REQUIRE_SERVICES=1` (set by `scripts/test.sh`) a missing service fails
/// the test instead.
pub fn services() -> Option<Services> {
    services_from(&|name| std::env::var(name).ok())
}

/// [`services`] with the environment given as a lookup function.
pub fn services_from(env: &dyn Fn(&str) -> Option<String>) -> Option<Services> {
    let env_or = |name: &str, default: &str| {
        env(name)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    let s = Services {
        brokers: env_or("KAFKA_BROKERS", "localhost:9092"),
        db_host: env_or("DB_HOST", "localhost"),
        db_port: env_or("DB_PORT", "5432")
            .parse()
            .expect("DB_PORT must be a port number"),
        db_user: env_or("DB_USER", "postgres"),
        db_password: env_or("DB_PASSWORD", "postgres"),
        db_name: env_or("DB_NAME", "booking_management"),
    };
    let broker = s.brokers.split(',').next().unwrap_or_default().trim().to_string();
    let (bhost, bport) = broker.rsplit_once(':').unwrap_or((broker.as_str(), "9092"));
    let mut missing = Vec::new();
    if !reachable(bhost, bport.parse().unwrap_or(9092)) {
        missing.push(format!("Kafka broker at {broker}"));
    }
    if !reachable(&s.db_host, s.db_port) {
        missing.push(format!("PostgreSQL at {}:{}", s.db_host, s.db_port));
    }
    if missing.is_empty() {
        return Some(s);
    }
    let message = format!(
        "{} not reachable (run the tests with scripts/test.sh)",
        missing.join(" and ")
    );
    if env("BOOKING_WORKER_REQUIRE_SERVICES").as_deref() == Some("1") {
        panic!("required service missing: {message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// A unique name for this test's topics, groups and database.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A database of its own for one test, with booking-management's schema and the worker's
/// migrations. Dropped at the end.
pub struct TestDb {
    pub services: Services,
    pub name: String,
}

impl TestDb {
    pub fn create(services: &Services, tag: &str) -> TestDb {
        let db = TestDb::create_empty(services, tag);
        db.exec(include_str!("../../sql/schema.sql"));
        booking_worker::repository::migrate(&mut db.conn(), Duration::from_secs(2)).expect("worker migrations");
        db
    }

    /// A database of its own with nothing in it.
    pub fn create_empty(services: &Services, tag: &str) -> TestDb {
        let name = unique(&format!("bw_{tag}")).to_lowercase();
        let mut admin = services.connect(&services.db_name);
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create test database");
        TestDb {
            services: services.clone(),
            name,
        }
    }

    pub fn conn(&self) -> Client {
        self.services.connect(&self.name)
    }

    /// A login role with exactly the rights the worker needs at run time.
    pub fn worker_role(&self) -> (String, String) {
        let role = unique("bw_role").to_lowercase();
        let password = "worker-pw".to_string();
        self.exec(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}';
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT ON users, rooms TO {role};
             GRANT SELECT, INSERT, UPDATE ON bookings TO {role};
             GRANT USAGE ON SEQUENCE bookings_id_seq TO {role};
             DO $$ BEGIN
               IF to_regnamespace('booking_worker') IS NOT NULL THEN
                 EXECUTE 'GRANT USAGE ON SCHEMA booking_worker TO {role}';
                 EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA booking_worker TO {role}';
                 EXECUTE 'GRANT USAGE ON ALL SEQUENCES IN SCHEMA booking_worker TO {role}';
               END IF;
             END $$;"
        ));
        (role, password)
    }

    pub fn exec(&self, sql: &str) {
        self.conn()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", why(e)));
    }

    /// The rows of a query without parameters.
    pub fn rows(&self, sql: &str) -> Vec<Row> {
        self.conn()
            .query(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {}", why(e)))
    }

    /// The one value a query returns.
    pub fn value<T: for<'a> postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.conn()
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {}", why(e)))
            .get(0)
    }

    /// Inserts a user and returns its id.
    pub fn user(&self, email: &str, username: &str) -> i32 {
        self.conn()
            .query_one(
                "INSERT INTO users (email, username, date_of_birth, name, surname)
                 VALUES ($1, $2, '1990-01-01', 'Test', 'User') RETURNING id",
                &[&email, &username],
            )
            .expect("insert user")
            .get(0)
    }

    /// Inserts a room and returns its id.
    pub fn room(&self, internal_id: &str) -> i32 {
        self.conn()
            .query_one(
                "INSERT INTO rooms (internal_id, name, floor, bathrooms, beds, capacity)
                 VALUES ($1, 'Room', 1, 1, 2, 4) RETURNING id",
                &[&internal_id],
            )
            .expect("insert room")
            .get(0)
    }

    pub fn bookings(&self) -> Vec<BookingRow> {
        self.rows(
            "SELECT id, user_id, room_id, number_of_guests, start_date::text AS start_date,
                    end_date::text AS end_date, payment_id::text AS payment_id, status::text AS status,
                    external_id::text AS external_id, (updated_at > created_at) AS updated
               FROM bookings ORDER BY id",
        )
        .iter()
        .map(|r| BookingRow {
            id: r.get("id"),
            user_id: r.get("user_id"),
            room_id: r.get("room_id"),
            number_of_guests: r.get("number_of_guests"),
            start_date: r.get("start_date"),
            end_date: r.get("end_date"),
            payment_id: r.get("payment_id"),
            status: r.get("status"),
            external_id: r.get("external_id"),
            updated: r.get("updated"),
        })
        .collect()
    }

    pub fn booking(&self, external_id: &str) -> Option<BookingRow> {
        self.bookings()
            .into_iter()
            .find(|b| b.external_id.as_deref() == Some(external_id))
    }

    pub fn dead_letters(&self) -> Vec<DeadLetterRow> {
        self.rows(
            "SELECT topic, kafka_partition, kafka_offset, booking_id, reason, error, baggage,
                    sqlstate::text AS sqlstate, octet_length(payload)::bigint AS payload_len
               FROM booking_worker.dead_letters ORDER BY id",
        )
        .iter()
        .map(|r| DeadLetterRow {
            topic: r.get("topic"),
            kafka_partition: r.get("kafka_partition"),
            kafka_offset: r.get("kafka_offset"),
            booking_id: r.get("booking_id"),
            reason: r.get("reason"),
            error: r.get("error"),
            baggage: r.get("baggage"),
            sqlstate: r.get("sqlstate"),
            payload_len: r.get("payload_len"),
        })
        .collect()
    }

    pub fn parked(&self) -> Vec<String> {
        self.rows("SELECT booking_ref FROM booking_worker.pending_cancellations ORDER BY id")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Everything the worker writes, as comparable text: bookings, dead letters, parked rows.
    pub fn snapshot(&self) -> String {
        self.value(
            "SELECT concat_ws(E'\\n',
                (SELECT string_agg(concat_ws('|', id, user_id, room_id, number_of_guests, start_date, end_date,
                                             payment_id, status, external_id, created_at, updated_at), E'\\n' ORDER BY id)
                   FROM bookings),
                (SELECT string_agg(concat_ws('|', id, topic, kafka_partition, kafka_offset, reason), E'\\n' ORDER BY id)
                   FROM booking_worker.dead_letters),
                (SELECT string_agg(concat_ws('|', id, booking_ref, kafka_offset), E'\\n' ORDER BY id)
                   FROM booking_worker.pending_cancellations)) AS s",
        )
    }

    /// Worker environment pointing at this database.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            ("DB_HOST".into(), self.services.db_host.clone()),
            ("DB_PORT".into(), self.services.db_port.to_string()),
            ("DB_USER".into(), self.services.db_user.clone()),
            ("DB_PASSWORD".into(), self.services.db_password.clone()),
            ("DB_NAME".into(), self.name.clone()),
            ("DB_SSLMODE".into(), "disable".into()),
            ("KAFKA_BROKERS".into(), self.services.brokers.clone()),
        ]
    }
}

/// A database error with the server's message and SQLSTATE.
pub fn why(e: postgres::Error) -> String {
    booking_worker::database::DbError::from(e).to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&self.services.url(&self.services.db_name), NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name));
        }
    }
}

impl Services {
    pub fn url(&self, db: &str) -> String {
        format!(
            "host='{}' port={} user='{}' password='{}' dbname='{}' sslmode=disable",
            self.db_host, self.db_port, self.db_user, self.db_password, db
        )
    }

    /// A plain connection to one database, as the superuser the tests run as.
    pub fn connect(&self, db: &str) -> Client {
        Client::connect(&self.url(db), NoTls).unwrap_or_else(|e| panic!("connect to PostgreSQL database {db}: {e}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingRow {
    pub id: i32,
    pub user_id: i32,
    pub room_id: i32,
    pub number_of_guests: i32,
    pub start_date: String,
    pub end_date: String,
    pub payment_id: Option<String>,
    pub status: String,
    pub external_id: Option<String>,
    pub updated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub booking_id: Option<String>,
    pub reason: String,
    pub error: String,
    pub baggage: Option<String>,
    pub sqlstate: Option<String>,
    pub payload_len: i64,
}

/// Counts delivery failures so a test can insist on none.
#[derive(Default)]
pub struct DeliveryCheck {
    pub failed: AtomicUsize,
}

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            eprintln!("delivery failed: {e}");
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A synchronous producer for test records.
pub struct TestProducer {
    producer: BaseProducer<DeliveryCheck>,
}

impl TestProducer {
    pub fn new(services: &Services) -> TestProducer {
        TestProducer::with_config(services, &[])
    }

    /// A producer with extra librdkafka properties (e.g. `enable.idempotence`).
    pub fn with_config(services: &Services, extra: &[(&str, &str)]) -> TestProducer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &services.brokers)
            .set("message.max.bytes", "4000000")
            .set("compression.type", "zstd")
            .set("linger.ms", "5");
        for (k, v) in extra {
            config.set(*k, *v);
        }
        let producer = config
            .create_with_context(DeliveryCheck::default())
            .expect("create producer");
        TestProducer { producer }
    }

    /// Deliveries that failed so far.
    pub fn failed(&self) -> usize {
        self.producer.context().failed.load(Ordering::SeqCst)
    }

    /// Sends one record, keyed, with optional raw headers.
    pub fn send(&self, topic: &str, key: &str, payload: &[u8], headers: &[(&str, &[u8])]) {
        let mut owned = OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = BaseRecord::to(topic).key(key).payload(payload).headers(owned);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    self.producer.poll(Duration::from_millis(50));
                    record = r;
                }
                Err((e, _)) => panic!("produce to {topic}: {e}"),
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until everything sent is acknowledged, and insists nothing failed.
    /// Waits up to `timeout` for every queued record to be delivered (or to fail); see
    /// [`TestProducer::failed`].
    pub fn flush_within(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            eprintln!("flush: {e}");
            self.producer.context().failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(30)).expect("flush producer");
        assert_eq!(
            self.producer.context().failed.load(Ordering::SeqCst),
            0,
            "deliveries failed"
        );
    }

    /// Sends a record with a header whose name is not UTF-8. rdkafka's safe API only takes `&str`
    /// names, so this goes through librdkafka's `rd_kafka_produceva`.
    pub fn send_raw_header_name(&self, topic: &str, key: &str, payload: &[u8], name: &[u8], value: &[u8]) {
        use rdkafka::bindings as rd;
        use rdkafka::bindings::rd_kafka_vtype_t as V;
        let topic = std::ffi::CString::new(topic).expect("topic without NUL");
        let name = std::ffi::CString::new(name).expect("header name without NUL");
        let vu = |vtype: V, u: rd::rd_kafka_vu_s__bindgen_ty_1| rd::rd_kafka_vu_t { vtype, u };
        // SAFETY: the headers object is handed to librdkafka (which owns it after a successful
        // produce and is destroyed here otherwise); every pointer outlives the call, and
        // RD_KAFKA_MSG_F_COPY makes librdkafka copy key and value before returning.
        unsafe {
            let headers = rd::rd_kafka_headers_new(1);
            rd::rd_kafka_header_add(headers, name.as_ptr(), -1, value.as_ptr().cast(), value.len() as isize);
            let vus = [
                vu(
                    V::RD_KAFKA_VTYPE_TOPIC,
                    rd::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic.as_ptr() },
                ),
                vu(
                    V::RD_KAFKA_VTYPE_KEY,
                    rd::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: key.as_ptr() as *mut _,
                            size: key.len(),
                        },
                    },
                ),
                vu(
                    V::RD_KAFKA_VTYPE_VALUE,
                    rd::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: payload.as_ptr() as *mut _,
                            size: payload.len(),
                        },
                    },
                ),
                vu(
                    V::RD_KAFKA_VTYPE_MSGFLAGS,
                    rd::rd_kafka_vu_s__bindgen_ty_1 {
                        i: rd::RD_KAFKA_MSG_F_COPY,
                    },
                ),
                vu(V::RD_KAFKA_VTYPE_HEADERS, rd::rd_kafka_vu_s__bindgen_ty_1 { headers }),
            ];
            let error = rd::rd_kafka_produceva(self.producer.client().native_ptr(), vus.as_ptr(), vus.len());
            if !error.is_null() {
                rd::rd_kafka_headers_destroy(headers);
                let text = std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error))
                    .to_string_lossy()
                    .into_owned();
                rd::rd_kafka_error_destroy(error);
                panic!("produce with a raw header name: {text}");
            }
        }
    }
}

/// Whether the broker has this topic, asked by a client that never creates topics.
pub fn topic_exists(services: &Services, topic: &str) -> bool {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services.brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create metadata client");
    use rdkafka::consumer::Consumer;
    match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
        Ok(m) => m
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
        Err(_) => false,
    }
}

/// Payload of a booking event.
pub fn booking_json(booking_id: &str, user: &str, room: &str, guests: i64, start: &str, end: &str) -> String {
    serde_json::json!({
        "userId": user, "roomId": room, "guests": guests, "startDate": start, "endDate": end,
        "bookingId": booking_id, "paymentId": format!("pay_{booking_id}"),
    })
    .to_string()
}

/// Payload of a cancellation event.
pub fn cancel_json(booking_id: &str, user: &str) -> String {
    serde_json::json!({"bookingId": booking_id, "userId": user, "timestamp": "2025-01-18T10:30:00Z"}).to_string()
}

/// Polls `check` until it holds or `timeout` passes; then fails with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

/// The worker binary running as a child process, its JSON log lines captured.
pub struct WorkerProcess {
    child: Child,
    /// Where this worker serves `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
    pub lines: Arc<Mutex<Vec<String>>>,
    /// What the worker wrote on stderr (a panic message would land here); echoed as it comes.
    pub stderr_lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<()>>,
    pub name: String,
}

impl WorkerProcess {
    pub fn spawn(name: &str, env: &[(String, String)]) -> WorkerProcess {
        let metrics_addr = free_local_addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_booking-worker"));
        cmd.arg("run")
            .env_clear()
            .env("METRICS_ADDR", &metrics_addr)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "info")
            .env("BATCH_LINGER_MS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Short sessions for the classic protocol; under KIP-848's the broker keeps them.
        if !env.iter().any(|(k, v)| k == "KAFKA_GROUP_PROTOCOL" && v == "consumer") {
            cmd.env("KAFKA_PROP_SESSION_TIMEOUT_MS", "6000")
                .env("KAFKA_PROP_HEARTBEAT_INTERVAL_MS", "500");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start booking-worker");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stderr_sink = Arc::clone(&stderr_lines);
        let stderr_tag = name.to_string();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{stderr_tag} stderr] {line}");
                stderr_sink.lock().unwrap().push(line);
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let tag = name.to_string();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if std::env::var("WORKER_LOGS").is_ok() {
                    eprintln!("[{tag}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        WorkerProcess {
            child,
            metrics_addr,
            lines,
            stderr_lines,
            reader: Some(reader),
            stderr_reader: Some(stderr_reader),
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Log lines parsed as JSON; every line must be JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self, timeout: Duration) -> i32 {
        self.signal("TERM");
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for worker") {
                for r in [self.reader.take(), self.stderr_reader.take()].into_iter().flatten() {
                    let _ = r.join();
                }
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a log line with this `msg` was written.
    pub fn logged(&self, msg: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(msg))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback address with a port nobody listens on right now.
pub fn free_local_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").to_string()
}

/// A TCP proxy in front of PostgreSQL that a test can cut: open connections are reset and new
/// ones refused until it is restored. [`CuttableProxy::cut`] keeps the port open and closes each
/// new connection at once; [`CuttableProxy::refuse`] closes the listening socket itself, so that
/// connecting fails with "connection refused".
pub struct CuttableProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl CuttableProxy {
    pub fn start(target_host: &str, target_port: u16) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let listening = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let target = format!("{target_host}:{target_port}");
        let (up2, listening2, conns2, stop2) = (
            Arc::clone(&up),
            Arc::clone(&listening),
            Arc::clone(&conns),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut listener = Some(listener);
            while !stop2.load(Ordering::SeqCst) {
                if !listening2.load(Ordering::SeqCst) {
                    listener = None;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let Some(open) = listener.as_ref() else {
                    // Listen again on the same port (std sets SO_REUSEADDR).
                    match TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => {
                            l.set_nonblocking(true).unwrap();
                            listener = Some(l);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                    continue;
                };
                match open.accept() {
                    Ok((client, _)) => {
                        if !up2.load(Ordering::SeqCst) {
                            let _ = client.shutdown(NetShutdown::Both);
                            continue;
                        }
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        let mut list = conns2.lock().unwrap();
                        list.push(client.try_clone().unwrap());
                        list.push(server.try_clone().unwrap());
                        drop(list);
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        CuttableProxy {
            port,
            up,
            listening,
            conns,
            stop,
        }
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(NetShutdown::Both);
        }
    }

    /// Like [`CuttableProxy::cut`], and stops listening: new connections are refused by the
    /// kernel (ECONNREFUSED), as when the server is down. Returns once the port is closed.
    pub fn refuse(&self) {
        self.listening.store(false, Ordering::SeqCst);
        self.cut();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lets connections through again (listening again after [`CuttableProxy::refuse`]).
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        if !self.listening.swap(true, Ordering::SeqCst) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect(("127.0.0.1", self.port)).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(NetShutdown::Both);
        let _ = from.shutdown(NetShutdown::Both);
    });
}

/// `GET path` on a worker's endpoint: status and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The samples of a Prometheus text exposition, checked line by line: `# HELP`/`# TYPE` comments
/// and `name{label="value",...} number` samples. Panics on a line that is neither.
pub fn parse_prometheus(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = std::collections::BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name, labels)
            }
        };
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        samples.push((name.to_string(), labels, value));
    }
    samples
}

/// The sum of the samples of `name` whose labels include all of `labels`.
pub fn metric_sum(
    samples: &[(String, std::collections::BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
        .sum()
}

/// How long a test waits for the worker to reach a state.
pub const WAIT: Duration = Duration::from_secs(90);

/// One test's world: its database, topics, consumer group and producer.
pub struct Setup {
    pub services: Services,
    pub db: TestDb,
    pub bookings: String,
    pub cancels: String,
    pub group: String,
    pub producer: TestProducer,
}

impl Setup {
    pub fn new(tag: &str) -> Option<Setup> {
        Some(Setup::with_services(tag, services()?))
    }

    /// A setup on these services (a broker or a database of the test's own, say).
    pub fn with_services(tag: &str, services: Services) -> Setup {
        let db = TestDb::create(&services, tag);
        Setup {
            producer: TestProducer::new(&services),
            bookings: unique(&format!("booking-events-{tag}")),
            cancels: unique(&format!("booking-cancellations-{tag}")),
            group: unique(&format!("group-{tag}")),
            services,
            db,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.db.worker_env();
        env.push(("KAFKA_BOOKING_TOPIC".into(), self.bookings.clone()));
        env.push(("KAFKA_CANCELLATION_TOPIC".into(), self.cancels.clone()));
        env.push(("KAFKA_GROUP_ID".into(), self.group.clone()));
        env
    }

    pub fn start(&self, name: &str) -> WorkerProcess {
        WorkerProcess::spawn(name, &self.env())
    }

    pub fn start_with(&self, name: &str, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        WorkerProcess::spawn(name, &env)
    }

    pub fn book(&self, id: &str, user: &str, room: &str) {
        let payload = booking_json(id, user, room, 2, "2025-01-15", "2025-01-18");
        self.producer.send(&self.bookings, id, payload.as_bytes(), &[]);
    }

    pub fn cancel(&self, id: &str, user: &str) {
        self.producer
            .send(&self.cancels, id, cancel_json(id, user).as_bytes(), &[]);
    }

    pub fn wait_status(&self, id: &str, status: &str) {
        wait_for(&format!("booking {id} to be {status}"), WAIT, || {
            self.db.booking(id).is_some_and(|b| b.status == status)
        });
    }

    pub fn wait_rows(&self, n: usize) {
        wait_for(&format!("{n} bookings"), WAIT, || self.db.bookings().len() >= n);
    }
}

/// The `KEY=value` lines a script printed on stdout.
pub fn key_values(stdout: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs a container script of the repository (`scripts/container-image.sh`,
/// `tests/container/*.sh`) with these variables and the test binary as `BINARY`: its `KEY=value`
/// lines and its whole stdout. A non-zero exit fails the test; exit 77 (podman cannot run here)
/// fails it too when services are required, and is `None` otherwise.
pub fn container_script(
    path: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Option<(std::collections::HashMap<String, String>, String)> {
    let out = Command::new("bash")
        .arg(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("BINARY", env!("CARGO_BIN_EXE_booking-worker"))
        .output()
        .expect("run a container script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        assert!(
            std::env::var("BOOKING_WORKER_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "podman cannot run here (scripts/install-deps.sh installs it): {stderr}"
        );
        eprintln!("SKIPPED: podman cannot run here: {stderr}");
        return None;
    }
    assert!(out.status.success(), "{path} {args:?} failed:\n{stderr}");
    Some((
        key_values(&out.stdout),
        String::from_utf8_lossy(&out.stdout).to_string(),
    ))
}
