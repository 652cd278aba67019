//! Every setting of the worker, declared once: its environment variable (the field's name in
//! capitals, the Go worker's names), its default, what it accepts and its help. `--help`, the
//! README's table and `scripts/booking-worker.env` are checked against this declaration.

use super::{ConfigError, GroupProtocol, MigrateMode, SslMode, StartFrom};
use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};
use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// The settings, as given. Each is read from its environment variable (or the flag of the same
/// name); an empty value means the default. [`super::Config::new`] checks them together.
#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// PostgreSQL host
    #[arg(long, env, default_value = "localhost", value_parser = text())]
    pub db_host: String,
    /// PostgreSQL port
    #[arg(long, env, default_value = "5432", value_parser = integer::<u16>(1, u16::MAX))]
    pub db_port: u16,
    /// PostgreSQL user
    #[arg(long, env, default_value = "postgres", value_parser = text())]
    pub db_user: String,
    /// PostgreSQL password (never logged)
    #[arg(long, env, default_value = "postgres", value_parser = Check::verbatim())]
    pub db_password: String,
    /// PostgreSQL database
    #[arg(long, env, default_value = "booking_management", value_parser = text())]
    pub db_name: String,
    /// disable, prefer, require, verify-ca or verify-full (libpq's meanings)
    #[arg(long, env, default_value = "prefer", value_parser = sslmode())]
    pub db_sslmode: SslMode,
    /// CA certificate file (PEM) for verify-ca / verify-full, and for require when set
    #[arg(long, env, value_parser = Check::verbatim())]
    pub db_sslrootcert: Option<String>,
    /// Connections in the r2d2 pool; auto is WRITER_THREADS + 2
    #[arg(long, env, default_value = "auto", value_parser = pool_size())]
    pub db_pool_size: PoolSize,
    /// Seconds to wait for a connection
    #[arg(long, env, default_value = "5", value_parser = integer::<u64>(1, 3600))]
    pub db_connect_timeout_secs: u64,
    /// statement_timeout of every session, ms (0: none); a timeout is retried
    #[arg(long, env, default_value = "30000", value_parser = millis(0))]
    pub db_statement_timeout_ms: u64,
    /// lock_timeout of every session, ms (0: none); a timeout is retried
    #[arg(long, env, default_value = "10000", value_parser = millis(0))]
    pub db_lock_timeout_ms: u64,
    /// idle_in_transaction_session_timeout of every session, ms (0: none)
    #[arg(long, env, default_value = "60000", value_parser = millis(0))]
    pub db_idle_in_transaction_timeout_ms: u64,
    /// auto: run applies pending migrations; off: run refuses to start while one is pending
    #[arg(long, env, default_value = "auto", value_parser = migrate_mode())]
    pub db_migrate: MigrateMode,
    /// lock_timeout of each migration statement, ms; it is retried when it runs out
    #[arg(long, env, default_value = "2000", value_parser = millis(10))]
    pub db_migration_lock_timeout_ms: u64,
    /// Halt after this many consecutive records refused by the database (0: never)
    #[arg(long, env, default_value = "25", value_parser = integer::<u32>(0, 1_000_000))]
    pub db_reject_halt_after: u32,
    /// Bootstrap servers, comma-separated
    #[arg(long, env, default_value = "localhost:9092", value_parser = text())]
    pub kafka_brokers: String,
    /// Consumer group id
    #[arg(long, env, default_value = "booking-worker", value_parser = text())]
    pub kafka_group_id: String,
    /// Topic of booking events
    #[arg(long, env, default_value = "booking-events", value_parser = text())]
    pub kafka_booking_topic: String,
    /// Topic of cancellations
    #[arg(long, env, default_value = "booking-cancellations", value_parser = text())]
    pub kafka_cancellation_topic: String,
    /// Where a partition without a committed offset starts: earliest, latest or an RFC 3339 time
    #[arg(long, env, default_value = "earliest", value_parser = start_from())]
    pub kafka_start_from: StartFrom,
    /// Subscribing asks the broker to create a missing topic (a mistyped name creates one too)
    #[arg(long, env, default_value = "true", action = ArgAction::Set, value_parser = boolean())]
    pub kafka_allow_auto_create_topics: bool,
    /// Consumer group protocol: classic, or consumer (KIP-848, assigned by the broker)
    #[arg(long, env, default_value = "classic", value_parser = group_protocol())]
    pub kafka_group_protocol: GroupProtocol,
    /// How long the start waits for the subscribed topics' partitions before giving up (exit 5)
    #[arg(long, env, default_value = "60", value_parser = integer::<u64>(1, 86_400))]
    pub kafka_topic_wait_secs: u64,
    /// librdkafka prefetch buffer per partition, KiB
    #[arg(long, env, default_value = "256", value_parser = integer::<u64>(1, 2_097_151))]
    pub kafka_queued_max_kbytes: u64,
    /// Largest fetch per partition, bytes (a larger record batch still comes whole)
    #[arg(long, env, default_value = "65536", value_parser = integer::<u64>(1024, 1 << 30))]
    pub kafka_max_partition_fetch_bytes: u64,
    /// Largest fetch response, bytes
    #[arg(long, env, default_value = "1048576", value_parser = integer::<u64>(1024, 1 << 30))]
    pub kafka_fetch_max_bytes: u64,
    /// Pause before looking again at a partition queue that still holds records, ms
    #[arg(long, env, default_value = "5", value_parser = integer::<u64>(0, 300_000))]
    pub kafka_fetch_queue_backoff_ms: u64,
    /// Longest the broker holds a fetch that has no new records, ms
    #[arg(long, env, default_value = "100", value_parser = integer::<u64>(0, 300_000))]
    pub kafka_fetch_wait_max_ms: u64,
    /// librdkafka statistics (the consumer-lag metric), ms; 0 turns them off
    #[arg(long, env, default_value = "5000", value_parser = integer::<u64>(0, 86_400_000))]
    pub kafka_stats_interval_ms: u64,
    /// Seconds without an answer from any broker before /readyz says not ready (needs the statistics)
    #[arg(long, env, default_value = "60", value_parser = integer::<u64>(1, 86_400))]
    pub kafka_unreachable_ready_secs: u64,
    /// Writer threads
    #[arg(long, env, default_value = "2", value_parser = integer::<usize>(1, 256))]
    pub writer_threads: usize,
    /// Events per database transaction, at most
    #[arg(long, env, default_value = "500", value_parser = integer::<usize>(1, 100_000))]
    pub batch_size: usize,
    /// How long a writer waits to fill a batch, ms
    #[arg(long, env, default_value = "5", value_parser = integer::<u64>(0, 60_000))]
    pub batch_linger_ms: u64,
    /// Events queued per writer before consumption pauses
    #[arg(long, env, default_value = "512", value_parser = integer::<usize>(1, 1_000_000))]
    pub channel_capacity: usize,
    /// Larger records are dead-lettered as payload_too_large
    #[arg(long, env, default_value = "65536", value_parser = integer::<usize>(256, 64 << 20))]
    pub max_payload_bytes: usize,
    /// Payload bytes in flight to the writers before consumption pauses
    #[arg(long, env, default_value = "8388608", value_parser = integer::<usize>(64 << 10, 1 << 30))]
    pub max_in_flight_bytes: usize,
    /// Cap of the backoff between database retries, ms
    #[arg(long, env, default_value = "5000", value_parser = integer::<u64>(10, 600_000))]
    pub retry_max_backoff_ms: u64,
    /// A booking adopts the matching row the Go worker wrote instead of inserting it again
    #[arg(long, env, default_value = "true", action = ArgAction::Set, value_parser = boolean())]
    pub adopt_legacy_rows: bool,
    /// How long a revocation waits for in-flight events, seconds
    #[arg(long, env, default_value = "30", value_parser = integer::<u64>(0, 3600))]
    pub rebalance_drain_timeout_secs: u64,
    /// Parked cancellations older than this many seconds are dead-lettered
    #[arg(long, env, default_value = "86400", value_parser = integer::<u64>(1, 365 * 86_400))]
    pub pending_cancellation_ttl_secs: u64,
    /// How often parked cancellations are checked for expiry, seconds
    #[arg(long, env, default_value = "60", value_parser = integer::<u64>(1, 86_400))]
    pub pending_check_interval_secs: u64,
    /// Deadline for a clean shutdown after SIGINT/SIGTERM, seconds
    #[arg(long, env, default_value = "30", value_parser = integer::<u64>(1, 3600))]
    pub shutdown_timeout_secs: u64,
    /// Address of /metrics, /healthz and /readyz; off turns it off
    #[arg(long, env, default_value = "0.0.0.0:9090", value_parser = metrics_addr())]
    pub metrics_addr: MetricsAddr,
    /// How often a one-line JSON stats summary is logged, seconds; 0 turns it off
    #[arg(long, env, default_value = "60", value_parser = integer::<u64>(0, 86_400))]
    pub stats_log_interval_secs: u64,
    /// error, warn, info, debug, trace or off (RUST_LOG wins when set)
    #[arg(long, env, default_value = "info", value_parser = log_level())]
    pub log_level: String,
}

