//! The worker's configuration: the settings as declared in [`settings`] (read through clap from
//! the environment or the flags, with the Go worker's names and defaults) and the
//! `KAFKA_PROP_*` pass-through, checked together into a [`Config`]. Every refused value names its
//! variable and what it accepts.
//!
//! The finer rules (the README's Configuration section gives the rest):
//! - an empty variable means its default, except `DB_PASSWORD`, where it is an empty password;
//! - values are trimmed, except `DB_PASSWORD` and `DB_SSLROOTCERT`;
//! - a value that is not UTF-8 is refused like any bad value;
//! - the password is never logged, and `--help` shows no variable's current value.
//!
//! Every librdkafka property the worker sets, and every one the pass-through may not set, is a row
//! of [`kafka_properties`] with its reason; the pass-through comes after the worker's own and
//! replaces them.

pub mod kafka_properties;
pub mod settings;

use clap::{CommandFactory, FromArgMatches, Parser};
pub use kafka_properties::{
    receive_message_max_bytes, KAFKA_PROPERTY_PREFIX, MIN_RECEIVE_MESSAGE_MAX_BYTES, REFUSED_PROPERTIES,
};
pub use settings::{MetricsAddr, PoolSize, Settings};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
}

/// How the worker reaches Kafka and what it consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub booking_topic: String,
    pub cancellation_topic: String,
    /// Every librdkafka property of the consumer: the worker's own first
    /// ([`kafka_properties::WORKER_PROPERTIES`]), then the `KAFKA_PROP_*` pass-through, which wins.
    pub properties: Vec<(String, String)>,
    /// Where a partition without a committed offset starts.
    pub start_from: StartFrom,
    /// How long the first start waits for the subscribed topics' partitions to be known.
    pub topic_wait: Duration,
    /// Whether subscribing asks the broker to create a missing topic.
    pub allow_auto_create_topics: bool,
    /// The consumer group protocol.
    pub group_protocol: GroupProtocol,
    /// How long without an answer from any broker makes the worker not ready; `None` when the
    /// client's statistics, which tell it, are turned off.
    pub unreachable_ready_after: Option<Duration>,
}

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

/// The settings alone, as a command of their own: for [`Config::from_vars`] and the checks of
/// what documents them.
#[derive(Parser)]
#[command(name = "booking-worker")]
struct SettingsCommand {
    #[command(flatten)]
    settings: Settings,
}

/// Shows each variable's name in `--help` but never its value: the password is one of them.
pub fn hide_values(command: clap::Command) -> clap::Command {
    command.mut_args(|a| a.hide_env_values(true))
}

/// Every declared setting's variable and default (`None`: no default), in declaration order.
pub fn declared() -> Vec<(String, Option<String>)> {
    SettingsCommand::command()
        .get_arguments()
        .filter(|a| a.get_env().is_some())
        .map(|a| {
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            (settings::variable_of(a), default)
        })
        .collect()
}

impl Config {
    /// The configuration from parsed settings and the `KAFKA_PROP_*` variables of the environment.
    pub fn from_settings(settings: &Settings) -> Result<Config, ConfigError> {
        let passthrough: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(KAFKA_PROPERTY_PREFIX))
            .collect();
        Config::new(settings, &passthrough)
    }

    /// Reads the configuration from `(name, value)` pairs, as the environment would give them
    /// (the process environment is not read): the same declaration and checks as at start-up.
    pub fn from_vars(vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let passthrough: Vec<(String, String)> = vars
            .iter()
            .filter(|(k, _)| k.starts_with(KAFKA_PROPERTY_PREFIX))
            .cloned()
            .collect();
        Config::new(&settings_from_vars(vars)?, &passthrough)
    }

    /// Checks the settings together and builds the configuration; `passthrough` holds the
    /// `KAFKA_PROP_*` variables.
    pub fn new(s: &Settings, passthrough: &[(String, String)]) -> Result<Config, ConfigError> {
        let kafka = kafka_config(s, kafka_properties::consumer_properties(s, passthrough)?)?;
        Ok(Config {
            database: database_config(s),
            kafka,
            pipeline: pipeline_config(s),
            shutdown_timeout: Duration::from_secs(s.shutdown_timeout_secs),
            metrics_addr: s.metrics_addr.0,
            stats_log_interval: Some(s.stats_log_interval_secs)
                .filter(|n| *n > 0)
                .map(Duration::from_secs),
        })
    }
}

