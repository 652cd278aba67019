//! The PostgreSQL connection pool (r2d2 over the `postgres` crate's blocking client, through
//! `r2d2_postgres`) and the database error, classified by SQLSTATE into the three classes that
//! decide what the worker does: retry, halt, or dead-letter the record.
//!
//! # The client
//!
//! The `postgres` crate exposes the SQLSTATE of every error the server sends
//! (`Error::as_db_error()`), and the worker decides what to do by that code alone. The text of a
//! server message is never read: it follows the server's `lc_messages`. libpq is not used, at build
//! time or at run time; TLS comes from `postgres-openssl` over the system OpenSSL, which Kafka links
//! already.
//!
//! The client drives `tokio-postgres` on a private current-thread runtime inside each connection. It
//! runs on the thread that calls the client, so it starts no threads; the worker's own code stays
//! blocking. Every connection:
//! - carries the session timeouts (`DB_STATEMENT_TIMEOUT_MS`, `DB_LOCK_TIMEOUT_MS`,
//!   `DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`) as startup options, so they cost no round trip, and a lock
//!   held by booking-management surfaces as a retried error, never as a hung writer;
//! - has TCP keepalives and a 30 s TCP user timeout, so a vanished database surfaces as an error;
//! - shows as `booking-worker` in `pg_stat_activity`;
//! - leaves the session's `TimeZone` as the server sets it.
//!
//! The pool opens connections on demand (none idle at start), up to `DB_POOL_SIZE`, and closes one
//! idle for 5 minutes.
//!
//! # Database errors
//!
//! Each SQLSTATE falls in one of three classes. A code not listed here is systemic: halting is safe,
//! while dead-lettering would move an offset past a record nobody looked at.
//!
//! | class | SQLSTATE | what the worker does |
//! | --- | --- | --- |
//! | transient: clears up by itself | `08` connection exception; `40` transaction rollback except `40002` (`40001` serialization failure, `40P01` deadlock, `40003` completion unknown); `55P03` lock not available, `55006` object in use; `57` operator intervention except `57P04` (`57014` statement timeout or cancel, `57P01` to `57P03` shutdown or cannot connect now, `57P05` idle session timeout); `53300` too many connections; `25006` read-only transaction (a standby after a failover), `25P03` idle-in-transaction timeout and `25P04` transaction timeout (the other `25` codes are systemic); `72` snapshot too old. Without a SQLSTATE: a closed connection or an I/O error | retries the same batch with capped exponential backoff and jitter (from 50 ms, doubling up to `RETRY_MAX_BACKOFF_MS`), forever, with a warn line per attempt; no offset moves |
//! | systemic: the database or its schema is not what the worker needs | every other code, among them `42` (`42P01`, `42703`, `42883` undefined table, column or function; `42501` insufficient privilege; `42601` syntax error), `3D000` database missing, `3F000` schema missing, `28` authentication, `53100` disk full, `53200` out of memory, `53400` configuration limit exceeded, `57P04` database dropped, `58` system error, `XX` internal error, `0A` feature not supported. Without a SQLSTATE: a value of a type the worker does not expect, a refused TLS certificate | halts: never dead-letters, never moves an offset |
//! | record: this record's values | `22` data exception (`22001` value too long, `22003` out of range, `22007`/`22008` invalid date or time); `23` integrity constraint violation (`23502` not null, `23503` foreign key, `23505` unique, `23514` check); `27` triggered data change violation; `44` WITH CHECK OPTION violation; `54` program limit exceeded; `40002` a deferred constraint failing at commit | sets the record apart and dead-letters it as `database_rejected` with its SQLSTATE |
//!
//! - A pool time-out (no connection within `DB_CONNECT_TIMEOUT_SECS`) takes the class of the last
//!   failed connection attempt: a server that is down or refuses connections is transient, a refused
//!   login or certificate is systemic.
//! - Retries back off with jitter everywhere (writers, start-up, migrations): each delay is drawn
//!   between half and all of the capped exponential step, so that instances do not retry in
//!   lock-step.
//! - Failover: a `25006` (the connection reached a standby) drops that connection instead of
//!   returning it to the pool, so the retry connects afresh and reaches the new primary.
//! - A database that is down at start-up is waited for, not fatal; a systemic error at start-up
//!   halts the worker as it would mid-stream, until it clears.

