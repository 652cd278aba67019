//! Every SQL statement the worker runs, in the Go worker's vocabulary: create a booking, cancel a
//! booking, resolve a user id from an identifier, resolve a room id from an internal id, plus the
//! worker's own dead letters, parked cancellations and migrations.
//!
//! Statements work on whole batches (arrays bound as parameters, expanded with `unnest`), so a
//! batch costs a handful of round trips. Each is sent with its parameter types (`query_typed`):
//! parse, bind and execute travel together, with no separate prepare round trip. Every value is a
//! bound parameter; nothing from an event is ever spliced into SQL text. `created_at` and
//! `updated_at` come from the server's clock (`now()`), in the server's time zone, exactly as
//! booking-management's own column defaults set them. The worker caches nothing beyond the batch in
//! hand.
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
//!   `schema_migrations`.
//!
//! # Dead letters
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
//! # Parked cancellations
//!
//! A cancellation that arrives before its booking waits in `booking_worker.pending_cancellations`,
//! one row per record (unique by topic, partition and offset). A booking takes its parked
//! cancellations out in pages of 500 (a booking with more gets the rest in further transactions of
//! its writer), and the expiry takes them out in pages too, so memory stays bounded.

pub mod migrations;

use crate::database::DbError;
use chrono::{DateTime, NaiveDate, Utc};
use postgres::types::{FromSql, ToSql, Type};
use postgres::{GenericClient, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

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

/// `(reference, id)` rows as a map; a NULL id (nothing matched) is left out.
fn resolved(rows: &[Row]) -> Result<HashMap<String, i32>, DbError> {
    let mut map = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Some(id) = get::<Option<i32>>(row, "id")? {
            map.insert(get(row, "reference")?, id);
        }
    }
    Ok(map)
}

/// Resolves user identifiers to `users.id`. An identifier is tried as a numeric id first, then as
/// an email, then as a username; unknown identifiers are absent from the map.
pub fn resolve_user_ids<C: GenericClient>(conn: &mut C, identifiers: &[&str]) -> Result<HashMap<String, i32>, DbError> {
    if identifiers.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = query(
        conn,
        "SELECT i.ref AS reference,
                COALESCE(
                    (SELECT u.id FROM users u
                      WHERE u.id = CASE WHEN i.ref ~ '^0*[0-9]{1,10}$' THEN
                                     CASE WHEN i.ref::int8 <= 2147483647 THEN i.ref::integer END END),
                    (SELECT u.id FROM users u WHERE u.email = i.ref),
                    (SELECT u.id FROM users u WHERE u.username = i.ref)) AS id
           FROM (SELECT DISTINCT ref FROM unnest($1::text[]) AS ref) AS i",
        &[(&identifiers, Type::TEXT_ARRAY)],
    )?;
    resolved(&rows)
}

/// Resolves room internal ids to `rooms.id`; unknown rooms are absent from the map.
pub fn resolve_room_ids<C: GenericClient>(
    conn: &mut C,
    internal_ids: &[&str],
) -> Result<HashMap<String, i32>, DbError> {
    if internal_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = query(
        conn,
        "SELECT internal_id::text AS reference, id FROM rooms WHERE internal_id = ANY($1::text[])",
        &[(&internal_ids, Type::TEXT_ARRAY)],
    )?;
    resolved(&rows)
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
    /// The event's instants, when its dates were timestamps (for adopting the Go worker's rows).
    pub start_instant: Option<DateTime<Utc>>,
    pub end_instant: Option<DateTime<Utc>>,
    pub payment_id: &'a str,
    /// Written as Cancelled rather than Accepted: a cancellation in the same transaction, decided
    /// by the cancellation rules, cancels it.
    pub cancelled: bool,
}

/// The fields of new bookings as one array per column, to bind as parameters.
struct BookingColumns<'a> {
    users: Vec<i32>,
    rooms: Vec<i32>,
    guests: Vec<i32>,
    starts: Vec<NaiveDate>,
    start_instants: Vec<Option<DateTime<Utc>>>,
    ends: Vec<NaiveDate>,
    end_instants: Vec<Option<DateTime<Utc>>>,
    payments: Vec<&'a str>,
    externals: Vec<&'a str>,
    cancelled: Vec<bool>,
}

