//! Worker configuration read from environment variables, with the Go worker's names and defaults.
//!
//! Parsing is pure: [`Config::from_vars`] takes `(name, value)` pairs, so tests feed it a list and
//! production feeds it the process environment. Every refused value names its variable and what
//! it accepts.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Prefix of environment variables passed through to librdkafka: `KAFKA_PROP_SECURITY_PROTOCOL=ssl`
/// becomes `security.protocol=ssl`.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROP_";

/// The librdkafka properties that `KAFKA_PROP_*` may not set, because the worker's correctness
/// relies on them (or a setting of its own sets them), with what to do instead.
pub const REFUSED_PROPERTIES: &[(&str, &str)] = &[
    ("group.id", "KAFKA_GROUP_ID sets it"),
    ("bootstrap.servers", "KAFKA_BROKERS sets it"),
    ("metadata.broker.list", "KAFKA_BROKERS sets it"),
    (
        "enable.auto.commit",
        "the worker commits only offsets whose records are durable, through enable.auto.commit=true \
         with enable.auto.offset.store=false",
    ),
    (
        "enable.auto.offset.store",
        "the worker stores an offset only once its record is durable in PostgreSQL",
    ),
    ("auto.offset.reset", "KAFKA_START_FROM sets it"),
    ("allow.auto.create.topics", "KAFKA_ALLOW_AUTO_CREATE_TOPICS sets it"),
    ("group.protocol", "KAFKA_GROUP_PROTOCOL sets it"),
    (
        "enable.partition.eof",
        "the partition threads read their queues without end-of-partition events",
    ),
    (
        "isolation.level",
        "the worker reads committed records only (read_committed): an aborted booking must not apply",
    ),
    (
        "offset.store.method",
        "offsets are stored in the group, through the broker",
    ),
];

/// A configuration value that cannot be used, naming the variable and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub variable: String,
    pub value: String,
    pub expected: String,
}

/// How the worker reaches PostgreSQL.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub name: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
    pub pool_size: u32,
    pub connect_timeout: Duration,
    /// `statement_timeout` of every session; zero turns it off.
    pub statement_timeout: Duration,
    /// `lock_timeout` of every session; zero turns it off.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout` of every session; zero turns it off.
    pub idle_in_transaction_timeout: Duration,
    /// Whether `run` applies pending migrations itself.
    pub migrate: MigrateMode,
    /// `lock_timeout` of each migration statement, which is retried when it runs out.
    pub migration_lock_timeout: Duration,
}

/// `DB_MIGRATE`: whether `run` applies the worker's pending migrations itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateMode {
    /// Apply them at start-up (the default).
    Auto,
    /// Only check: refuse to start while one is pending, naming it.
    Off,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("name", &self.name)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("idle_in_transaction_timeout", &self.idle_in_transaction_timeout)
            .field("migrate", &self.migrate)
            .field("migration_lock_timeout", &self.migration_lock_timeout)
            .finish()
    }
}

/// libpq's `sslmode`, limited to the values an operator should choose between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<SslMode> {
        [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|mode| mode.as_str() == value)
    }
}

/// How the worker reaches Kafka and what it consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub booking_topic: String,
    pub cancellation_topic: String,
    /// librdkafka properties: the worker's defaults first, then the `KAFKA_PROP_*` pass-through,
    /// which wins.
    pub properties: Vec<(String, String)>,
    /// Where a partition without a committed offset starts.
    pub start_from: StartFrom,
    /// How long the first start waits for the subscribed topics' partitions to be known.
    pub topic_wait: Duration,
    /// Whether subscribing asks the broker to create a missing topic.
    pub allow_auto_create_topics: bool,
    /// The consumer group protocol.
    pub group_protocol: GroupProtocol,
}

/// Properties of the classic group protocol that librdkafka refuses under KIP-848's.
const CLASSIC_ONLY_PROPERTIES: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
];

/// `KAFKA_GROUP_PROTOCOL`: the consumer group protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    /// The classic protocol: the group leader assigns, eager or cooperative per
    /// `partition.assignment.strategy`.
    Classic,
    /// KIP-848's protocol (Kafka 4's default for Java clients): the broker assigns, incrementally.
    Consumer,
}

impl GroupProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// `KAFKA_START_FROM`: where a partition that has no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The earliest retained record (the default).
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// The first record at or after this time (through the broker's offsets-for-times).
    Time(chrono::DateTime<chrono::Utc>),
}

