//! `booking-loadgen`: publishes a planned stream of booking and cancellation events through a
//! synchronous rdkafka producer, at a chosen rate and mix, and writes the expected end state.

use booking_worker::loadgen::{plan, PlanConfig, Record, Topic};
use booking_worker::logger;
use clap::Parser;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "booking-loadgen",
    version,
    about = "Publishes booking and cancellation events for demos, benchmarks and reliability tests."
)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic of booking events.
    #[arg(long, env = "KAFKA_BOOKING_TOPIC", default_value = "booking-events")]
    booking_topic: String,
    /// Topic of cancellations.
    #[arg(long, env = "KAFKA_CANCELLATION_TOPIC", default_value = "booking-cancellations")]
    cancellation_topic: String,
    /// Booking events to publish (distinct booking ids).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Records per second; 0 publishes as fast as the broker takes them.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Share of bookings that get a cancellation.
    #[arg(long, default_value_t = 0.2)]
    cancel_ratio: f64,
    /// Share of cancellations published before their booking.
    #[arg(long, default_value_t = 0.1)]
    early_cancel_ratio: f64,
    /// Share of cancellations sent by someone other than the owner.
    #[arg(long, default_value_t = 0.05)]
    unauthorized_ratio: f64,
    /// Share of booking events published twice.
    #[arg(long, default_value_t = 0.02)]
    duplicate_ratio: f64,
    /// Bad records added, as a share of booking events.
    #[arg(long, default_value_t = 0.01)]
    bad_ratio: f64,
    /// Share of records with a Baggage header.
    #[arg(long, default_value_t = 0.5)]
    baggage_ratio: f64,
    /// Existing users (ids, emails or usernames), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "user_123,bob,carol,dave")]
    users: Vec<String>,
    /// Existing rooms (internal ids), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "room_ocean_001,room_ocean_002,room_garden_101,room_city_201"
    )]
    rooms: Vec<String>,
    /// Prefix of the generated booking ids (default: `lg` and the Unix time).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Random seed; the same seed and options give the same stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Producer compression: none, gzip, lz4 or zstd.
    #[arg(long, default_value = "lz4")]
    compression: String,
    /// Producer linger.ms: how long a batch waits for more records. A record's Kafka timestamp is
    /// taken before that wait, so it counts in the worker's end-to-end latency; 0 sends each
    /// record at once, as a service's producer that flushes at once does.
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,
    /// Write the expected end state (bookings and dead letters) to this JSON file.
    #[arg(long)]
    ledger: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                log::error!(error = e.to_string(); "delivery failed");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Why the load generator stopped early: the exit code and what to tell the user.
struct Failure(u8, String);

fn main() -> ExitCode {
    let args = Args::parse();
    logger::init("info", true);
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Failure(code, message)) => {
            eprintln!("booking-loadgen: {message}");
            ExitCode::from(code)
        }
    }
}

/// Plans the stream, publishes it and prints a summary; `Ok(false)` when a delivery failed.
fn run(args: &Args) -> Result<bool, Failure> {
    check(args)?;
    let (records, expected) = plan(&plan_config(args));
    if let Some(path) = &args.ledger {
        let json = serde_json::to_vec_pretty(&expected).expect("the ledger serializes");
        std::fs::write(path, json).map_err(|e| Failure(1, format!("cannot write {}: {e}", path.display())))?;
    }
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", args.linger_ms.to_string())
        .set("compression.type", &args.compression)
        .set("queue.buffering.max.messages", "200000")
        .set("enable.idempotence", "true")
        .create_with_context(Deliveries::default())
        .map_err(|e| Failure(4, format!("cannot create the producer: {e}")))?;
    let started = Instant::now();
    publish(&producer, args, &records, started)?;
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| Failure(4, format!("flush failed: {e}")))?;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "records": records.len(),
        "bookings": expected.bookings.len(),
        "cancellations": records.iter().filter(|r| r.topic == Topic::Cancellations).count(),
        "expected_dead_letters": expected.dead_letters,
        "delivered": producer.context().ok.load(Ordering::Relaxed),
        "failed": failed,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "records_per_s": (records.len() as f64 / elapsed.max(1e-9)).round(),
    });
    println!("{summary}");
    Ok(failed == 0)
}

/// Refuses options that cannot make a stream (exit code 2).
fn check(args: &Args) -> Result<(), Failure> {
    for (name, value) in [
        ("--cancel-ratio", args.cancel_ratio),
        ("--early-cancel-ratio", args.early_cancel_ratio),
        ("--unauthorized-ratio", args.unauthorized_ratio),
        ("--duplicate-ratio", args.duplicate_ratio),
        ("--bad-ratio", args.bad_ratio),
        ("--baggage-ratio", args.baggage_ratio),
    ] {
        if !(0.0..=1.0).contains(&value) {
            return Err(Failure(2, format!("{name} must be between 0 and 1, got {value}")));
        }
    }
    if args.users.is_empty() || args.rooms.is_empty() || args.rate < 0.0 {
        let message = "--users and --rooms need at least one value, --rate must be >= 0";
        return Err(Failure(2, message.to_string()));
    }
    Ok(())
}

fn plan_config(args: &Args) -> PlanConfig {
    let id_prefix = args.id_prefix.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("lg{secs}")
    });
    PlanConfig {
        bookings: args.count,
        cancel_ratio: args.cancel_ratio,
        early_cancel_ratio: args.early_cancel_ratio,
        unauthorized_ratio: args.unauthorized_ratio,
        duplicate_ratio: args.duplicate_ratio,
        bad_ratio: args.bad_ratio,
        baggage_ratio: args.baggage_ratio,
        users: args.users.clone(),
        rooms: args.rooms.clone(),
        id_prefix,
        seed: args.seed,
    }
}

/// Sends every record at the chosen rate, reporting progress once a second.
fn publish(
    producer: &BaseProducer<Deliveries>,
    args: &Args,
    records: &[Record],
    started: Instant,
) -> Result<(), Failure> {
    let mut last_report = Instant::now();
    for (i, record) in records.iter().enumerate() {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let topic = match record.topic {
            Topic::Bookings => &args.booking_topic,
            Topic::Cancellations => &args.cancellation_topic,
        };
        send(producer, topic, record)?;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            log::info!(sent = i + 1, total = records.len(),
                delivered = producer.context().ok.load(Ordering::Relaxed); "publishing");
        }
    }
    Ok(())
}

/// Sends one record, waiting while the producer's queue is full.
fn send(producer: &BaseProducer<Deliveries>, topic: &str, record: &Record) -> Result<(), Failure> {
    let mut headers = OwnedHeaders::new();
    if let Some(b) = &record.baggage {
        headers = headers.insert(Header {
            key: "Baggage",
            value: Some(b.as_slice()),
        });
    }
    let mut out = BaseRecord::to(topic)
        .key(record.key.as_str())
        .payload(record.payload.as_slice())
        .headers(headers);
    loop {
        match producer.send(out) {
            Ok(()) => break,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                producer.poll(Duration::from_millis(20));
                out = r;
            }
            Err((e, _)) => return Err(Failure(4, format!("cannot produce to {topic}: {e}"))),
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}
