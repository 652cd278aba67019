//! Every SQL statement the worker runs, in the Go worker's vocabulary: create a booking, cancel a
//! booking, resolve a user id from an identifier, resolve a room id from an internal id, plus the
//! worker's own dead letters, parked cancellations and migrations.
//!
//! Statements work on whole batches (arrays bound as parameters, expanded with `unnest`), so a
//! batch costs a handful of round trips. Every value is a bound parameter; nothing from an event is
//! ever spliced into SQL text.

use crate::database::DbError;
use chrono::NaiveDate;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Date, Integer, Nullable, Text, Timestamptz};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use std::collections::HashMap;
use std::time::Duration;

/// The worker's own migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "booking_worker",
    include_str!("../sql/migrations/0001_booking_worker.sql"),
)];

/// Serializes migrations across worker instances.
const MIGRATION_LOCK: i64 = 0x626f_6f6b_696e_6701;

/// Applies the migrations not yet applied and returns their versions. Fails with a clear error
/// when booking-management's tables are missing, since the worker never creates them.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<i32>, DbError> {
    conn.transaction(|conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK)
            .execute(conn)?;
        let missing = missing_shared_tables(conn)?;
        if !missing.is_empty() {
            return Err(DbError::Permanent(format!(
                "table(s) {} missing: load booking-management's schema (sql/schema.sql) first",
                missing.join(", ")
            )));
        }
        conn.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS booking_worker;
             CREATE TABLE IF NOT EXISTS booking_worker.schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )?;
        let applied: Vec<Version> =
            diesel::sql_query("SELECT version FROM booking_worker.schema_migrations").load(conn)?;
        let mut done = Vec::new();
        for (version, name, sql) in MIGRATIONS {
            if applied.iter().any(|a| a.version == *version) {
                continue;
            }
            conn.batch_execute(sql)?;
            diesel::sql_query("INSERT INTO booking_worker.schema_migrations (version, name) VALUES ($1, $2)")
                .bind::<Integer, _>(version)
                .bind::<Text, _>(name)
                .execute(conn)?;
            done.push(*version);
        }
        Ok(done)
    })
}

/// booking-management's tables that this database lacks.
pub fn missing_shared_tables(conn: &mut PgConnection) -> Result<Vec<String>, DbError> {
    let missing: Vec<Name> = diesel::sql_query(
        "SELECT t AS name FROM unnest(ARRAY['users', 'rooms', 'bookings']) AS t WHERE to_regclass(t) IS NULL",
    )
    .load(conn)?;
    Ok(missing.into_iter().map(|n| n.name).collect())
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Integer)]
    version: i32,
}

/// Cheap liveness probe.
pub fn ping(conn: &mut PgConnection) -> Result<(), DbError> {
    conn.batch_execute("SELECT 1")?;
    Ok(())
}

/// Takes the transaction-scoped advisory lock of every booking id, in one sorted order, so that two
/// transactions (of this or another worker instance) never handle the same booking at once and
/// never deadlock on each other.
pub fn lock_booking_ids(conn: &mut PgConnection, booking_ids: &[&str]) -> Result<(), DbError> {
    if booking_ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "SELECT pg_advisory_xact_lock(k)
           FROM (SELECT DISTINCT hashtextextended(b, 0) AS k FROM unnest($1::text[]) AS b) AS keys
          ORDER BY k",
    )
    .bind::<Array<Text>, _>(booking_ids)
    .execute(conn)?;
    Ok(())
}

#[derive(QueryableByName)]
struct ResolvedId {
    #[diesel(sql_type = Text)]
    reference: String,
    #[diesel(sql_type = Nullable<Integer>)]
    id: Option<i32>,
}