impl StartFrom {
    fn parse(value: &str) -> Option<StartFrom> {
        match value {
            "" | "earliest" => Some(StartFrom::Earliest),
            "latest" => Some(StartFrom::Latest),
            other => chrono::DateTime::parse_from_rfc3339(other)
                .ok()
                .map(|t| StartFrom::Time(t.with_timezone(&chrono::Utc))),
        }
    }

    /// librdkafka's `auto.offset.reset` for it. A time sets each such partition's offset itself;
    /// where that look-up fails, the partition starts at the earliest record rather than skip any
    /// (a replay is idempotent).
    pub fn offset_reset(self) -> &'static str {
        match self {
            StartFrom::Earliest | StartFrom::Time(_) => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// The writer pool and the pipeline between consumer and writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    pub writers: usize,
    pub batch_size: usize,
    pub batch_linger: Duration,
    pub channel_capacity: usize,
    pub max_payload_bytes: usize,
    /// The cap on payload bytes in flight between the partition threads and the writers.
    pub max_in_flight_bytes: usize,
    pub retry_max_backoff: Duration,
    /// Whether a booking adopts a matching row the Go worker wrote (no external id) instead of
    /// inserting a second one.
    pub adopt_legacy_rows: bool,
    /// Consecutive records refused by the database after which the worker halts instead of
    /// dead-lettering more; zero never halts for this.
    pub reject_halt_after: u32,
    pub rebalance_drain_timeout: Duration,
    pub pending_cancellation_ttl: Duration,
    pub pending_check_interval: Duration,
}

/// Everything the worker needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    pub shutdown_timeout: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` when turned off.
    pub metrics_addr: Option<SocketAddr>,
    /// How often the one-line stats summary is logged; `None` when turned off.
    pub stats_log_interval: Option<Duration>,
}

