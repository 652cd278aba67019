//! The PostgreSQL connection pool (r2d2 over diesel's synchronous libpq connection) and the
//! typed database error that keeps transient failures apart from permanent ones.

use crate::config::DatabaseConfig;
use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use std::time::Duration;

pub type Pool = r2d2::Pool<ConnectionManager<PgConnection>>;
pub type Connection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// A database failure, classified by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// Connection loss, pool timeout, serialization failure, deadlock, server shutting down:
    /// retry later, never advance an offset.
    #[error("database temporarily unavailable: {0}")]
    Transient(String),
    /// The database refused the statement itself; retrying the same input fails the same way.
    #[error("database refused the statement: {0}")]
    Permanent(String),
}

impl DbError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DbError::Transient(_))
    }
}

/// Server messages that mark an error of unknown SQLSTATE class as transient. Deadlocks, lock and
/// statement cancellation, administrator shutdown and connection-slot exhaustion all clear up on
/// retry.
const TRANSIENT_MESSAGES: &[&str] = &[
    "deadlock detected",
    "could not serialize access",
    "canceling statement due to",
    "terminating connection",
    "the database system is",
    "too many clients",
    "remaining connection slots",
    "server closed the connection",
    "connection to server",
    "could not connect",
    "no connection to the server",
    "ssl connection has been closed",
];

impl From<DieselError> for DbError {
    fn from(e: DieselError) -> DbError {
        match &e {
            DieselError::DatabaseError(kind, info) => match kind {
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ReadOnlyTransaction => DbError::Transient(e.to_string()),
                _ => {
                    let message = info.message().to_ascii_lowercase();
                    if TRANSIENT_MESSAGES.iter().any(|m| message.contains(m)) {
                        DbError::Transient(e.to_string())
                    } else {
                        DbError::Permanent(e.to_string())
                    }
                }
            },
            DieselError::BrokenTransactionManager | DieselError::RollbackErrorOnCommit { .. } => {
                DbError::Transient(e.to_string())
            }
            _ => DbError::Permanent(e.to_string()),
        }
    }
}

impl From<r2d2::Error> for DbError {
    fn from(e: r2d2::Error) -> DbError {
        DbError::Transient(format!("no database connection: {e}"))
    }
}

/// The libpq connection string for `config`. Values are quoted, so no setting can inject
/// another keyword. TCP keepalives and a user timeout make a vanished server surface as an error
/// instead of a hang.
pub fn conninfo(config: &DatabaseConfig) -> String {
    let mut parts = vec![
        kv("host", &config.host),
        kv("port", &config.port.to_string()),
        kv("user", &config.user),
        kv("password", &config.password),
        kv("dbname", &config.name),
        kv("sslmode", config.sslmode.as_str()),
        kv("connect_timeout", &config.connect_timeout.as_secs().max(1).to_string()),
        kv("application_name", "booking-worker"),
        kv("keepalives", "1"),
        kv("keepalives_idle", "10"),
        kv("keepalives_interval", "5"),
        kv("keepalives_count", "3"),
        kv("tcp_user_timeout", "30000"),
    ];
    if let Some(ca) = &config.sslrootcert {
        parts.push(kv("sslrootcert", ca));
    }
    parts.join(" ")
}

fn kv(key: &str, value: &str) -> String {
    format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Builds the pool without connecting: connections are made on demand, so a database that is
/// down at start-up is retried like any other outage.
pub fn pool(config: &DatabaseConfig) -> Pool {
    let manager = ConnectionManager::<PgConnection>::new(conninfo(config));
    r2d2::Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(0))
        .connection_timeout(config.connect_timeout.max(Duration::from_secs(1)))
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_on_check_out(false)
        .error_handler(Box::new(PoolErrorLog))
        .build_unchecked(manager)
}

/// Logs connection failures once each at warn level instead of r2d2's default error spam.
#[derive(Debug)]
struct PoolErrorLog;

impl r2d2::HandleError<diesel::r2d2::Error> for PoolErrorLog {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        log::warn!(error = error.to_string(); "database connection failed");
    }
}

/// Capped exponential backoff for retries of transient failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    pub attempts: u32,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(50).min(max),
            max,
            attempts: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn conninfo_quotes_every_value() {
        let mut c = Config::from_vars(&[]).unwrap().database;
        c.password = "p'w d\\x sslmode=disable".into();
        let info = conninfo(&c);
        assert!(info.contains(r"password='p\'w d\\x sslmode=disable'"), "{info}");
        assert!(info.contains("sslmode='prefer'"));
        assert!(info.contains("dbname='booking_management'"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(300));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 300, 300]);
        assert_eq!(b.attempts, 5);
    }

    #[test]
    fn pool_timeouts_are_transient() {
        let pool = pool(&Config::from_vars(&[("DB_PORT".into(), "1".into())]).unwrap().database);
        let err: DbError = pool
            .get_timeout(Duration::from_millis(200))
            .err()
            .expect("port 1 refuses")
            .into();
        assert!(err.is_transient());
    }
}
