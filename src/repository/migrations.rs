//! The worker's own migrations (`sql/migrations/`), applied online: the shared database is live
//! while they run.
//!
//! | migration | what it adds |
//! | --- | --- |
//! | `0001_booking_worker` | `bookings.external_id VARCHAR(255)` and its unique index `bookings_external_id_key`; `booking_worker.dead_letters` and `booking_worker.pending_cancellations` with their indexes |
//! | `0002_dead_letter_sqlstate` | `booking_worker.dead_letters.sqlstate CHAR(5)` |
//! | `0003_legacy_match_index` | the partial index `bookings_legacy_match_idx` on `bookings (room_id, user_id) WHERE external_id IS NULL`, for the adoption of the Go worker's rows |
//! | `0004_apply_batch` | the functions `booking_worker.apply_batch_v1` (a batch in one statement), `booking_worker.resolve_user_id` and `booking_worker.row_id` |
//! | `0005_apply_batch_v2` | `booking_worker.apply_batch_v2`: `apply_batch_v1` with plans a session can keep however much the tables grow: each look-up by an index, with sequential scans off |
//!
//! How they stay online:
//! - Each statement runs on its own, with no statement timeout and a `lock_timeout` of
//!   `DB_MIGRATION_LOCK_TIMEOUT_MS` (2 s). A lock not granted in time, or a deadlock, is retried
//!   with backoff, so booking-management's writes queue behind it for at most that long.
//! - An index on `bookings` is built `CONCURRENTLY`, outside any transaction. An `INVALID` index
//!   left by a failed build is dropped (`DROP INDEX CONCURRENTLY`) and built again; a valid one is
//!   left alone.
//! - A session advisory lock keeps two worker instances from migrating at once. It is taken by
//!   polling (`pg_try_advisory_lock`), so no statement waits inside the server while another
//!   instance builds an index. `booking-worker migrate` gives up after 10 minutes of waiting
//!   (exit 3); `run` keeps waiting.
//! - Every statement can run twice (`IF NOT EXISTS`), so a migration interrupted half-way is run
//!   again. A migration is recorded in `booking_worker.schema_migrations` once all its statements
//!   ran.
//! - They are refused with a clear error when booking-management's tables do not exist.
//!
//! When they run:
//! - `DB_MIGRATE=auto` (the default): `run` applies pending migrations at start-up, after waiting
//!   for the database.
//! - `DB_MIGRATE=off`, or a role without the rights (SQLSTATE `42501`): `run` refuses to start with
//!   exit 7 and an error that names the pending migrations and the remedy: run
//!   `booking-worker migrate` as the owner of booking-management's tables, then start the worker
//!   again. `migrate` run by a role without the rights exits 7 as well.
//! - Once nothing is pending, `run` needs only the run-time privileges, with either setting. So run
//!   `booking-worker migrate` as the owner before rolling out a version that brings a new migration,
//!   and the workers can run under a role that has nothing more.
//!
//! Applying them needs more than running: ownership of `bookings` (to add the column and build its
//! index) and of the `booking_worker` tables (the role that ran the first migration owns them), and
//! `CREATE` on the database (to create the schema).

use crate::database::{Backoff, DbError, ErrorClass};
use postgres::types::Type;
use postgres::Client;
use std::time::{Duration, Instant};

/// A migration: its version, its name and its SQL file.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

impl Migration {
    /// The file's statements, in order: split at each `;` that ends a line outside a
    /// dollar-quoted function body, comments dropped.
    pub fn statements(&self) -> Vec<String> {
        let mut statements = Vec::new();
        let mut current = String::new();
        for line in self.sql.lines().filter(|l| !l.trim_start().starts_with("--")) {
            current.push_str(line);
            current.push('\n');
            let in_body = current.matches("$$").count() % 2 == 1;
            if line.trim_end().ends_with(';') && !in_body {
                statements.push(current.trim().trim_end_matches(';').trim().to_string());
                current.clear();
            }
        }
        statements.push(current.trim().to_string());
        statements.retain(|s| !s.is_empty());
        statements
    }

    /// How `booking-worker migrate` and the README refer to it.
    pub fn label(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }
}

/// Every migration, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "booking_worker",
        sql: include_str!("../../sql/migrations/0001_booking_worker.sql"),
    },
    Migration {
        version: 2,
        name: "dead_letter_sqlstate",
        sql: include_str!("../../sql/migrations/0002_dead_letter_sqlstate.sql"),
    },
    Migration {
        version: 3,
        name: "legacy_match_index",
        sql: include_str!("../../sql/migrations/0003_legacy_match_index.sql"),
    },
    Migration {
        version: 4,
        name: "apply_batch",
        sql: include_str!("../../sql/migrations/0004_apply_batch.sql"),
    },
    Migration {
        version: 5,
        name: "apply_batch_v2",
        sql: include_str!("../../sql/migrations/0005_apply_batch_v2.sql"),
    },
];