/// One documented variable: its name, its default and what it does. The README's table is
/// generated from the same facts by `booking-worker --help`.
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable the worker reads, in the order `--help` lists them.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "DB_HOST",
        default: "localhost",
        help: "PostgreSQL host",
    },
    Variable {
        name: "DB_PORT",
        default: "5432",
        help: "PostgreSQL port",
    },
    Variable {
        name: "DB_USER",
        default: "postgres",
        help: "PostgreSQL user",
    },
    Variable {
        name: "DB_PASSWORD",
        default: "postgres",
        help: "PostgreSQL password (never logged)",
    },
    Variable {
        name: "DB_NAME",
        default: "booking_management",
        help: "PostgreSQL database",
    },
    Variable {
        name: "DB_SSLMODE",
        default: "prefer",
        help: "disable, prefer, require, verify-ca or verify-full",
    },
    Variable {
        name: "DB_SSLROOTCERT",
        default: "",
        help: "CA certificate file for verify-ca / verify-full",
    },
    Variable {
        name: "DB_POOL_SIZE",
        default: "WRITER_THREADS + 2",
        help: "connections in the r2d2 pool",
    },
    Variable {
        name: "DB_CONNECT_TIMEOUT_SECS",
        default: "5",
        help: "seconds to wait for a connection",
    },
    Variable {
        name: "DB_STATEMENT_TIMEOUT_MS",
        default: "30000",
        help: "statement_timeout of every session, ms (0: none); a timeout is retried",
    },
    Variable {
        name: "DB_LOCK_TIMEOUT_MS",
        default: "10000",
        help: "lock_timeout of every session, ms (0: none); a timeout is retried",
    },
    Variable {
        name: "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default: "60000",
        help: "idle_in_transaction_session_timeout of every session, ms (0: none)",
    },
    Variable {
        name: "DB_MIGRATE",
        default: "auto",
        help: "auto: run applies pending migrations; off: run refuses to start while one is pending",
    },
    Variable {
        name: "DB_MIGRATION_LOCK_TIMEOUT_MS",
        default: "2000",
        help: "lock_timeout of each migration statement, ms; it is retried when it runs out",
    },
    Variable {
        name: "DB_REJECT_HALT_AFTER",
        default: "25",
        help: "halt after this many consecutive records refused by the database (0: never)",
    },
    Variable {
        name: "KAFKA_BROKERS",
        default: "localhost:9092",
        help: "bootstrap servers, comma-separated",
    },
    Variable {
        name: "KAFKA_GROUP_ID",
        default: "booking-worker",
        help: "consumer group id",
    },
    Variable {
        name: "KAFKA_BOOKING_TOPIC",
        default: "booking-events",
        help: "topic of booking events",
    },
    Variable {
        name: "KAFKA_CANCELLATION_TOPIC",
        default: "booking-cancellations",
        help: "topic of cancellations",
    },
    Variable {
        name: "KAFKA_START_FROM",
        default: "earliest",
        help: "where a partition without a committed offset starts: earliest, latest or an RFC 3339 time",
    },
    Variable {
        name: "KAFKA_ALLOW_AUTO_CREATE_TOPICS",
        default: "true",
        help: "subscribing asks the broker to create a missing topic (a mistyped name creates one too)",
    },
    Variable {
        name: "KAFKA_GROUP_PROTOCOL",
        default: "classic",
        help: "consumer group protocol: classic, or consumer (KIP-848, assigned by the broker)",
    },
    Variable {
        name: "KAFKA_TOPIC_WAIT_SECS",
        default: "60",
        help: "how long the start waits for the subscribed topics' partitions before giving up (exit 5)",
    },
    Variable {
        name: "KAFKA_QUEUED_MAX_KBYTES",
        default: "256",
        help: "librdkafka prefetch buffer per partition, KiB",
    },
    Variable {
        name: "KAFKA_MAX_PARTITION_FETCH_BYTES",
        default: "65536",
        help: "largest fetch per partition, bytes (a larger record batch still comes whole)",
    },
    Variable {
        name: "KAFKA_FETCH_MAX_BYTES",
        default: "1048576",
        help: "largest fetch response, bytes",
    },
    Variable {
        name: "KAFKA_FETCH_QUEUE_BACKOFF_MS",
        default: "5",
        help: "pause before looking again at a partition queue that still holds records, ms",
    },
    Variable {
        name: "KAFKA_FETCH_WAIT_MAX_MS",
        default: "100",
        help: "longest the broker holds a fetch that has no new records, ms",
    },
    Variable {
        name: "KAFKA_STATS_INTERVAL_MS",
        default: "5000",
        help: "librdkafka statistics (the consumer-lag metric), ms; 0 turns them off",
    },
    Variable {
        name: "KAFKA_PROP_<NAME>",
        default: "",
        help: "any librdkafka property: KAFKA_PROP_SECURITY_PROTOCOL=ssl sets security.protocol",
    },
    Variable {
        name: "WRITER_THREADS",
        default: "2",
        help: "writer threads",
    },
    Variable {
        name: "BATCH_SIZE",
        default: "500",
        help: "events per database transaction, at most",
    },
    Variable {
        name: "BATCH_LINGER_MS",
        default: "5",
        help: "how long a writer waits to fill a batch",
    },
    Variable {
        name: "CHANNEL_CAPACITY",
        default: "512",
        help: "events queued per writer before consumption pauses",
    },
    Variable {
        name: "MAX_PAYLOAD_BYTES",
        default: "65536",
        help: "larger records are dead-lettered as payload_too_large",
    },
    Variable {
        name: "MAX_IN_FLIGHT_BYTES",
        default: "8388608",
        help: "payload bytes in flight to the writers before consumption pauses",
    },
    Variable {
        name: "RETRY_MAX_BACKOFF_MS",
        default: "5000",
        help: "cap of the backoff between database retries",
    },
    Variable {
        name: "ADOPT_LEGACY_ROWS",
        default: "true",
        help: "a booking adopts the matching row the Go worker wrote instead of inserting it again",
    },
    Variable {
        name: "REBALANCE_DRAIN_TIMEOUT_SECS",
        default: "30",
        help: "how long a revocation waits for in-flight events",
    },
    Variable {
        name: "PENDING_CANCELLATION_TTL_SECS",
        default: "86400",
        help: "parked cancellations older than this are dead-lettered",
    },
    Variable {
        name: "PENDING_CHECK_INTERVAL_SECS",
        default: "60",
        help: "how often parked cancellations are checked for expiry",
    },
    Variable {
        name: "SHUTDOWN_TIMEOUT_SECS",
        default: "30",
        help: "deadline for a clean shutdown after SIGINT/SIGTERM",
    },
    Variable {
        name: "METRICS_ADDR",
        default: "0.0.0.0:9090",
        help: "address of /metrics, /healthz and /readyz; off turns it off",
    },
    Variable {
        name: "STATS_LOG_INTERVAL_SECS",
        default: "60",
        help: "how often a one-line JSON stats summary is logged; 0 turns it off",
    },
    Variable {
        name: "LOG_LEVEL",
        default: "info",
        help: "error, warn, info, debug or trace (RUST_LOG wins when set)",
    },
];