impl<'a> BookingColumns<'a> {
    fn new(bookings: &[NewBooking<'a>]) -> BookingColumns<'a> {
        BookingColumns {
            users: bookings.iter().map(|b| b.user_id).collect(),
            rooms: bookings.iter().map(|b| b.room_id).collect(),
            guests: bookings.iter().map(|b| b.guests).collect(),
            starts: bookings.iter().map(|b| b.start_date).collect(),
            start_instants: bookings.iter().map(|b| b.start_instant).collect(),
            ends: bookings.iter().map(|b| b.end_date).collect(),
            end_instants: bookings.iter().map(|b| b.end_instant).collect(),
            payments: bookings.iter().map(|b| b.payment_id).collect(),
            externals: bookings.iter().map(|b| b.external_id).collect(),
            cancelled: bookings.iter().map(|b| b.cancelled).collect(),
        }
    }

    /// The columns as parameters $1 to $10, in the order of [`BOOKING_COLUMNS`].
    fn params(&self) -> [Param<'_>; 10] {
        [
            (&self.users, Type::INT4_ARRAY),
            (&self.rooms, Type::INT4_ARRAY),
            (&self.guests, Type::INT4_ARRAY),
            (&self.starts, Type::DATE_ARRAY),
            (&self.start_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.ends, Type::DATE_ARRAY),
            (&self.end_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.payments, Type::TEXT_ARRAY),
            (&self.externals, Type::TEXT_ARRAY),
            (&self.cancelled, Type::BOOL_ARRAY),
        ]
    }
}

/// [`BookingColumns::params`] as a table `t`: user, room, guests, start date and instant, end date
/// and instant, payment id, external id, cancelled, and the 1-based row number `n`.
const BOOKING_COLUMNS: &str = "unnest($1::integer[], $2::integer[], $3::integer[], $4::date[], $5::timestamptz[],
                    $6::date[], $7::timestamptz[], $8::text[], $9::text[], $10::boolean[])
             WITH ORDINALITY AS t(u, r, g, s, si, e, ei, p, x, c, n)";

/// For each booking (by index), the ids of the rows the Go worker wrote that it matches, lowest
/// first: no external id; the same user, room, guests and payment id; each date either as written
/// or as the day the server's time zone gives the event's instant (the Go worker bound the
/// instant to a `DATE` column). Bookings whose external id already has a row get none.
pub fn find_legacy_matches<C: GenericClient>(
    conn: &mut C,
    bookings: &[NewBooking<'_>],
) -> Result<HashMap<usize, Vec<i32>>, DbError> {
    if bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let c = BookingColumns::new(bookings);
    let rows = query(
        conn,
        &format!(
            "SELECT (t.n - 1)::integer AS i, array_agg(b.id ORDER BY b.id) AS ids
           FROM {BOOKING_COLUMNS}
           JOIN bookings b
             ON b.external_id IS NULL AND b.room_id = t.r AND b.user_id = t.u
            AND b.number_of_guests = t.g AND b.payment_id = t.p
            AND (b.start_date = t.s OR b.start_date = t.si::date)
            AND (b.end_date = t.e OR b.end_date = t.ei::date)
          WHERE NOT EXISTS (SELECT 1 FROM bookings x WHERE x.external_id = t.x)
          GROUP BY t.n"
        ),
        &c.params(),
    )?;
    rows.iter()
        .map(|r| Ok((get::<i32>(r, "i")? as usize, get(r, "ids")?)))
        .collect()
}

/// Sets the external id of rows the Go worker wrote, and nothing else. A row another transaction
/// adopted meanwhile is left alone. Returns the row id of each external id adopted.
pub fn adopt_bookings<C: GenericClient>(
    conn: &mut C,
    adoptions: &[(i32, &str)],
) -> Result<HashMap<String, i32>, DbError> {
    if adoptions.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i32> = adoptions.iter().map(|(id, _)| *id).collect();
    let externals: Vec<&str> = adoptions.iter().map(|(_, x)| *x).collect();
    let rows = query(
        conn,
        "UPDATE bookings b SET external_id = t.x
           FROM unnest($1::integer[], $2::text[]) AS t(id, x)
          WHERE b.id = t.id AND b.external_id IS NULL
         RETURNING b.id, b.external_id::text AS external_id",
        &[(&ids, Type::INT4_ARRAY), (&externals, Type::TEXT_ARRAY)],
    )?;
    rows.iter()
        .map(|r| Ok((get(r, "external_id")?, get(r, "id")?)))
        .collect()
}

/// Creates bookings with status Accepted, or Cancelled for those marked so. A booking whose external
/// id already exists is left as it is. Returns the `bookings.id` of each booking actually created, by
/// external id.
pub fn create_bookings<C: GenericClient>(
    conn: &mut C,
    bookings: &[NewBooking<'_>],
) -> Result<HashMap<String, i32>, DbError> {
    if bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let c = BookingColumns::new(bookings);
    let rows = query(
        conn,
        &format!(
            "INSERT INTO bookings
             (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status,
              external_id, created_at, updated_at)
         SELECT u, r, g, s, e, p, CASE WHEN c THEN 'Cancelled' ELSE 'Accepted' END, x, now(), now()
           FROM {BOOKING_COLUMNS}
         ON CONFLICT (external_id) DO NOTHING
         RETURNING external_id::text AS external_id, id"
        ),
        &c.params(),
    )?;
    rows.iter()
        .map(|r| Ok((get(r, "external_id")?, get(r, "id")?)))
        .collect()
}

/// A booking as a cancellation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingRow {
    pub id: i32,
    pub external_id: Option<String>,
    pub user_id: i32,
    pub status: String,
}

/// Finds and row-locks the bookings that cancellations refer to: by external id, and, for
/// references made only of digits, by `bookings.id` too (rows created by booking-management have no
/// external id). The caller prefers the external-id match.
pub fn find_bookings_for_cancel<C: GenericClient>(
    conn: &mut C,
    references: &[&str],
) -> Result<Vec<BookingRow>, DbError> {
    if references.is_empty() {
        return Ok(Vec::new());
    }
    let rows = query(
        conn,
        "SELECT id, external_id::text AS external_id, user_id, status::text AS status FROM bookings
          WHERE external_id = ANY($1::text[])
             OR id = ANY(ARRAY(SELECT CASE WHEN r ~ '^0*[0-9]{1,10}$' THEN
                                        CASE WHEN r::int8 <= 2147483647 THEN r::integer END END
                                 FROM unnest($1::text[]) AS r))
          ORDER BY id
          FOR UPDATE",
        &[(&references, Type::TEXT_ARRAY)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(BookingRow {
                id: get(r, "id")?,
                external_id: get(r, "external_id")?,
                user_id: get(r, "user_id")?,
                status: get(r, "status")?,
            })
        })
        .collect()
}

/// Cancels bookings that are still Accepted; returns how many changed.
pub fn cancel_bookings<C: GenericClient>(conn: &mut C, ids: &[i32]) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    execute(
        conn,
        "UPDATE bookings SET status = 'Cancelled', updated_at = now()
          WHERE id = ANY($1::integer[]) AND status = 'Accepted'",
        &[(&ids, Type::INT4_ARRAY)],
    )
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
    /// The server's SQLSTATE, when the database refused the record.
    pub sqlstate: Option<&'a str>,
}

/// Text columns cannot hold NUL; header-derived text may.
fn text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// The columns every stored record has, as arrays: topic, partition, offset, key, payload,
/// baggage.
struct SourceColumns<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    baggage: Vec<Option<String>>,
}