use crate::config::{DatabaseConfig, SslMode};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres::config::SslMode as WireSslMode;
use postgres_openssl::MakeTlsConnector;
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the worker does about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Clears up on its own (connection loss, deadlock, timeout, failover): retry the same batch.
    Transient,
    /// The database or its schema is not what the worker needs (a renamed column, a revoked
    /// grant, a full disk): halt, keep the offsets, retry until it goes through.
    Systemic,
    /// This record's values are refused (too long, out of range, a foreign key): isolate the
    /// record and dead-letter it.
    Record,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Systemic => "systemic",
            ErrorClass::Record => "record",
        }
    }
}

/// The class of a SQLSTATE, by its code alone (never by the message, whose language follows the
/// server's `lc_messages`). A code the worker does not know is systemic: halting is safe, while
/// dead-lettering would move an offset past a record nobody looked at.
pub fn class_of(sqlstate: &str) -> ErrorClass {
    use ErrorClass::{Record, Systemic, Transient};
    match sqlstate {
        // A transaction rolled back at commit by a deferred constraint: that record's values.
        "40002" => Record,
        // Serialization failure, deadlock, statement completion unknown.
        s if s.starts_with("40") => Transient,
        // Lock not available (lock_timeout), object in use.
        "55P03" | "55006" => Transient,
        // Statement timeout or cancel, administrator or crash shutdown, cannot connect now, idle
        // session timeout; but a dropped database is not coming back.
        "57P04" => Systemic,
        s if s.starts_with("57") => Transient,
        // Too many connections.
        "53300" => Transient,
        // Connection exceptions; a read-only standby after a failover (25006), an
        // idle-in-transaction or transaction timeout (25P03, 25P04). Other invalid transaction
        // states are the worker's own mistakes: systemic.
        "25006" | "25P03" | "25P04" => Transient,
        s if s.starts_with("08") => Transient,
        // Snapshot too old.
        s if s.starts_with("72") => Transient,
        // Data exceptions, integrity violations, WITH CHECK OPTION, a row-level trigger refusing
        // a change: this record.
        s if s.starts_with("22") || s.starts_with("23") || s.starts_with("44") || s.starts_with("27") => Record,
        // Program limits (a statement too complex or too long): the record that made it so.
        s if s.starts_with("54") => Record,
        // Everything else: syntax or access rule (42: undefined table, column or function,
        // insufficient privilege), invalid catalog (3D000) or schema (3F000), authentication
        // (28), disk full (53100), out of memory (53200), system errors (58), internal errors
        // (XX), feature not supported (0A), and codes not listed here.
        _ => Systemic,
    }
}

/// What an operator can do about a systemic error, for the halt's ERROR line.
pub fn remedy(sqlstate: Option<&str>) -> &'static str {
    match sqlstate {
        Some("42501") => {
            "the worker's role lacks a privilege: grant it what the README's 'Database' section lists; \
             the worker resumes by itself"
        }
        Some(s) if s.starts_with("42") => {
            "a table, column or function the worker uses is missing or changed: restore booking-management's \
             schema (sql/schema.sql) or run `booking-worker migrate`; the worker resumes by itself"
        }
        Some("3D000") => "the database does not exist: check DB_NAME",
        Some("3F000") => "a schema the worker uses is missing: run `booking-worker migrate`",
        Some(s) if s.starts_with("28") => "the login is refused: check DB_USER, DB_PASSWORD and pg_hba.conf",
        Some("53100") => "the database server's disk is full: free space there; the worker resumes by itself",
        Some("53200") => "the database server is out of memory: see its log",
        Some(s) if s.starts_with("23") || s.starts_with("22") => {
            "record after record is refused: booking-management probably added a constraint or a NOT NULL \
             column to bookings; fix the schema, or raise DB_REJECT_HALT_AFTER to dead-letter them"
        }
        _ => "see the PostgreSQL server log; the worker retries the same batch until it goes through",
    }
}

