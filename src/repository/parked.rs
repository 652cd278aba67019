//! The parked cancellations, `booking_worker.pending_cancellations`: parked, taken out by their
//! bookings or by the expiry, and counted.
//!
//! A cancellation that arrives before its booking waits in `booking_worker.pending_cancellations`,
//! one row per record (unique by topic, partition and offset). A booking takes its parked
//! cancellations out in pages of 500 (a booking with more gets the rest in further transactions of
//! its writer), and the expiry takes them out in pages too, so memory stays bounded.

use super::records::*;
use super::{get, query};
use crate::database::DbError;
use chrono::{DateTime, Utc};
use postgres::types::Type;
use postgres::{GenericClient, Row};
use std::time::Duration;

/// A parked cancellation taken back out of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedCancellation {
    pub booking_ref: String,
    pub user_ref: String,
    pub record: StoredRecord,
    pub parked_at: DateTime<Utc>,
}

impl ParkedCancellation {
    pub(super) fn from_row(row: &Row) -> Result<ParkedCancellation, DbError> {
        Ok(ParkedCancellation {
            booking_ref: get(row, "booking_ref")?,
            user_ref: get(row, "user_ref")?,
            record: StoredRecord::from_row(row)?,
            parked_at: get(row, "parked_at")?,
        })
    }

    pub fn source(&self) -> Source<'_> {
        self.record.source()
    }
}

fn parked_rows(rows: &[Row]) -> Result<Vec<ParkedCancellation>, DbError> {
    rows.iter().map(ParkedCancellation::from_row).collect()
}

const PARKED_COLUMNS: &str =
    "booking_ref, user_ref, topic, kafka_partition, kafka_offset, record_key, payload, baggage, parked_at";

/// Booking references of parked cancellations older than `ttl`, at most `limit`, sorted.
pub fn expired_parked_refs<C: GenericClient>(conn: &mut C, ttl: Duration, limit: i64) -> Result<Vec<String>, DbError> {
    let rows = query(
        conn,
        "SELECT DISTINCT booking_ref FROM booking_worker.pending_cancellations
          WHERE parked_at < now() - make_interval(secs => $1)
          ORDER BY booking_ref LIMIT $2",
        &[(&ttl.as_secs_f64(), Type::FLOAT8), (&limit, Type::INT8)],
    )?;
    rows.iter().map(|r| get(r, "booking_ref")).collect()
}

/// Removes and returns at most `limit` parked cancellations of these bookings that are older than
/// `ttl`.
pub fn take_expired_parked<C: GenericClient>(
    conn: &mut C,
    booking_refs: &[&str],
    ttl: Duration,
    limit: i64,
) -> Result<Vec<ParkedCancellation>, DbError> {
    let rows = query(
        conn,
        &format!(
            "DELETE FROM booking_worker.pending_cancellations
              WHERE id IN (SELECT id FROM booking_worker.pending_cancellations
                            WHERE booking_ref = ANY($1::text[])
                              AND parked_at < now() - make_interval(secs => $2)
                            ORDER BY id
                            LIMIT $3)
             RETURNING {PARKED_COLUMNS}"
        ),
        &[
            (&booking_refs, Type::TEXT_ARRAY),
            (&ttl.as_secs_f64(), Type::FLOAT8),
            (&limit, Type::INT8),
        ],
    )?;
    parked_rows(&rows)
}

/// The parked cancellations at a glance: how many, and how long ago the oldest was parked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParkedNow {
    pub count: i64,
    /// Seconds since the oldest was parked; 0 when none is.
    pub oldest_age_secs: f64,
}

/// How many cancellations are parked, and the age of the oldest (the index on `parked_at` keeps
/// it cheap).
pub fn parked_now<C: GenericClient>(conn: &mut C) -> Result<ParkedNow, DbError> {
    let rows = query(
        conn,
        "SELECT count(*) AS n,
                COALESCE(EXTRACT(EPOCH FROM now() - min(parked_at)), 0)::float8 AS oldest
           FROM booking_worker.pending_cancellations",
        &[],
    )?;
    let Some(row) = rows.first() else {
        return Ok(ParkedNow {
            count: 0,
            oldest_age_secs: 0.0,
        });
    };
    Ok(ParkedNow {
        count: get(row, "n")?,
        oldest_age_secs: get(row, "oldest")?,
    })
}