impl<'a> SourceColumns<'a> {
    fn new<'s: 'a>(sources: impl Iterator<Item = &'a Source<'s>>) -> SourceColumns<'a> {
        let mut c = SourceColumns {
            topics: Vec::new(),
            partitions: Vec::new(),
            offsets: Vec::new(),
            keys: Vec::new(),
            payloads: Vec::new(),
            baggage: Vec::new(),
        };
        for s in sources {
            c.topics.push(s.topic);
            c.partitions.push(s.partition);
            c.offsets.push(s.offset);
            c.keys.push(s.key);
            c.payloads.push(s.payload);
            c.baggage.push(s.baggage.map(text));
        }
        c
    }

    /// The six arrays as parameters, in column order.
    fn params(&self) -> [Param<'_>; 6] {
        [
            (&self.topics, Type::TEXT_ARRAY),
            (&self.partitions, Type::INT4_ARRAY),
            (&self.offsets, Type::INT8_ARRAY),
            (&self.keys, Type::BYTEA_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
            (&self.baggage, Type::TEXT_ARRAY),
        ]
    }
}

/// Stores dead letters. A record already dead-lettered (a replay) is left as it is.
pub fn insert_dead_letters<C: GenericClient>(conn: &mut C, letters: &[DeadLetter<'_>]) -> Result<(), DbError> {
    if letters.is_empty() {
        return Ok(());
    }
    let sources = SourceColumns::new(letters.iter().map(|l| &l.source));
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

/// A cancellation to park until its booking arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parking<'a> {
    pub source: Source<'a>,
    pub booking_ref: &'a str,
    pub user_ref: &'a str,
    /// When it was first parked; `None`: now.
    pub parked_at: Option<DateTime<Utc>>,
}

/// Parks cancellations. A record parked before, or already dead-lettered (a replay after expiry),
/// is not parked again.
pub fn park_cancellations<C: GenericClient>(conn: &mut C, parked: &[Parking<'_>]) -> Result<(), DbError> {
    if parked.is_empty() {
        return Ok(());
    }
    let sources = SourceColumns::new(parked.iter().map(|p| &p.source));
    let booking_refs: Vec<&str> = parked.iter().map(|p| p.booking_ref).collect();
    let user_refs: Vec<&str> = parked.iter().map(|p| p.user_ref).collect();
    let parked_at: Vec<Option<DateTime<Utc>>> = parked.iter().map(|p| p.parked_at).collect();
    let rest: [Param<'_>; 3] = [
        (&booking_refs, Type::TEXT_ARRAY),
        (&user_refs, Type::TEXT_ARRAY),
        (&parked_at, Type::TIMESTAMPTZ_ARRAY),
    ];
    let params: Vec<Param<'_>> = sources.params().into_iter().chain(rest).collect();
    execute(
        conn,
        "INSERT INTO booking_worker.pending_cancellations
             (topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_ref, user_ref,
              parked_at)
         SELECT t.topic, t.part, t.off, t.k, t.p, t.bag, t.b, t.u, COALESCE(t.at, now())
           FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bytea[], $5::bytea[],
                       $6::text[], $7::text[], $8::text[], $9::timestamptz[])
                AS t(topic, part, off, k, p, bag, b, u, at)
          WHERE NOT EXISTS (SELECT 1 FROM booking_worker.dead_letters d
                             WHERE d.topic = t.topic AND d.kafka_partition = t.part AND d.kafka_offset = t.off)
         ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
        &params,
    )
    .map(drop)
}

/// A consumed record as stored with a dead letter or a parked cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub record_key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub baggage: Option<String>,
}