/// A database failure: its class, the server's SQLSTATE when the server sent one, and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DbError {
    pub class: ErrorClass,
    pub sqlstate: Option<String>,
    pub message: String,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "{} (SQLSTATE {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl DbError {
    pub fn transient(message: impl Into<String>) -> DbError {
        DbError {
            class: ErrorClass::Transient,
            sqlstate: None,
            message: message.into(),
        }
    }

    pub fn systemic(sqlstate: Option<&str>, message: impl Into<String>) -> DbError {
        DbError {
            class: ErrorClass::Systemic,
            sqlstate: sqlstate.map(str::to_string),
            message: message.into(),
        }
    }

    pub fn is(&self, class: ErrorClass) -> bool {
        self.class == class
    }

    /// A read-only transaction: the connection reaches a standby (a failover happened), so it is
    /// dropped rather than returned to the pool.
    pub fn is_read_only(&self) -> bool {
        self.sqlstate.as_deref() == Some("25006")
    }
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> DbError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let message = match db.detail() {
                Some(detail) => format!("{}: {detail}", db.message()),
                None => db.message().to_string(),
            };
            return DbError {
                class: class_of(code),
                sqlstate: Some(code.to_string()),
                message,
            };
        }
        let class = if e.is_closed() || caused_by_io(&e) {
            ErrorClass::Transient
        } else {
            // A value of a type the worker does not expect, a missing result column, a refused
            // TLS certificate: the database is not what the worker was built for.
            ErrorClass::Systemic
        };
        DbError {
            class,
            sqlstate: None,
            message: e.to_string(),
        }
    }
}