/// Resolves user identifiers to `users.id`. An identifier is tried as a numeric id first, then as
/// an email, then as a username; unknown identifiers are absent from the map.
pub fn resolve_user_ids(conn: &mut PgConnection, identifiers: &[&str]) -> Result<HashMap<String, i32>, DbError> {
    if identifiers.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<ResolvedId> = diesel::sql_query(
        "SELECT i.ref AS reference,
                COALESCE(
                    (SELECT u.id FROM users u
                      WHERE i.ref ~ '^[0-9]{1,9}$' AND u.id = i.ref::integer),
                    (SELECT u.id FROM users u WHERE u.email = i.ref),
                    (SELECT u.id FROM users u WHERE u.username = i.ref)) AS id
           FROM (SELECT DISTINCT ref FROM unnest($1::text[]) AS ref) AS i",
    )
    .bind::<Array<Text>, _>(identifiers)
    .load(conn)?;
    Ok(rows.into_iter().filter_map(|r| Some((r.reference, r.id?))).collect())
}

/// Resolves room internal ids to `rooms.id`; unknown rooms are absent from the map.
pub fn resolve_room_ids(conn: &mut PgConnection, internal_ids: &[&str]) -> Result<HashMap<String, i32>, DbError> {
    if internal_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<ResolvedId> =
        diesel::sql_query("SELECT internal_id AS reference, id FROM rooms WHERE internal_id = ANY($1::text[])")
            .bind::<Array<Text>, _>(internal_ids)
            .load(conn)?;
    Ok(rows.into_iter().filter_map(|r| Some((r.reference, r.id?))).collect())
}

/// A booking to create, with its user and room already resolved.
#[derive(Debug, Clone)]
pub struct NewBooking<'a> {
    pub external_id: &'a str,
    pub user_id: i32,
    pub room_id: i32,
    pub guests: i32,
    pub start_date: NaiveDate,
    pub end_date: NaiveDate,
    pub payment_id: &'a str,
    /// Written as Cancelled rather than Accepted: a cancellation in the same transaction, decided
    /// by the cancellation rules, cancels it.
    pub cancelled: bool,
}

#[derive(QueryableByName)]
struct Created {
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Integer)]
    id: i32,
}