impl StoredRecord {
    fn from_row(row: &Row) -> Result<StoredRecord, DbError> {
        Ok(StoredRecord {
            topic: get(row, "topic")?,
            kafka_partition: get(row, "kafka_partition")?,
            kafka_offset: get(row, "kafka_offset")?,
            record_key: get(row, "record_key")?,
            payload: get(row, "payload")?,
            baggage: get(row, "baggage")?,
        })
    }

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedCancellation {
    pub booking_ref: String,
    pub user_ref: String,
    pub record: StoredRecord,
    pub parked_at: DateTime<Utc>,
}

impl ParkedCancellation {
    fn from_row(row: &Row) -> Result<ParkedCancellation, DbError> {
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

/// Removes and returns at most `limit` parked cancellations of these bookings, oldest first. One
/// index look-up per reference, so it stays cheap when little is parked; a scan of the whole
/// table would walk the pages that deleted parked rows leave empty.
pub fn take_parked_cancellations<C: GenericClient>(
    conn: &mut C,
    booking_refs: &[&str],
    limit: i64,
) -> Result<Vec<ParkedCancellation>, DbError> {
    if booking_refs.is_empty() {
        return Ok(Vec::new());
    }
    let rows = query(
        conn,
        &format!(
            "DELETE FROM booking_worker.pending_cancellations
              WHERE id IN (SELECT id FROM booking_worker.pending_cancellations
                            WHERE booking_ref = ANY($1::text[])
                            ORDER BY parked_at, id
                            LIMIT $2)
             RETURNING {PARKED_COLUMNS}"
        ),
        &[(&booking_refs, Type::TEXT_ARRAY), (&limit, Type::INT8)],
    )?;
    let mut parked = parked_rows(&rows)?;
    parked.sort_by(|a, b| {
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
    Ok(parked)
}

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

/// Which of these records are already dead-lettered, as (topic, partition, offset).
pub fn dead_lettered<C: GenericClient>(
    conn: &mut C,
    sources: &[Source<'_>],
) -> Result<HashSet<(String, i32, i64)>, DbError> {
    if sources.is_empty() {
        return Ok(HashSet::new());
    }
    let columns = SourceColumns::new(sources.iter());
    let rows = query(
        conn,
        "SELECT d.topic, d.kafka_partition, d.kafka_offset
           FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS r(topic, part, off)
           JOIN booking_worker.dead_letters d
             ON d.topic = r.topic AND d.kafka_partition = r.part AND d.kafka_offset = r.off",
        &columns.params()[..3],
    )?;
    rows.iter()
        .map(|r| Ok((get(r, "topic")?, get(r, "kafka_partition")?, get(r, "kafka_offset")?)))
        .collect()
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
