//! The dead letters, `booking_worker.dead_letters`: stored, looked up on a replay of the log,
//! listed and replayed by the `dead-letters` commands.
//!
//! A record that cannot be applied is stored in `booking_worker.dead_letters`, then logged at warn
//! level. One row per record, unique by topic, partition and offset, so a replay of the log finds it
//! and keeps it a dead letter.
//!
//! | column | what it holds |
//! | --- | --- |
//! | `id` | the dead letter's id (`dead-letters list --id`, `replay --id`) |
//! | `topic`, `kafka_partition`, `kafka_offset` | where the record is in Kafka |
//! | `record_key`, `payload` | the record's key and raw payload, whole |
//! | `baggage` | its `Baggage` header, when it had one |
//! | `booking_id` | the booking id, when it could be read |
//! | `reason` | the reason code (see `crate::models`) |
//! | `error` | a human-readable error; for `database_rejected`, the server's message |
//! | `sqlstate` | for `database_rejected`, the server's SQLSTATE |
//! | `created_at` | when it was dead-lettered |
//! | `replayed_at` | when `dead-letters replay` brought it to another end |
//!
//! ```sql
//! SELECT id, reason, sqlstate, error, topic, kafka_partition, kafka_offset, convert_from(payload, 'UTF8')
//!   FROM booking_worker.dead_letters ORDER BY id DESC LIMIT 20;
//! ```
//!

use super::records::*;
use super::{execute, get, query, Param};
use crate::database::DbError;
use chrono::{DateTime, Utc};
use postgres::types::Type;
use postgres::GenericClient;

/// Stores dead letters. A record already dead-lettered (a replay) is left as it is.
pub fn insert_dead_letters<C: GenericClient>(conn: &mut C, letters: &[DeadLetter<'_>]) -> Result<(), DbError> {
    if letters.is_empty() {
        return Ok(());
    }
    let sources = SourceColumns::new(letters.iter().map(|l| (&l.source, true)));
    let booking_ids: Vec<Option<&str>> = letters.iter().map(|l| l.booking_id).collect();
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason).collect();
    let errors: Vec<String> = letters.iter().map(|l| text(l.error)).collect();
    let sqlstates: Vec<Option<&str>> = letters.iter().map(|l| l.sqlstate).collect();
    let rest: [Param<'_>; 4] = [
        (&booking_ids, Type::TEXT_ARRAY),
        (&reasons, Type::TEXT_ARRAY),
        (&errors, Type::TEXT_ARRAY),
        (&sqlstates, Type::TEXT_ARRAY),
    ];
    let params: Vec<Param<'_>> = sources.params().into_iter().chain(rest).collect();
    execute(
        conn,
        "INSERT INTO booking_worker.dead_letters
             (topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_id, reason, error,
              sqlstate)
         SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bytea[], $5::bytea[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
         ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
        &params,
    )
    .map(drop)
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub record: StoredRecord,
    pub booking_id: Option<String>,
    pub reason: String,
    pub error: String,
    pub sqlstate: Option<String>,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Which dead letters to list: one by id, or those of one reason; replayed ones only when asked.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter<'a> {
    pub id: Option<i64>,
    pub reason: Option<&'a str>,
    pub include_replayed: bool,
    pub limit: i64,
}

/// Dead letters, oldest first.
pub fn list_dead_letters<C: GenericClient>(
    conn: &mut C,
    filter: &DeadLetterFilter<'_>,
) -> Result<Vec<StoredDeadLetter>, DbError> {
    let rows = query(
        conn,
        "SELECT id, topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_id,
                reason, error, sqlstate::text AS sqlstate, created_at, replayed_at
           FROM booking_worker.dead_letters
          WHERE ($1::bigint IS NULL OR id = $1)
            AND ($2::text IS NULL OR reason = $2)
            AND ($3 OR replayed_at IS NULL)
          ORDER BY id
          LIMIT $4",
        &[
            (&filter.id, Type::INT8),
            (&filter.reason, Type::TEXT),
            (&filter.include_replayed, Type::BOOL),
            (&filter.limit, Type::INT8),
        ],
    )?;
    rows.iter()
        .map(|r| {
            Ok(StoredDeadLetter {
                id: get(r, "id")?,
                record: StoredRecord::from_row(r)?,
                booking_id: get(r, "booking_id")?,
                reason: get(r, "reason")?,
                error: get(r, "error")?,
                sqlstate: get(r, "sqlstate")?,
                created_at: get(r, "created_at")?,
                replayed_at: get(r, "replayed_at")?,
            })
        })
        .collect()
}

/// Marks a dead letter as replayed successfully.
pub fn mark_replayed<C: GenericClient>(conn: &mut C, id: i64) -> Result<(), DbError> {
    execute(
        conn,
        "UPDATE booking_worker.dead_letters SET replayed_at = now() WHERE id = $1",
        &[(&id, Type::INT8)],
    )
    .map(drop)
}

/// Records why a replayed dead letter still fails.
pub fn note_replay_failure<C: GenericClient>(
    conn: &mut C,
    id: i64,
    reason: &str,
    error: &str,
    sqlstate: Option<&str>,
) -> Result<(), DbError> {
    execute(
        conn,
        "UPDATE booking_worker.dead_letters SET reason = $2, error = $3, sqlstate = $4 WHERE id = $1",
        &[
            (&id, Type::INT8),
            (&reason, Type::TEXT),
            (&text(error), Type::TEXT),
            (&sqlstate, Type::TEXT),
        ],
    )
    .map(drop)
}