/// Creates bookings with status Accepted, or Cancelled for those marked so. A booking whose external
/// id already exists is left as it is. Returns the `bookings.id` of each booking actually created, by
/// external id.
pub fn create_bookings(conn: &mut PgConnection, bookings: &[NewBooking<'_>]) -> Result<HashMap<String, i32>, DbError> {
    if bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<Created> = diesel::sql_query(
        "INSERT INTO bookings
             (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status,
              external_id, created_at, updated_at)
         SELECT u, r, g, s, e, p, CASE WHEN c THEN 'Cancelled' ELSE 'Accepted' END, x, now(), now()
           FROM unnest($1::integer[], $2::integer[], $3::integer[], $4::date[], $5::date[],
                       $6::text[], $7::text[], $8::boolean[]) AS t(u, r, g, s, e, p, x, c)
         ON CONFLICT (external_id) DO NOTHING
         RETURNING external_id, id",
    )
    .bind::<Array<Integer>, _>(bookings.iter().map(|b| b.user_id).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(bookings.iter().map(|b| b.room_id).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(bookings.iter().map(|b| b.guests).collect::<Vec<_>>())
    .bind::<Array<Date>, _>(bookings.iter().map(|b| b.start_date).collect::<Vec<_>>())
    .bind::<Array<Date>, _>(bookings.iter().map(|b| b.end_date).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(bookings.iter().map(|b| b.payment_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(bookings.iter().map(|b| b.external_id).collect::<Vec<_>>())
    .bind::<Array<Bool>, _>(bookings.iter().map(|b| b.cancelled).collect::<Vec<_>>())
    .load(conn)?;
    Ok(rows.into_iter().map(|r| (r.external_id, r.id)).collect())
}

/// A booking as a cancellation sees it.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct BookingRow {
    #[diesel(sql_type = Integer)]
    pub id: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub external_id: Option<String>,
    #[diesel(sql_type = Integer)]
    pub user_id: i32,
    #[diesel(sql_type = Text)]
    pub status: String,
}

/// Finds and row-locks the bookings that cancellations refer to: by external id, and, for
/// references made only of digits, by `bookings.id` too (rows created by booking-management have no
/// external id). The caller prefers the external-id match.
pub fn find_bookings_for_cancel(conn: &mut PgConnection, references: &[&str]) -> Result<Vec<BookingRow>, DbError> {
    if references.is_empty() {
        return Ok(Vec::new());
    }
    let rows = diesel::sql_query(
        "SELECT id, external_id, user_id, status FROM bookings
          WHERE external_id = ANY($1::text[])
             OR id = ANY(ARRAY(SELECT r::integer FROM unnest($1::text[]) AS r WHERE r ~ '^[0-9]{1,9}$'))
          ORDER BY id
          FOR UPDATE",
    )
    .bind::<Array<Text>, _>(references)
    .load(conn)?;
    Ok(rows)
}

/// Cancels bookings that are still Accepted; returns how many changed.
pub fn cancel_bookings(conn: &mut PgConnection, ids: &[i32]) -> Result<usize, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let n = diesel::sql_query(
        "UPDATE bookings SET status = 'Cancelled', updated_at = now()
          WHERE id = ANY($1::integer[]) AND status = 'Accepted'",
    )
    .bind::<Array<Integer>, _>(ids)
    .execute(conn)?;
    Ok(n)
}

/// Where a record came from, as stored with a dead letter or a parked cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub baggage: Option<&'a str>,
}

/// A record that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter<'a> {
    pub source: Source<'a>,
    pub booking_id: Option<&'a str>,
    pub reason: &'static str,
    pub error: &'a str,
}

/// Text columns cannot hold NUL; header-derived text may.
fn text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// Stores dead letters. A record already dead-lettered (a replay) is left as it is.
pub fn insert_dead_letters(conn: &mut PgConnection, letters: &[DeadLetter<'_>]) -> Result<(), DbError> {
    if letters.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "INSERT INTO booking_worker.dead_letters
             (topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_id, reason, error)
         SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bytea[], $5::bytea[],
                              $6::text[], $7::text[], $8::text[], $9::text[])
         ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
    )
    .bind::<Array<Text>, _>(letters.iter().map(|l| l.source.topic).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(letters.iter().map(|l| l.source.partition).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(letters.iter().map(|l| l.source.offset).collect::<Vec<_>>())
    .bind::<Array<Nullable<Bytea>>, _>(letters.iter().map(|l| l.source.key).collect::<Vec<_>>())
    .bind::<Array<Bytea>, _>(letters.iter().map(|l| l.source.payload).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(letters.iter().map(|l| l.source.baggage.map(text)).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(letters.iter().map(|l| l.booking_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(letters.iter().map(|l| l.reason).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(letters.iter().map(|l| text(l.error)).collect::<Vec<_>>())
    .execute(conn)?;
    Ok(())
}

/// A cancellation to park until its booking arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parking<'a> {
    pub source: Source<'a>,
    pub booking_ref: &'a str,
    pub user_ref: &'a str,
}

/// Parks cancellations. A record parked before, or already dead-lettered (a replay after expiry),
/// is not parked again.
pub fn park_cancellations(conn: &mut PgConnection, parked: &[Parking<'_>]) -> Result<(), DbError> {
    if parked.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "INSERT INTO booking_worker.pending_cancellations
             (booking_ref, user_ref, topic, kafka_partition, kafka_offset, record_key, payload, baggage)
         SELECT t.* FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                                $6::bytea[], $7::bytea[], $8::text[])
                      AS t(b, u, topic, part, off, k, p, bag)
          WHERE NOT EXISTS (SELECT 1 FROM booking_worker.dead_letters d
                             WHERE d.topic = t.topic AND d.kafka_partition = t.part AND d.kafka_offset = t.off)
         ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
    )
    .bind::<Array<Text>, _>(parked.iter().map(|p| p.booking_ref).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(parked.iter().map(|p| p.user_ref).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(parked.iter().map(|p| p.source.topic).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(parked.iter().map(|p| p.source.partition).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(parked.iter().map(|p| p.source.offset).collect::<Vec<_>>())
    .bind::<Array<Nullable<Bytea>>, _>(parked.iter().map(|p| p.source.key).collect::<Vec<_>>())
    .bind::<Array<Bytea>, _>(parked.iter().map(|p| p.source.payload).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(parked.iter().map(|p| p.source.baggage.map(text)).collect::<Vec<_>>())
    .execute(conn)?;
    Ok(())
}

/// A consumed record as stored with a dead letter or a parked cancellation.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct StoredRecord {
    #[diesel(sql_type = Text)]
    pub topic: String,
    #[diesel(sql_type = Integer)]
    pub kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    pub kafka_offset: i64,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub record_key: Option<Vec<u8>>,
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    #[diesel(sql_type = Nullable<Text>)]
    pub baggage: Option<String>,
}

impl StoredRecord {
    pub fn source(&self) -> Source<'_> {
        Source {
            topic: &self.topic,
            partition: self.kafka_partition,
            offset: self.kafka_offset,
            key: self.record_key.as_deref(),
            payload: &self.payload,
            baggage: self.baggage.as_deref(),
        }
    }
}

/// A parked cancellation taken back out of the table.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct ParkedCancellation {
    #[diesel(sql_type = Text)]
    pub booking_ref: String,
    #[diesel(sql_type = Text)]
    pub user_ref: String,
    #[diesel(embed)]
    pub record: StoredRecord,
    #[diesel(sql_type = Timestamptz)]
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

impl ParkedCancellation {
    pub fn source(&self) -> Source<'_> {
        self.record.source()
    }
}

const PARKED_COLUMNS: &str =
    "booking_ref, user_ref, topic, kafka_partition, kafka_offset, record_key, payload, baggage, parked_at";

/// Removes and returns the parked cancellations of these bookings, oldest first. One index look-up
/// per reference: cheap when little is parked. (A one-time `EXISTS` check over the whole table was
/// slower: once parked rows come and go, its scan walks the pages their deletion left empty.)
pub fn take_parked_cancellations(
    conn: &mut PgConnection,
    booking_refs: &[&str],
) -> Result<Vec<ParkedCancellation>, DbError> {
    if booking_refs.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows: Vec<ParkedCancellation> = diesel::sql_query(format!(
        "DELETE FROM booking_worker.pending_cancellations
          WHERE booking_ref = ANY($1::text[])
         RETURNING {PARKED_COLUMNS}"
    ))
    .bind::<Array<Text>, _>(booking_refs)
    .load(conn)?;
    rows.sort_by(|a, b| {
        let key = |p: &ParkedCancellation| {
            (
                p.parked_at,
                p.record.topic.clone(),
                p.record.kafka_partition,
                p.record.kafka_offset,
            )
        };
        key(a).cmp(&key(b))
    });
    Ok(rows)
}

#[derive(QueryableByName)]
struct Reference {
    #[diesel(sql_type = Text)]
    booking_ref: String,
}

/// Booking references of parked cancellations older than `ttl`, at most `limit`, sorted.
pub fn expired_parked_refs(conn: &mut PgConnection, ttl: Duration, limit: i64) -> Result<Vec<String>, DbError> {
    let rows: Vec<Reference> = diesel::sql_query(
        "SELECT DISTINCT booking_ref FROM booking_worker.pending_cancellations
          WHERE parked_at < now() - make_interval(secs => $1)
          ORDER BY booking_ref LIMIT $2",
    )
    .bind::<diesel::sql_types::Double, _>(ttl.as_secs_f64())
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.booking_ref).collect())
}

/// Removes and returns the parked cancellations of these bookings that are older than `ttl`.
pub fn take_expired_parked(
    conn: &mut PgConnection,
    booking_refs: &[&str],
    ttl: Duration,
) -> Result<Vec<ParkedCancellation>, DbError> {
    let rows = diesel::sql_query(format!(
        "DELETE FROM booking_worker.pending_cancellations
          WHERE booking_ref = ANY($1::text[]) AND parked_at < now() - make_interval(secs => $2)
         RETURNING {PARKED_COLUMNS}"
    ))
    .bind::<Array<Text>, _>(booking_refs)
    .bind::<diesel::sql_types::Double, _>(ttl.as_secs_f64())
    .load(conn)?;
    Ok(rows)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many cancellations are parked.
pub fn count_parked(conn: &mut PgConnection) -> Result<i64, DbError> {
    let row: Count =
        diesel::sql_query("SELECT count(*) AS n FROM booking_worker.pending_cancellations").get_result(conn)?;
    Ok(row.n)
}

#[derive(QueryableByName)]
struct RecordId {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    kafka_offset: i64,
}

/// Which of these records are already dead-lettered, as (topic, partition, offset).
pub fn dead_lettered(
    conn: &mut PgConnection,
    sources: &[Source<'_>],
) -> Result<std::collections::HashSet<(String, i32, i64)>, DbError> {
    if sources.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<RecordId> = diesel::sql_query(
        "SELECT d.topic, d.kafka_partition, d.kafka_offset
           FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS r(topic, part, off)
           JOIN booking_worker.dead_letters d
             ON d.topic = r.topic AND d.kafka_partition = r.part AND d.kafka_offset = r.off",
    )
    .bind::<Array<Text>, _>(sources.iter().map(|s| s.topic).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(sources.iter().map(|s| s.partition).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(sources.iter().map(|s| s.offset).collect::<Vec<_>>())
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| (r.topic, r.kafka_partition, r.kafka_offset))
        .collect())
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct StoredDeadLetter {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(embed)]
    pub record: StoredRecord,
    #[diesel(sql_type = Nullable<Text>)]
    pub booking_id: Option<String>,
    #[diesel(sql_type = Text)]
    pub reason: String,
    #[diesel(sql_type = Text)]
    pub error: String,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub replayed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Dead letters, oldest first, optionally one by id or those of one reason; replayed ones only
/// when asked.
pub fn list_dead_letters(
    conn: &mut PgConnection,
    id: Option<i64>,
    reason: Option<&str>,
    include_replayed: bool,
    limit: i64,
) -> Result<Vec<StoredDeadLetter>, DbError> {
    let rows = diesel::sql_query(
        "SELECT id, topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_id,
                reason, error, created_at, replayed_at
           FROM booking_worker.dead_letters
          WHERE ($1::bigint IS NULL OR id = $1)
            AND ($2::text IS NULL OR reason = $2)
            AND ($3 OR replayed_at IS NULL)
          ORDER BY id
          LIMIT $4",
    )
    .bind::<Nullable<BigInt>, _>(id)
    .bind::<Nullable<Text>, _>(reason)
    .bind::<diesel::sql_types::Bool, _>(include_replayed)
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(rows)
}

/// Marks a dead letter as replayed successfully.
pub fn mark_replayed(conn: &mut PgConnection, id: i64) -> Result<(), DbError> {
    diesel::sql_query("UPDATE booking_worker.dead_letters SET replayed_at = now() WHERE id = $1")
        .bind::<BigInt, _>(id)
        .execute(conn)?;
    Ok(())
}

/// Records why a replayed dead letter still fails.
pub fn note_replay_failure(conn: &mut PgConnection, id: i64, reason: &str, error: &str) -> Result<(), DbError> {
    diesel::sql_query("UPDATE booking_worker.dead_letters SET reason = $2, error = $3 WHERE id = $1")
        .bind::<BigInt, _>(id)
        .bind::<Text, _>(reason)
        .bind::<Text, _>(text(error))
        .execute(conn)?;
    Ok(())
}