/// The session advisory lock that serializes migrations across worker instances.
const MIGRATION_LOCK: i64 = 0x626f_6f6b_696e_6701;

/// How long a migration waits for another instance's migration before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// What stands in the way of starting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateError {
    /// The database failed (transient or systemic).
    Database(DbError),
    /// The role may not change the schema; these migrations are still pending.
    NotAllowed { pending: Vec<String>, error: DbError },
}

impl From<DbError> for MigrateError {
    fn from(e: DbError) -> MigrateError {
        MigrateError::Database(e)
    }
}

/// The migrations not yet applied, by label. Reads only, so it works for any role that can read
/// the worker's schema (and reports everything pending when the schema does not exist yet).
pub fn pending(conn: &mut Client) -> Result<Vec<String>, DbError> {
    let applied = applied_versions(conn)?;
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(Migration::label)
        .collect())
}

fn applied_versions(conn: &mut Client) -> Result<Vec<i32>, DbError> {
    let exists = conn.query_typed_one(
        "SELECT to_regclass('booking_worker.schema_migrations') IS NOT NULL",
        &[],
    )?;
    if !exists.try_get::<_, bool>(0)? {
        return Ok(Vec::new());
    }
    let rows = conn.query_typed("SELECT version FROM booking_worker.schema_migrations", &[])?;
    rows.iter().map(|r| r.try_get(0).map_err(DbError::from)).collect()
}

/// booking-management's tables that this database lacks.
pub fn missing_shared_tables(conn: &mut Client) -> Result<Vec<String>, DbError> {
    let rows = conn.query_typed(
        "SELECT t FROM unnest(ARRAY['users', 'rooms', 'bookings']) AS t WHERE to_regclass(t) IS NULL",
        &[],
    )?;
    rows.iter().map(|r| r.try_get(0).map_err(DbError::from)).collect()
}

/// Applies the pending migrations and returns their labels. Fails with a systemic error when
/// booking-management's tables are missing (the worker never creates them), and with
/// [`MigrateError::NotAllowed`] when the role lacks the rights. The connection's session settings
/// are changed: the caller closes it afterwards.
pub fn migrate(conn: &mut Client, lock_timeout: Duration) -> Result<Vec<String>, MigrateError> {
    let missing = missing_shared_tables(conn)?;
    if !missing.is_empty() {
        return Err(DbError::systemic(
            Some("42P01"),
            format!(
                "table(s) {} missing: load booking-management's schema (sql/schema.sql) first",
                missing.join(", ")
            ),
        )
        .into());
    }
    let todo: Vec<&Migration> = {
        let applied = applied_versions(conn)?;
        MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)).collect()
    };
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    conn.batch_execute(&format!(
        "SET statement_timeout = 0; SET lock_timeout = {}",
        lock_timeout.as_millis()
    ))
    .map_err(DbError::from)?;
    take_lock(conn)?;
    let result = apply_all(conn, &todo, lock_timeout);
    let unlocked = conn.query_typed("SELECT pg_advisory_unlock($1)", &[(&MIGRATION_LOCK, Type::INT8)]);
    let done = result?;
    unlocked.map_err(DbError::from)?;
    Ok(done)
}

fn apply_all(conn: &mut Client, todo: &[&Migration], lock_timeout: Duration) -> Result<Vec<String>, MigrateError> {
    // Another instance may have applied some while this one waited for the lock.
    let applied = applied_versions(conn)?;
    let mut done = Vec::new();
    for migration in todo.iter().filter(|m| !applied.contains(&m.version)) {
        let started = Instant::now();
        log::info!(migration = migration.label(); "applying migration");
        bootstrap(conn, lock_timeout).map_err(|e| refusal(e, migration))?;
        for statement in migration.statements() {
            run_statement(conn, &statement, lock_timeout).map_err(|e| refusal(e, migration))?;
        }
        conn.query_typed(
            "INSERT INTO booking_worker.schema_migrations (version, name) VALUES ($1, $2)
             ON CONFLICT (version) DO NOTHING",
            &[(&migration.version, Type::INT4), (&migration.name, Type::TEXT)],
        )
        .map_err(DbError::from)?;
        log::info!(migration = migration.label(), seconds = started.elapsed().as_secs_f64();
            "migration applied");
        done.push(migration.label());
    }
    Ok(done)
}

/// A privilege error becomes a refusal naming what is pending, from `failed` on.
fn refusal(error: DbError, failed: &Migration) -> MigrateError {
    if error.sqlstate.as_deref() != Some("42501") {
        return MigrateError::Database(error);
    }
    let pending = MIGRATIONS
        .iter()
        .filter(|m| m.version >= failed.version)
        .map(Migration::label)
        .collect();
    MigrateError::NotAllowed { pending, error }
}

/// The worker's schema and its table of applied migrations.
fn bootstrap(conn: &mut Client, lock_timeout: Duration) -> Result<(), DbError> {
    for statement in [
        "CREATE SCHEMA IF NOT EXISTS booking_worker",
        "CREATE TABLE IF NOT EXISTS booking_worker.schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    ] {
        run_statement(conn, statement, lock_timeout)?;
    }
    Ok(())
}