/// The least `receive.message.max.bytes` the consumer gets: 32 MiB.
///
/// librdkafka also uses this property as the cap on a record batch's size once decompressed. When
/// a zstd frame does not state its size, the output buffer grows in steps of about 4x and gives up
/// at the first step above the cap, so a batch that decompresses to more than about a quarter of
/// the cap fails with "Invalid compressed data" on every fetch, and its partition never moves
/// again: one large (still valid) record would stop the worker. 32 MiB lets batches of several
/// MiB through whatever their compression; the memory is taken only while such a batch is being
/// decompressed (how much is fetched and queued is bounded by the fetch settings, not by this).
pub const MIN_RECEIVE_MESSAGE_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// `receive.message.max.bytes`: above the largest fetch response (librdkafka requires it), and
/// never below [`MIN_RECEIVE_MESSAGE_MAX_BYTES`].
pub fn receive_message_max_bytes(fetch_max_bytes: u64, partition_fetch_bytes: u64) -> u64 {
    (fetch_max_bytes.max(partition_fetch_bytes) + 1024 * 1024).max(MIN_RECEIVE_MESSAGE_MAX_BYTES)
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Config::from_vars(&vars)
    }

    /// Reads the configuration from `(name, value)` pairs, as the environment would give them.
    pub fn from_vars(vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let env = Env { vars };
        let writers = env.number("WRITER_THREADS", 2usize, 1, 256)?;
        let fetch_max_bytes = env.number("KAFKA_FETCH_MAX_BYTES", 1024 * 1024u64, 1024, 1 << 30)?;
        let partition_fetch_bytes = env.number("KAFKA_MAX_PARTITION_FETCH_BYTES", 64 * 1024u64, 1024, 1 << 30)?;
        let queued_kbytes = env.number("KAFKA_QUEUED_MAX_KBYTES", 256u64, 1, 2_097_151)?;
        let queue_backoff_ms = env.number("KAFKA_FETCH_QUEUE_BACKOFF_MS", 5u64, 0, 300_000)?;
        let fetch_wait_ms = env.number("KAFKA_FETCH_WAIT_MAX_MS", 100u64, 0, 300_000)?;
        let stats_ms = env.number("KAFKA_STATS_INTERVAL_MS", 5000u64, 0, 86_400_000)?;

        let database = DatabaseConfig {
            host: env.text("DB_HOST", "localhost")?,
            port: env.number("DB_PORT", 5432u16, 1, u16::MAX)?,
            user: env.text("DB_USER", "postgres")?,
            password: env.raw("DB_PASSWORD").unwrap_or("postgres").to_string(),
            name: env.text("DB_NAME", "booking_management")?,
            sslmode: match env.raw("DB_SSLMODE") {
                None | Some("") => SslMode::Prefer,
                Some(v) => SslMode::parse(v).ok_or_else(|| {
                    invalid(
                        "DB_SSLMODE",
                        v,
                        "one of disable, prefer, require, verify-ca, verify-full",
                    )
                })?,
            },
            sslrootcert: env.raw("DB_SSLROOTCERT").filter(|v| !v.is_empty()).map(str::to_string),
            pool_size: env.number("DB_POOL_SIZE", writers as u32 + 2, 1, 1000)?,
            connect_timeout: Duration::from_secs(env.number("DB_CONNECT_TIMEOUT_SECS", 5u64, 1, 3600)?),
            statement_timeout: env.millis("DB_STATEMENT_TIMEOUT_MS", 30_000, 0)?,
            lock_timeout: env.millis("DB_LOCK_TIMEOUT_MS", 10_000, 0)?,
            idle_in_transaction_timeout: env.millis("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 60_000, 0)?,
            migrate: match env.raw("DB_MIGRATE").map(str::trim) {
                None | Some("") | Some("auto") => MigrateMode::Auto,
                Some("off") => MigrateMode::Off,
                Some(v) => return Err(invalid("DB_MIGRATE", v, "auto or off")),
            },
            migration_lock_timeout: env.millis("DB_MIGRATION_LOCK_TIMEOUT_MS", 2_000, 10)?,
        };

        let mut properties: Vec<(String, String)> = vec![
            ("queued.max.messages.kbytes".into(), queued_kbytes.to_string()),
            // A partition is fetched again only once its queue is empty: a fetched record batch
            // stays in memory, decompressed, until its last record is taken, so one batch per
            // partition is what the worker holds. The writers' channels cover the refetch.
            ("queued.min.messages".into(), "1".into()),
            ("fetch.max.bytes".into(), fetch_max_bytes.to_string()),
            ("max.partition.fetch.bytes".into(), partition_fetch_bytes.to_string()),
            ("fetch.queue.backoff.ms".into(), queue_backoff_ms.to_string()),
            // One fetch request per broker is in flight at a time, and the broker holds it this
            // long when none of its partitions has new records: with librdkafka's 500 ms, a caught-up
            // partition stalls the others at every refetch.
            ("fetch.wait.max.ms".into(), fetch_wait_ms.to_string()),
            (
                "receive.message.max.bytes".into(),
                receive_message_max_bytes(fetch_max_bytes, partition_fetch_bytes).to_string(),
            ),
            ("statistics.interval.ms".into(), stats_ms.to_string()),
        ];
        let mut passthrough: Vec<(String, String, &str)> = vars
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(KAFKA_PROPERTY_PREFIX)?;
                Some((name.to_ascii_lowercase().replace('_', "."), v.clone(), k.as_str()))
            })
            .collect();
        passthrough.sort();
        for (name, value, variable) in passthrough {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(invalid(
                    variable,
                    &value,
                    "a librdkafka property name after the prefix, such as KAFKA_PROP_SECURITY_PROTOCOL",
                ));
            }
            if let Some((_, instead)) = REFUSED_PROPERTIES.iter().find(|(p, _)| *p == name) {
                return Err(invalid(variable, &value, &format!("not to be set: {instead}")));
            }
            properties.retain(|(k, _)| *k != name);
            properties.push((name, value));
        }

        let group_protocol = match env.raw("KAFKA_GROUP_PROTOCOL").map(str::trim) {
            None | Some("") | Some("classic") => GroupProtocol::Classic,
            Some("consumer") => GroupProtocol::Consumer,
            Some(v) => return Err(invalid("KAFKA_GROUP_PROTOCOL", v, "classic or consumer")),
        };
        if group_protocol == GroupProtocol::Consumer {
            for (name, value) in &properties {
                if CLASSIC_ONLY_PROPERTIES.contains(&name.as_str()) {
                    let variable = format!("{KAFKA_PROPERTY_PREFIX}{}", name.to_ascii_uppercase().replace('.', "_"));
                    return Err(invalid(
                        &variable,
                        value,
                        "not to be set with KAFKA_GROUP_PROTOCOL=consumer: the broker's group.consumer.* settings apply",
                    ));
                }
            }
        }

        let kafka = KafkaConfig {
            brokers: env.text("KAFKA_BROKERS", "localhost:9092")?,
            group_id: env.text("KAFKA_GROUP_ID", "booking-worker")?,
            booking_topic: env.text("KAFKA_BOOKING_TOPIC", "booking-events")?,
            cancellation_topic: env.text("KAFKA_CANCELLATION_TOPIC", "booking-cancellations")?,
            properties,
            start_from: {
                let value = env.raw("KAFKA_START_FROM").unwrap_or("").trim();
                StartFrom::parse(value).ok_or_else(|| {
                    invalid(
                        "KAFKA_START_FROM",
                        value,
                        "earliest, latest, or an RFC 3339 time such as 2025-01-15T00:00:00Z",
                    )
                })?
            },
            topic_wait: Duration::from_secs(env.number("KAFKA_TOPIC_WAIT_SECS", 60u64, 1, 86_400)?),
            allow_auto_create_topics: env.boolean("KAFKA_ALLOW_AUTO_CREATE_TOPICS", true)?,
            group_protocol,
        };
        if kafka.booking_topic == kafka.cancellation_topic {
            return Err(invalid(
                "KAFKA_CANCELLATION_TOPIC",
                &kafka.cancellation_topic,
                "a topic different from KAFKA_BOOKING_TOPIC",
            ));
        }

        let pipeline = PipelineConfig {
            writers,
            batch_size: env.number("BATCH_SIZE", 500usize, 1, 100_000)?,
            batch_linger: Duration::from_millis(env.number("BATCH_LINGER_MS", 5u64, 0, 60_000)?),
            channel_capacity: env.number("CHANNEL_CAPACITY", 512usize, 1, 1_000_000)?,
            max_payload_bytes: env.number("MAX_PAYLOAD_BYTES", 65_536usize, 256, 64 << 20)?,
            max_in_flight_bytes: env.number("MAX_IN_FLIGHT_BYTES", 8usize << 20, 64 << 10, 1 << 30)?,
            retry_max_backoff: Duration::from_millis(env.number("RETRY_MAX_BACKOFF_MS", 5_000u64, 10, 600_000)?),
            reject_halt_after: env.number("DB_REJECT_HALT_AFTER", 25u32, 0, 1_000_000)?,
            adopt_legacy_rows: env.boolean("ADOPT_LEGACY_ROWS", true)?,
            rebalance_drain_timeout: Duration::from_secs(env.number("REBALANCE_DRAIN_TIMEOUT_SECS", 30u64, 0, 3600)?),
            pending_cancellation_ttl: Duration::from_secs(env.number(
                "PENDING_CANCELLATION_TTL_SECS",
                86_400u64,
                1,
                365 * 86_400,
            )?),
            pending_check_interval: Duration::from_secs(env.number("PENDING_CHECK_INTERVAL_SECS", 60u64, 1, 86_400)?),
        };

        Ok(Config {
            database,
            kafka,
            pipeline,
            shutdown_timeout: Duration::from_secs(env.number("SHUTDOWN_TIMEOUT_SECS", 30u64, 1, 3600)?),
            metrics_addr: match env.raw("METRICS_ADDR").map(str::trim) {
                None | Some("") => Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
                Some("off") => None,
                Some(v) => Some(v.parse().map_err(|_| {
                    invalid(
                        "METRICS_ADDR",
                        v,
                        "an address such as 0.0.0.0:9090 or 127.0.0.1:9090, or off",
                    )
                })?),
            },
            stats_log_interval: match env.number("STATS_LOG_INTERVAL_SECS", 60u64, 0, 86_400)? {
                0 => None,
                n => Some(Duration::from_secs(n)),
            },
        })
    }
}