/// `DB_POOL_SIZE`: a number of connections, or `auto` for two more than the writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    Auto,
    Connections(u32),
}

/// `METRICS_ADDR`: where the endpoint listens, or `None` when turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// The variable an argument is read from: its name in capitals.
pub fn variable_of(arg: &Arg) -> String {
    arg.get_id().as_str().to_ascii_uppercase()
}

/// Turns a trimmed value into the setting, or says what it accepts.
type Parse<T> = dyn Fn(&str) -> Result<T, String> + Send + Sync;

/// Checks one setting's value: trimmed (unless verbatim), an empty value taking the declared
/// default, and a refusal reported as a [`ConfigError`] naming the variable.
#[derive(Clone)]
pub struct Check<T> {
    parse: Arc<Parse<T>>,
    verbatim: bool,
}

impl<T> Check<T> {
    fn new(parse: impl Fn(&str) -> Result<T, String> + Send + Sync + 'static) -> Check<T> {
        Check {
            parse: Arc::new(parse),
            verbatim: false,
        }
    }
}

impl Check<String> {
    /// Any text, taken as it is (a password may have spaces).
    fn verbatim() -> Check<String> {
        Check {
            parse: Arc::new(|v| Ok(v.to_string())),
            verbatim: true,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Check<T> {
    type Value = T;

    fn parse_ref(&self, _cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<T, clap::Error> {
        let variable = arg.map(variable_of).unwrap_or_default();
        let refuse = |expected: String| refusal(ConfigError::new(&variable, &value.to_string_lossy(), &expected));
        let raw = value.to_str().ok_or_else(|| refuse("UTF-8 text".into()))?;
        let given = if self.verbatim { raw } else { raw.trim() };
        let default = arg
            .and_then(|a| a.get_default_values().first())
            .and_then(|d| d.to_str());
        let text = match default {
            Some(default) if given.is_empty() && !self.verbatim => default,
            _ => given,
        };
        (self.parse)(text).map_err(refuse)
    }
}

/// A clap error that carries a [`ConfigError`], for [`ConfigError::from_clap`].
fn refusal(error: ConfigError) -> clap::Error {
    let mut e = clap::Error::raw(ErrorKind::ValueValidation, format!("{error}\n"));
    e.insert(ContextKind::InvalidArg, ContextValue::String(error.variable));
    e.insert(ContextKind::InvalidValue, ContextValue::String(error.value));
    e.insert(ContextKind::Custom, ContextValue::String(error.expected));
    e
}

impl ConfigError {
    /// The refusal a [`Check`] reported, out of the clap error that carried it.
    pub fn from_clap(e: &clap::Error) -> Option<ConfigError> {
        let text = |kind| match e.get(kind) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        Some(ConfigError {
            variable: text(ContextKind::InvalidArg)?,
            value: text(ContextKind::InvalidValue)?,
            expected: text(ContextKind::Custom)?,
        })
    }
}

/// A non-empty text without control characters.
fn text() -> Check<String> {
    Check::new(|v| {
        if v.chars().any(char::is_control) {
            Err("text without control characters".into())
        } else {
            Ok(v.to_string())
        }
    })
}

/// An integer within `[min, max]`.
fn integer<T>(min: T, max: T) -> Check<T>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy + Send + Sync + 'static,
{
    Check::new(move |v| match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!("an integer from {min} to {max}")),
    })
}

/// A duration in milliseconds, at least `min` and at most a day.
fn millis(min: u64) -> Check<u64> {
    integer(min, 86_400_000)
}

/// `true` or `false` (also 1/0, yes/no, on/off).
fn boolean() -> Check<bool> {
    Check::new(|v| match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("true or false".into()),
    })
}

/// One of the values of a closed list, by name.
fn one_of<T: Copy + Send + Sync + 'static>(choices: &'static [(&'static str, T)], expected: &'static str) -> Check<T> {
    Check::new(move |v| {
        choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, value)| *value)
            .ok_or_else(|| expected.to_string())
    })
}