/// Polls for the migration lock, so that no statement waits inside the server while another
/// instance builds an index concurrently (that build waits for every open snapshot).
fn take_lock(conn: &mut Client) -> Result<(), DbError> {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        let row = conn.query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&MIGRATION_LOCK, Type::INT8)])?;
        if row.try_get::<_, bool>(0)? {
            return Ok(());
        }
        if started.elapsed() > LOCK_WAIT {
            return Err(DbError::transient(
                "another booking-worker instance has been migrating for 10 minutes",
            ));
        }
        if backoff.attempts == 0 {
            log::info!("another instance is migrating; waiting for it");
        }
        std::thread::sleep(backoff.next_delay());
    }
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS name ...` statement builds.
pub fn concurrent_index_name(statement: &str) -> Option<&str> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let at = upper.iter().position(|w| w == "CONCURRENTLY")?;
    if upper.get(at + 1..at + 4)? != ["IF", "NOT", "EXISTS"] {
        return None;
    }
    words.get(at + 4).copied()
}

/// Runs one statement, retrying it while its lock is not granted in time (or a deadlock or a
/// lost connection gets in the way). A concurrent index build is checked first, and an invalid
/// leftover dropped.
fn run_statement(conn: &mut Client, statement: &str, lock_timeout: Duration) -> Result<(), DbError> {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let result = match concurrent_index_name(statement) {
            Some(index) => build_index(conn, index, statement),
            None => conn.batch_execute(statement).map_err(DbError::from),
        };
        match result {
            Err(e) if e.is(ErrorClass::Transient) && !conn.is_closed() => {
                let delay = backoff.next_delay();
                let msg = if e.sqlstate.as_deref() == Some("55P03") {
                    "migration statement did not get its lock in time; retrying"
                } else {
                    "migration statement failed for a passing reason; retrying"
                };
                log::warn!(error = e.to_string(), attempt = backoff.attempts,
                    lock_timeout_ms = lock_timeout.as_millis() as u64, retry_in_ms = delay.as_millis() as u64; "{msg}");
                std::thread::sleep(delay);
            }
            other => return other,
        }
    }
}

/// Builds an index concurrently unless a valid one exists; drops an invalid one first.
fn build_index(conn: &mut Client, index: &str, statement: &str) -> Result<(), DbError> {
    let row = conn.query_typed_opt(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        &[(&index, Type::TEXT)],
    )?;
    match row.map(|r| r.try_get::<_, bool>(0)).transpose()? {
        Some(true) => return Ok(()),
        Some(false) => {
            log::warn!(index; "dropping an invalid index left by a failed build");
            conn.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))?;
        }
        None => {}
    }
    let started = Instant::now();
    log::info!(index; "building index concurrently; booking-management's writes go on meanwhile");
    conn.batch_execute(statement)?;
    log::info!(index, seconds = started.elapsed().as_secs_f64(); "index built");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_files_split_into_statements() {
        let first = &MIGRATIONS[0];
        let statements = first.statements();
        assert_eq!(statements.len(), 7, "{statements:#?}");
        assert!(statements[0].starts_with("ALTER TABLE bookings ADD COLUMN IF NOT EXISTS external_id"));
        assert!(statements.iter().all(|s| !s.contains("--") && !s.ends_with(';')));
        assert_eq!(first.label(), "0001_booking_worker");
    }

    #[test]
    fn a_function_body_stays_one_statement() {
        let functions = MIGRATIONS.iter().find(|m| m.name == "apply_batch").unwrap();
        let statements = functions.statements();
        assert_eq!(statements.len(), 3, "{statements:#?}");
        for s in &statements {
            assert!(s.starts_with("CREATE OR REPLACE FUNCTION booking_worker."), "{s}");
            assert!(s.ends_with("$$") && s.matches("$$").count() == 2, "{s}");
        }
    }

    #[test]
    fn versions_are_unique_and_increasing() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    }

    #[test]
    fn every_index_on_bookings_is_built_concurrently() {
        for m in MIGRATIONS {
            for s in m.statements() {
                let upper = s.to_ascii_uppercase();
                if upper.contains("INDEX") && upper.contains(" ON BOOKINGS") {
                    assert!(concurrent_index_name(&s).is_some(), "{}: {s}", m.label());
                }
            }
        }
    }

    #[test]
    fn the_index_name_is_read_from_the_statement() {
        assert_eq!(
            concurrent_index_name("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS bookings_x ON bookings (x)"),
            Some("bookings_x")
        );
        assert_eq!(
            concurrent_index_name("create index concurrently if not exists b_y on bookings (y)"),
            Some("b_y")
        );
        assert_eq!(concurrent_index_name("CREATE INDEX IF NOT EXISTS a ON t (x)"), None);
        assert_eq!(concurrent_index_name("CREATE INDEX CONCURRENTLY a ON t (x)"), None);
    }
}