/// The log level that `LOG_LEVEL` names, checked; `RUST_LOG` is read by the logger itself.
pub fn log_level_from_env() -> Result<String, ConfigError> {
    match std::env::var("LOG_LEVEL") {
        Err(_) => Ok("info".to_string()),
        Ok(v) => parse_log_level(&v),
    }
}

fn parse_log_level(value: &str) -> Result<String, ConfigError> {
    let lower = value.trim().to_ascii_lowercase();
    match lower.as_str() {
        "" => Ok("info".to_string()),
        "error" | "warn" | "info" | "debug" | "trace" | "off" => Ok(lower),
        "warning" => Ok("warn".to_string()),
        _ => Err(invalid(
            "LOG_LEVEL",
            value,
            "one of error, warn, info, debug, trace, off",
        )),
    }
}

fn invalid(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        variable: variable.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

struct Env<'a> {
    vars: &'a [(String, String)],
}

impl Env<'_> {
    fn raw(&self, name: &str) -> Option<&str> {
        self.vars.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A non-empty string; unset or empty gives the default.
    fn text(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        match self.raw(name).map(str::trim) {
            None | Some("") => Ok(default.to_string()),
            Some(v) if v.chars().any(char::is_control) => Err(invalid(name, v, "text without control characters")),
            Some(v) => Ok(v.to_string()),
        }
    }

    /// `true` or `false` (also 1/0, yes/no, on/off); unset or empty gives the default.
    fn boolean(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(invalid(name, self.raw(name).unwrap_or(""), "true or false")),
        }
    }

    /// A duration in milliseconds, at least `min` and at most a day.
    fn millis(&self, name: &str, default: u64, min: u64) -> Result<Duration, ConfigError> {
        self.number(name, default, min, 86_400_000).map(Duration::from_millis)
    }

    /// An integer within `[min, max]`; unset or empty gives the default.
    fn number<T>(&self, name: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        match self.raw(name).map(str::trim) {
            None | Some("") => Ok(default),
            Some(v) => match v.parse::<T>() {
                Ok(n) if n >= min && n <= max => Ok(n),
                _ => Err(invalid(name, v, &format!("an integer from {min} to {max}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_go_worker() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.database.host, "localhost");
        assert_eq!(c.database.port, 5432);
        assert_eq!(c.database.user, "postgres");
        assert_eq!(c.database.password, "postgres");
        assert_eq!(c.database.name, "booking_management");
        assert_eq!(c.kafka.brokers, "localhost:9092");
        assert_eq!(c.kafka.booking_topic, "booking-events");
        assert_eq!(c.kafka.cancellation_topic, "booking-cancellations");
        assert_eq!(c.pipeline.writers, 2);
        assert_eq!(c.database.pool_size, 4);
        assert_eq!(c.database.sslmode, SslMode::Prefer);
        assert_eq!(c.metrics_addr, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(c.stats_log_interval, Some(Duration::from_secs(60)));
    }

    #[test]
    fn metrics_and_stats_can_be_turned_off() {
        let c = Config::from_vars(&vars(&[("METRICS_ADDR", "off"), ("STATS_LOG_INTERVAL_SECS", "0")])).unwrap();
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.stats_log_interval, None);
    }

    #[test]
    fn values_are_read_and_trimmed() {
        let c = Config::from_vars(&vars(&[
            ("DB_HOST", " db.internal "),
            ("DB_PORT", "6543"),
            ("WRITER_THREADS", "8"),
            ("BATCH_LINGER_MS", "0"),
            ("DB_SSLMODE", "verify-full"),
        ]))
        .unwrap();
        assert_eq!(c.database.host, "db.internal");
        assert_eq!(c.database.port, 6543);
        assert_eq!(c.pipeline.writers, 8);
        assert_eq!(c.database.pool_size, 10);
        assert_eq!(c.pipeline.batch_linger, Duration::ZERO);
        assert_eq!(c.database.sslmode, SslMode::VerifyFull);
    }

    #[test]
    fn bad_values_name_the_variable_and_what_it_accepts() {
        for (name, value, expected) in [
            ("DB_PORT", "http", "an integer from 1 to 65535"),
            ("DB_PORT", "0", "an integer from 1 to 65535"),
            ("WRITER_THREADS", "-1", "an integer from 1 to 256"),
            ("BATCH_SIZE", "1e3", "an integer from 1 to 100000"),
            (
                "DB_SSLMODE",
                "maybe",
                "one of disable, prefer, require, verify-ca, verify-full",
            ),
        ] {
            let err = Config::from_vars(&vars(&[(name, value)])).unwrap_err();
            assert_eq!(err.variable, name);
            assert_eq!(err.expected, expected);
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn the_start_position_is_earliest_latest_or_a_time() {
        let start = |v: &str| Config::from_vars(&vars(&[("KAFKA_START_FROM", v)])).map(|c| c.kafka.start_from);
        assert_eq!(start(""), Ok(StartFrom::Earliest));
        assert_eq!(start("latest"), Ok(StartFrom::Latest));
        let at = chrono::DateTime::parse_from_rfc3339("2025-01-15T10:00:00Z").unwrap();
        assert_eq!(start("2025-01-15T11:00:00+01:00"), Ok(StartFrom::Time(at.into())));
        assert_eq!(start("yesterday").unwrap_err().variable, "KAFKA_START_FROM");
        assert_eq!(StartFrom::Earliest.offset_reset(), "earliest");
        assert_eq!(StartFrom::Time(at.into()).offset_reset(), "earliest");
        assert_eq!(StartFrom::Latest.offset_reset(), "latest");
    }

    #[test]
    fn adoption_is_on_unless_turned_off() {
        let adopt =
            |v: &str| Config::from_vars(&vars(&[("ADOPT_LEGACY_ROWS", v)])).map(|c| c.pipeline.adopt_legacy_rows);
        assert_eq!(adopt(""), Ok(true));
        assert_eq!(adopt("false"), Ok(false));
        assert_eq!(adopt("maybe").unwrap_err().variable, "ADOPT_LEGACY_ROWS");
    }

    #[test]
    fn the_same_topic_twice_is_refused() {
        let err = Config::from_vars(&vars(&[
            ("KAFKA_BOOKING_TOPIC", "t"),
            ("KAFKA_CANCELLATION_TOPIC", "t"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "KAFKA_CANCELLATION_TOPIC");
    }

    #[test]
    fn kafka_properties_pass_through_and_override_defaults() {
        let c = Config::from_vars(&vars(&[
            ("KAFKA_PROP_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_PROP_QUEUED_MAX_MESSAGES_KBYTES", "2048"),
        ]))
        .unwrap();
        let get = |name: &str| {
            c.kafka
                .properties
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("security.protocol"), ["sasl_ssl"]);
        assert_eq!(get("queued.max.messages.kbytes"), ["2048"]);
        assert_eq!(get("fetch.max.bytes"), ["1048576"]);
        assert_eq!(get("max.partition.fetch.bytes"), ["65536"]);
        assert_eq!(get("fetch.queue.backoff.ms"), ["5"]);
        assert_eq!(get("fetch.wait.max.ms"), ["100"]);
        assert_eq!(get("queued.min.messages"), ["1"]);
    }

    /// Regression: with `receive.message.max.bytes` at fetch size + 1 MiB (3 MiB), a batch holding
    /// one 3 MiB record could not be decompressed and its partition stalled for good.
    #[test]
    fn record_batches_of_several_mib_can_be_decompressed() {
        let receive = |extra: &[(&str, &str)]| {
            let c = Config::from_vars(&vars(extra)).unwrap();
            let values: Vec<u64> = c
                .kafka
                .properties
                .iter()
                .filter(|(k, _)| k == "receive.message.max.bytes")
                .map(|(_, v)| v.parse().unwrap())
                .collect();
            *values.last().unwrap()
        };
        assert_eq!(receive(&[]), MIN_RECEIVE_MESSAGE_MAX_BYTES);
        assert_eq!(
            receive(&[("KAFKA_FETCH_MAX_BYTES", "67108864")]),
            67_108_864 + 1024 * 1024,
            "always above the largest fetch response"
        );
        assert_eq!(
            receive(&[("KAFKA_PROP_RECEIVE_MESSAGE_MAX_BYTES", "8388608")]),
            8_388_608,
            "an explicit property wins"
        );
    }

    #[test]
    fn properties_the_worker_relies_on_cannot_be_passed_through() {
        for (variable, value) in [
            ("KAFKA_PROP_ENABLE_AUTO_OFFSET_STORE", "true"),
            ("KAFKA_PROP_ENABLE_AUTO_COMMIT", "false"),
            ("KAFKA_PROP_GROUP_ID", "other"),
            ("KAFKA_PROP_AUTO_OFFSET_RESET", "latest"),
            ("KAFKA_PROP_ALLOW_AUTO_CREATE_TOPICS", "false"),
            ("KAFKA_PROP_GROUP_PROTOCOL", "consumer"),
            ("KAFKA_PROP_BOOTSTRAP_SERVERS", "x:9092"),
            ("KAFKA_PROP_ENABLE_PARTITION_EOF", "true"),
        ] {
            let err = Config::from_vars(&vars(&[(variable, value)])).unwrap_err();
            assert_eq!(err.variable, variable);
            assert!(err.expected.starts_with("not to be set"), "{err}");
        }
        assert!(Config::from_vars(&vars(&[("KAFKA_PROP_SECURITY_PROTOCOL", "ssl")])).is_ok());
    }

    #[test]
    fn the_group_protocol_and_topic_creation_are_settings() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.kafka.group_protocol, GroupProtocol::Classic);
        assert!(c.kafka.allow_auto_create_topics);
        let c = Config::from_vars(&vars(&[
            ("KAFKA_GROUP_PROTOCOL", "consumer"),
            ("KAFKA_ALLOW_AUTO_CREATE_TOPICS", "false"),
        ]))
        .unwrap();
        assert_eq!(c.kafka.group_protocol, GroupProtocol::Consumer);
        assert!(!c.kafka.allow_auto_create_topics);
        let err = Config::from_vars(&vars(&[("KAFKA_GROUP_PROTOCOL", "eager")])).unwrap_err();
        assert_eq!(err.variable, "KAFKA_GROUP_PROTOCOL");
        let err = Config::from_vars(&vars(&[
            ("KAFKA_GROUP_PROTOCOL", "consumer"),
            ("KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "KAFKA_PROP_SESSION_TIMEOUT_MS");
    }

    #[test]
    fn a_malformed_property_name_is_refused() {
        let err = Config::from_vars(&vars(&[("KAFKA_PROP_", "x")])).unwrap_err();
        assert!(err.variable.starts_with("KAFKA_PROP_"));
    }

    #[test]
    fn the_password_is_never_printed() {
        let c = Config::from_vars(&vars(&[("DB_PASSWORD", "s3cret-value")])).unwrap();
        assert!(!format!("{c:?}").contains("s3cret-value"));
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("DEBUG").unwrap(), "debug");
        assert_eq!(parse_log_level("warning").unwrap(), "warn");
        assert_eq!(parse_log_level("loud").unwrap_err().variable, "LOG_LEVEL");
    }
}