fn caused_by_io(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A pooled connection: the client, and whether it must be closed instead of reused.
pub struct Session {
    client: postgres::Client,
    discard: bool,
}

impl Session {
    /// Closes this connection when it goes back to the pool.
    pub fn discard(&mut self) {
        self.discard = true;
    }

    /// The client, for the repository's statements.
    pub fn client(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

impl Deref for Session {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        &self.client
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

/// The last connection failure, kept so that a pool time-out can say why (a refused login is
/// systemic; a server that is down is transient).
type LastConnectError = Arc<Mutex<Option<DbError>>>;

/// r2d2's manager: `r2d2_postgres` connects and checks; this adds [`Session::discard`] and
/// remembers why connecting failed.
pub struct Manager {
    inner: PostgresConnectionManager<MakeTlsConnector>,
    last_error: LastConnectError,
}

impl ManageConnection for Manager {
    type Connection = Session;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Session, postgres::Error> {
        let client = self.inner.connect()?;
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(Session { client, discard: false })
    }

    fn is_valid(&self, session: &mut Session) -> Result<(), postgres::Error> {
        self.inner.is_valid(&mut session.client)
    }

    fn has_broken(&self, session: &mut Session) -> bool {
        session.discard || self.inner.has_broken(&mut session.client)
    }
}

/// Logs connection failures at warn level and keeps the last one, classified.
#[derive(Debug)]
struct ConnectErrorLog(LastConnectError);

impl r2d2::HandleError<postgres::Error> for ConnectErrorLog {
    fn handle_error(&self, error: postgres::Error) {
        let error = DbError::from(error);
        log::warn!(error = error.to_string(), sqlstate = error.sqlstate.as_deref().unwrap_or("");
            "database connection failed");
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

/// A pooled connection, checked out.
pub type Connection = r2d2::PooledConnection<Manager>;

/// The worker's connection pool. Cloning shares it.
#[derive(Clone)]
pub struct Pool {
    pool: r2d2::Pool<Manager>,
    last_error: LastConnectError,
    wait: Duration,
}

impl Pool {
    /// Builds the pool without connecting: connections are made on demand, so a database that is
    /// down at start-up is retried like any other outage. Fails only when TLS cannot be set up
    /// (an unreadable `DB_SSLROOTCERT`, say).
    pub fn new(config: &DatabaseConfig) -> Result<Pool, DbError> {
        let last_error = LastConnectError::default();
        let manager = Manager {
            inner: PostgresConnectionManager::new(client_config(config), tls_connector(config)?),
            last_error: Arc::clone(&last_error),
        };
        let wait = config.connect_timeout.max(Duration::from_secs(1));
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(0))
            .connection_timeout(wait)
            .idle_timeout(Some(Duration::from_secs(300)))
            .test_on_check_out(false)
            .error_handler(Box::new(ConnectErrorLog(Arc::clone(&last_error))))
            .build_unchecked(manager);
        Ok(Pool { pool, last_error, wait })
    }

    /// A connection, waiting up to `DB_CONNECT_TIMEOUT_SECS`.
    pub fn get(&self) -> Result<Connection, DbError> {
        self.get_timeout(self.wait)
    }

    /// A connection, waiting up to `timeout`. A time-out carries the class of the last connection
    /// failure: a refused login halts the worker, a server that is down is retried.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Connection, DbError> {
        self.pool.get_timeout(timeout).map_err(|e| {
            let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match last {
                Some(cause) => DbError {
                    message: format!("no database connection: {}", cause.message),
                    ..cause
                },
                None => DbError::transient(format!("no database connection: {e}")),
            }
        })
    }
}

/// The `postgres` client configuration: the login, TLS mode, the connect timeout, TCP keepalives
/// and a user timeout (so a vanished server surfaces as an error, not a hang), and the session
/// timeouts as startup options.
pub fn client_config(config: &DatabaseConfig) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host(&config.host)
        .port(config.port)
        .user(&config.user)
        .password(&config.password)
        .dbname(&config.name)
        .application_name("booking-worker")
        .ssl_mode(match config.sslmode {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireSslMode::Require,
        })
        .connect_timeout(config.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30))
        .options(&session_options(config));
    c
}

/// `-c name=value` startup options for the session timeouts, in milliseconds (0 turns one off).
pub fn session_options(config: &DatabaseConfig) -> String {
    format!(
        "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
        config.statement_timeout.as_millis(),
        config.lock_timeout.as_millis(),
        config.idle_in_transaction_timeout.as_millis()
    )
}

/// The TLS connector for libpq's `sslmode` meanings: `prefer` and `require` encrypt without
/// checking the certificate (unless `DB_SSLROOTCERT` is given with `require`, as libpq does),
/// `verify-ca` checks the chain against `DB_SSLROOTCERT` (or the system's CAs), and
/// `verify-full` checks the host name too.
fn tls_connector(config: &DatabaseConfig) -> Result<MakeTlsConnector, DbError> {
    let tls_error = |e: openssl::error::ErrorStack| DbError::systemic(None, format!("cannot set up TLS: {e}"));
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_error)?;
    let check_chain = match config.sslmode {
        SslMode::Disable | SslMode::Prefer => false,
        SslMode::Require => config.sslrootcert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    if check_chain {
        if let Some(ca) = &config.sslrootcert {
            builder.set_ca_file(ca).map_err(|e| {
                DbError::systemic(
                    None,
                    format!("DB_SSLROOTCERT {ca:?} cannot be read as PEM certificates: {e}"),
                )
            })?;
        }
        builder.set_verify(SslVerifyMode::PEER);
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    let check_host = config.sslmode == SslMode::VerifyFull;
    connector.set_callback(move |connect, _host| {
        connect.set_verify_hostname(check_host);
        Ok(())
    });
    Ok(connector)
}

/// Capped exponential backoff with jitter, for retries: each delay is drawn between half and all
/// of the current step, so that several instances do not retry in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
    pub attempts: u32,
}

/// The first step of every backoff.
const FIRST_STEP: Duration = Duration::from_millis(50);

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            step: FIRST_STEP.min(max),
            max,
            attempts: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        self.attempts += 1;
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn sqlstates_fall_into_the_three_classes() {
        use ErrorClass::{Record, Systemic, Transient};
        let table = [
            // transient
            ("08000", Transient),
            ("08006", Transient),
            ("08P01", Transient),
            ("40001", Transient),
            ("40P01", Transient),
            ("40003", Transient),
            ("55P03", Transient),
            ("57014", Transient),
            ("57P01", Transient),
            ("57P02", Transient),
            ("57P03", Transient),
            ("53300", Transient),
            ("25006", Transient),
            ("25P03", Transient),
            ("25P04", Transient),
            ("25P02", Systemic),
            ("25001", Systemic),
            // systemic
            ("42703", Systemic),
            ("42P01", Systemic),
            ("42883", Systemic),
            ("42501", Systemic),
            ("42601", Systemic),
            ("3D000", Systemic),
            ("3F000", Systemic),
            ("28000", Systemic),
            ("28P01", Systemic),
            ("53100", Systemic),
            ("53200", Systemic),
            ("53400", Systemic),
            ("58030", Systemic),
            ("XX000", Systemic),
            ("XX001", Systemic),
            ("0A000", Systemic),
            ("57P04", Systemic),
            ("P0001", Systemic),
            ("99999", Systemic),
            // this record
            ("22001", Record),
            ("22003", Record),
            ("22007", Record),
            ("22008", Record),
            ("22P05", Record),
            ("23502", Record),
            ("23503", Record),
            ("23505", Record),
            ("23514", Record),
            ("40002", Record),
            ("54000", Record),
        ];
        for (code, class) in table {
            assert_eq!(class_of(code), class, "SQLSTATE {code}");
        }
    }

    #[test]
    fn every_systemic_class_names_a_remedy() {
        for code in ["42501", "42703", "3D000", "3F000", "28P01", "53100", "53200", "23502"] {
            assert!(!remedy(Some(code)).starts_with("see the PostgreSQL"), "{code}");
        }
        assert!(remedy(None).contains("server log"));
    }

    #[test]
    fn the_sqlstate_is_part_of_the_message() {
        let e = DbError {
            class: ErrorClass::Systemic,
            sqlstate: Some("42703".into()),
            message: "column \"payment_id\" does not exist".into(),
        };
        assert_eq!(e.to_string(), "column \"payment_id\" does not exist (SQLSTATE 42703)");
        assert!(DbError {
            sqlstate: Some("25006".into()),
            ..DbError::transient("read-only")
        }
        .is_read_only());
    }

    #[test]
    fn session_timeouts_are_startup_options() {
        let c = Config::from_vars(&[
            ("DB_STATEMENT_TIMEOUT_MS".into(), "1500".into()),
            ("DB_LOCK_TIMEOUT_MS".into(), "0".into()),
        ])
        .unwrap()
        .database;
        assert_eq!(
            session_options(&c),
            "-c statement_timeout=1500 -c lock_timeout=0 -c idle_in_transaction_session_timeout=60000"
        );
        let defaults = Config::from_vars(&[]).unwrap().database;
        assert_eq!(
            session_options(&defaults),
            "-c statement_timeout=30000 -c lock_timeout=10000 -c idle_in_transaction_session_timeout=60000"
        );
        let pg = client_config(&defaults);
        assert_eq!(pg.get_dbname(), Some("booking_management"));
        assert_eq!(pg.get_ssl_mode(), WireSslMode::Prefer);
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
    }

    #[test]
    fn verify_modes_need_a_readable_ca_file() {
        let mut c = Config::from_vars(&[]).unwrap().database;
        c.sslmode = SslMode::VerifyFull;
        c.sslrootcert = Some("/nonexistent/ca.pem".into());
        let err = Pool::new(&c).err().expect("an unreadable CA file is refused");
        assert_eq!(err.class, ErrorClass::Systemic);
        assert!(err.message.contains("DB_SSLROOTCERT"), "{err}");
        c.sslmode = SslMode::Prefer;
        assert!(Pool::new(&c).is_ok(), "prefer does not read the CA file");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(300));
        let steps = [50u128, 100, 200, 300, 300];
        for step in steps {
            let d = b.next_delay().as_millis();
            assert!(d >= step / 2 && d <= step, "{d} not within [{}, {step}]", step / 2);
        }
        assert_eq!(b.attempts, 5);
    }

    #[test]
    fn backoff_delays_differ_between_instances() {
        let draws: std::collections::HashSet<u128> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(5)).next_delay().as_micros())
            .collect();
        assert!(draws.len() > 1, "no jitter: {draws:?}");
    }

    #[test]
    fn a_server_that_is_down_is_transient() {
        let pool = Pool::new(&Config::from_vars(&[("DB_PORT".into(), "1".into())]).unwrap().database).unwrap();
        let err = pool
            .get_timeout(Duration::from_millis(500))
            .err()
            .expect("port 1 refuses");
        assert_eq!(err.class, ErrorClass::Transient, "{err}");
    }
}