/// The settings from `(name, value)` pairs instead of the process environment: each pair
/// becomes its variable's flag (the last pair of a name wins, as in an environment).
pub fn settings_from_vars(vars: &[(String, String)]) -> Result<Settings, ConfigError> {
    let mut command = SettingsCommand::command().mut_args(|a| a.env(None));
    let mut flags: Vec<(String, String)> = Vec::new();
    for (name, value) in vars {
        if let Some(arg) = command.get_arguments().find(|a| settings::variable_of(a) == *name) {
            let flag = format!("--{}", arg.get_long().unwrap_or_default());
            flags.retain(|(f, _)| *f != flag);
            flags.push((flag, value.clone()));
        }
    }
    let args = std::iter::once("booking-worker".to_string()).chain(flags.iter().map(|(f, v)| format!("{f}={v}")));
    let matches = command.try_get_matches_from_mut(args).map_err(|e| unusable(&e))?;
    Settings::from_arg_matches(&matches).map_err(|e| unusable(&e))
}

/// A clap error that is not a refused value (it cannot happen with the declared settings, whose
/// every value goes through a [`settings::Check`]).
fn unusable(e: &clap::Error) -> ConfigError {
    ConfigError::from_clap(e).unwrap_or_else(|| invalid("(command line)", "", &e.to_string()))
}

fn database_config(s: &Settings) -> DatabaseConfig {
    DatabaseConfig {
        host: s.db_host.clone(),
        port: s.db_port,
        user: s.db_user.clone(),
        password: s.db_password.clone(),
        name: s.db_name.clone(),
        sslmode: s.db_sslmode,
        sslrootcert: s.db_sslrootcert.clone().filter(|v| !v.is_empty()),
        pool_size: match s.db_pool_size {
            PoolSize::Auto => s.writer_threads as u32 + 2,
            PoolSize::Connections(n) => n,
        },
        connect_timeout: Duration::from_secs(s.db_connect_timeout_secs),
        statement_timeout: Duration::from_millis(s.db_statement_timeout_ms),
        lock_timeout: Duration::from_millis(s.db_lock_timeout_ms),
        idle_in_transaction_timeout: Duration::from_millis(s.db_idle_in_transaction_timeout_ms),
        migrate: s.db_migrate,
        migration_lock_timeout: Duration::from_millis(s.db_migration_lock_timeout_ms),
    }
}

fn kafka_config(s: &Settings, properties: Vec<(String, String)>) -> Result<KafkaConfig, ConfigError> {
    if s.kafka_booking_topic == s.kafka_cancellation_topic {
        return Err(invalid(
            "KAFKA_CANCELLATION_TOPIC",
            &s.kafka_cancellation_topic,
            "a topic different from KAFKA_BOOKING_TOPIC",
        ));
    }
    kafka_properties::check_group_protocol(s.kafka_group_protocol, &properties)?;
    let statistics_on = properties
        .iter()
        .rev()
        .find(|(n, _)| n == "statistics.interval.ms")
        .is_some_and(|(_, v)| v.trim() != "0");
    Ok(KafkaConfig {
        unreachable_ready_after: statistics_on.then(|| Duration::from_secs(s.kafka_unreachable_ready_secs)),
        brokers: s.kafka_brokers.clone(),
        group_id: s.kafka_group_id.clone(),
        booking_topic: s.kafka_booking_topic.clone(),
        cancellation_topic: s.kafka_cancellation_topic.clone(),
        properties,
        start_from: s.kafka_start_from,
        topic_wait: Duration::from_secs(s.kafka_topic_wait_secs),
        allow_auto_create_topics: s.kafka_allow_auto_create_topics,
        group_protocol: s.kafka_group_protocol,
    })
}

fn pipeline_config(s: &Settings) -> PipelineConfig {
    PipelineConfig {
        writers: s.writer_threads,
        batch_size: s.batch_size,
        batch_linger: Duration::from_millis(s.batch_linger_ms),
        channel_capacity: s.channel_capacity,
        max_payload_bytes: s.max_payload_bytes,
        max_in_flight_bytes: s.max_in_flight_bytes,
        retry_max_backoff: Duration::from_millis(s.retry_max_backoff_ms),
        adopt_legacy_rows: s.adopt_legacy_rows,
        reject_halt_after: s.db_reject_halt_after,
        rebalance_drain_timeout: Duration::from_secs(s.rebalance_drain_timeout_secs),
        pending_cancellation_ttl: Duration::from_secs(s.pending_cancellation_ttl_secs),
        pending_check_interval: Duration::from_secs(s.pending_check_interval_secs),
    }
}

