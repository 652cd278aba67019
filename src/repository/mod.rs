//! Every SQL statement the worker runs: a batch of events applied in one statement (`batch`), the
//! worker's own dead letters, parked cancellations and migrations.
//!
//! A batch is one call of the batch function `booking_worker.apply_batch_v2`, which the migration
//! `0005_apply_batch_v2` creates in the worker's schema. It speaks the Go worker's vocabulary: it
//! resolves a user id from an identifier (`booking_worker.resolve_user_id`) and a room id from an
//! internal id, creates bookings and cancels bookings, all in bulk. Each statement is sent with
//! its parameter types (`query_typed`): parse, bind and execute travel together, with no separate
//! prepare round trip. Every value is a bound parameter; nothing from an event is ever spliced into
//! SQL text. `created_at` and `updated_at` come from the server's clock (`now()`), in the server's
//! time zone, exactly as booking-management's own column defaults set them. The worker caches
//! nothing beyond the batch in hand.
//!
//! # The tables
//!
//! The worker never creates or rewrites booking-management's tables. `sql/schema.sql` is their
//! schema exactly as production has it (types, widths, nullability, defaults, constraints, the six
//! indexes); only the local scripts and the tests load it, so that they meet what production runs.
//! The worker's migrations (`migrations`) add only:
//! - `bookings.external_id` and its unique index `bookings_external_id_key`;
//! - the partial index `bookings_legacy_match_idx`, which holds only the rows without an external id
//!   (the Go worker's), for their adoption;
//! - the schema `booking_worker` with `dead_letters`, `pending_cancellations` and
//!   `schema_migrations`;
//! - the batch function and the two it uses, in that schema.
//!
//! The statements, by what they touch: `batch` (booking-management's tables and the worker's own),
//! `dead_letters` and `parked` (the worker's own tables, with the stored record of `records`),
//! `migrations`.

mod batch;
mod dead_letters;
pub mod migrations;
mod parked;
mod records;

use crate::database::DbError;
pub use batch::*;
pub use dead_letters::*;
pub use parked::*;
use postgres::types::{FromSql, ToSql, Type};
use postgres::{GenericClient, Row};
pub use records::*;

pub use migrations::{migrate, missing_shared_tables, pending, MigrateError};

/// One bound parameter and its type.
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// Runs a statement and returns its rows.
fn query<C: GenericClient>(conn: &mut C, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
    Ok(conn.query_typed(sql, params)?)
}

/// Runs a statement and returns how many rows it changed.
fn execute<C: GenericClient>(conn: &mut C, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError> {
    Ok(conn.execute_typed(sql, params)?)
}

/// A column of a row, by name. A column of an unexpected type is a systemic error, never a panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, column: &str) -> Result<T, DbError> {
    Ok(row.try_get(column)?)
}

/// Cheap liveness probe.
pub fn ping<C: GenericClient>(conn: &mut C) -> Result<(), DbError> {
    query(conn, "SELECT 1", &[]).map(drop)
}

/// Takes the transaction-scoped advisory lock of every booking id, in one sorted order, so that two
/// transactions (of this or another worker instance) never handle the same booking at once and
/// never deadlock on each other.
pub fn lock_booking_ids<C: GenericClient>(conn: &mut C, booking_ids: &[&str]) -> Result<(), DbError> {
    if booking_ids.is_empty() {
        return Ok(());
    }
    query(
        conn,
        "SELECT pg_advisory_xact_lock(k)
           FROM (SELECT DISTINCT hashtextextended(b, 0) AS k FROM unnest($1::text[]) AS b) AS keys
          ORDER BY k",
        &[(&booking_ids, Type::TEXT_ARRAY)],
    )
    .map(drop)
}