fn sslmode() -> Check<SslMode> {
    one_of(
        &[
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ],
        "one of disable, prefer, require, verify-ca, verify-full",
    )
}

fn migrate_mode() -> Check<MigrateMode> {
    one_of(&[("auto", MigrateMode::Auto), ("off", MigrateMode::Off)], "auto or off")
}

fn group_protocol() -> Check<GroupProtocol> {
    one_of(
        &[
            ("classic", GroupProtocol::Classic),
            ("consumer", GroupProtocol::Consumer),
        ],
        "classic or consumer",
    )
}

fn pool_size() -> Check<PoolSize> {
    let connections = integer::<u32>(1, 1000);
    Check::new(move |v| match v {
        "auto" => Ok(PoolSize::Auto),
        n => (connections.parse)(n)
            .map(PoolSize::Connections)
            .map_err(|e| format!("auto or {e}")),
    })
}

fn start_from() -> Check<StartFrom> {
    Check::new(|v| {
        StartFrom::parse(v)
            .ok_or_else(|| "earliest, latest, or an RFC 3339 time such as 2025-01-15T00:00:00Z".to_string())
    })
}

fn metrics_addr() -> Check<MetricsAddr> {
    Check::new(|v| match v {
        "off" => Ok(MetricsAddr(None)),
        addr => addr
            .parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|_| "an address such as 0.0.0.0:9090 or 127.0.0.1:9090, or off".to_string()),
    })
}

fn log_level() -> Check<String> {
    Check::new(|v| match v.to_ascii_lowercase().as_str() {
        level @ ("error" | "warn" | "info" | "debug" | "trace" | "off") => Ok(level.to_string()),
        "warning" => Ok("warn".to_string()),
        _ => Err("one of error, warn, info, debug, trace, off".to_string()),
    })
}