fn invalid(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::new(variable, value, expected)
}

impl ConfigError {
    /// The refusal of `value` for `variable`. The value of a secret (a password, a token) is never
    /// kept, so that no message or log line can show it.
    pub fn new(variable: &str, value: &str, expected: &str) -> ConfigError {
        let upper = variable.to_ascii_uppercase();
        let secret = ["PASSWORD", "SECRET", "TOKEN"].iter().any(|w| upper.contains(w));
        ConfigError {
            variable: variable.to_string(),
            value: if secret {
                "(hidden)".to_string()
            } else {
                value.to_string()
            },
            expected: expected.to_string(),
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
    fn kafka_counts_as_unreachable_only_while_its_statistics_tell() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.kafka.unreachable_ready_after, Some(Duration::from_secs(60)));
        let c = Config::from_vars(&vars(&[("KAFKA_UNREACHABLE_READY_SECS", "5")])).unwrap();
        assert_eq!(c.kafka.unreachable_ready_after, Some(Duration::from_secs(5)));
        let c = Config::from_vars(&vars(&[("KAFKA_STATS_INTERVAL_MS", "0")])).unwrap();
        assert_eq!(c.kafka.unreachable_ready_after, None);
        assert!(Config::from_vars(&vars(&[("KAFKA_UNREACHABLE_READY_SECS", "0")])).is_err());
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
        assert_eq!(get("queued.min.messages"), ["1000"]);
    }

    /// A batch holding one 3 MiB record decompresses: `receive.message.max.bytes` at fetch size +
    /// 1 MiB (3 MiB) would stall its partition for good.
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
        for variable in [
            "DB_PASSWORD",
            "KAFKA_PROP_SASL_PASSWORD",
            "KAFKA_PROP_SASL_OAUTHBEARER_CLIENT_SECRET",
        ] {
            let refused = ConfigError::new(variable, "s3cret-value", "something else").to_string();
            assert!(
                !refused.contains("s3cret-value") && refused.contains(variable),
                "{refused}"
            );
        }
        let shown = ConfigError::new("DB_PORT", "99999", "a port").to_string();
        assert!(shown.contains("99999"), "{shown}");
    }

    /// The `| `NAME` | default | meaning |` rows of the README's configuration table.
    fn readme_rows() -> Vec<(String, String)> {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        readme
            .lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("| `")?.split_once("` | ")?;
                let default = rest.split('|').next()?;
                Some((name.to_string(), default.trim().to_string()))
            })
            .filter(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_setting_with_its_default_in_order() {
        let expected: Vec<(String, String)> = declared()
            .into_iter()
            .map(|(name, default)| (name, default.unwrap_or_default()))
            .collect();
        assert_eq!(readme_rows(), expected);
    }

    #[test]
    fn the_env_file_lists_every_setting_and_a_commented_line_shows_the_default() {
        let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/booking-worker.env")).unwrap();
        for (name, default) in declared() {
            let prefix = format!("{name}=");
            let line = file
                .lines()
                .find(|l| l.trim_start_matches('#').starts_with(&prefix))
                .unwrap_or_else(|| panic!("scripts/booking-worker.env does not list {name}"));
            // DB_POOL_SIZE's line shows what `auto` comes to with the default writers.
            let shown = default.filter(|_| name != "DB_POOL_SIZE");
            if let (Some(value), Some(default)) = (line.strip_prefix('#'), shown) {
                assert_eq!(
                    value,
                    format!("{prefix}{default}"),
                    "a commented-out line shows the default"
                );
            }
        }
    }

    #[test]
    fn log_levels() {
        let level = |v: &str| settings_from_vars(&vars(&[("LOG_LEVEL", v)])).map(|s| s.log_level);
        assert_eq!(level("DEBUG").unwrap(), "debug");
        assert_eq!(level("warning").unwrap(), "warn");
        assert_eq!(level("").unwrap(), "info");
        assert_eq!(level("loud").unwrap_err().variable, "LOG_LEVEL");
    }
}
