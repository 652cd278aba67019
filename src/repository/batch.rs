//! A whole batch in one statement: `booking_worker.apply_batch_v2`, which migration
//! `0005_apply_batch_v2` creates, takes every record of the batch and decides and writes each one's
//! end in the server. Outside an explicit transaction the statement is its own transaction, so a
//! batch costs one round trip, its commit included, whatever its size and whatever it holds.
//!
//! The contract:
//! - In: one array per column of the records (the stored record, its kind, and the fields of its
//!   event or the rejection of a record that failed decoding), the bookings whose parked
//!   cancellations to release, and the options.
//! - Out: a `record` row per record, in order, with its end (as `crate::pipeline::End` names it), the booking's
//!   row id, and the reason and error of a dead letter; a `released` row per parked cancellation
//!   taken out, with the stored record and its end; a `more` row per booking that may have more
//!   parked than one page.
//! - A record the database refuses for its own values fails the whole statement with its
//!   SQLSTATE, so nothing of the batch is written and the writer isolates the record.
//! - A `bytes_wanted` row alone: a booking sent without its stored record is a dead letter, and
//!   nothing was written ([`apply_batch`] sends the batch again with every record's bytes).

use super::parked::ParkedCancellation;
use super::records::{text, Source, SourceColumns};
use super::{get, query, Param};
use crate::database::{DbError, ErrorClass};
use chrono::{DateTime, NaiveDate, Utc};
use postgres::types::Type;
use postgres::{GenericClient, Row};

/// A record of a batch, as the batch function takes it.
#[derive(Debug, Clone)]
pub struct BatchRecord<'a> {
    pub source: Source<'a>,
    pub input: RecordInput<'a>,
}

/// What a record asks of the database.
#[derive(Debug, Clone)]
pub enum RecordInput<'a> {
    /// Create a booking.
    Booking(BookingFields<'a>),
    /// Cancel a booking: `booking_id` is its external id or, all digits, its row id.
    Cancellation { booking_id: &'a str, user_ref: &'a str },
    /// Store a dead letter: the record failed decoding, or the database refused it (then its
    /// booking id is known).
    Rejected {
        booking_id: Option<&'a str>,
        reason: &'a str,
        error: &'a str,
        sqlstate: Option<&'a str>,
    },
}

/// A booking event's fields, the user and room still by the references the event uses.
#[derive(Debug, Clone)]
pub struct BookingFields<'a> {
    pub booking_id: &'a str,
    pub user_ref: &'a str,
    pub room_ref: &'a str,
    pub guests: i32,
    pub start_date: NaiveDate,
    pub end_date: NaiveDate,
    /// The event's instants, when its dates were timestamps (for adopting the Go worker's rows).
    pub start_instant: Option<DateTime<Utc>>,
    pub end_instant: Option<DateTime<Utc>>,
    pub payment_id: &'a str,
}

/// How the batch function applies a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// A new booking adopts a matching row the Go worker wrote.
    pub adopt_legacy_rows: bool,
    /// The records are dead letters applied again on purpose: one already dead-lettered is applied.
    pub replaying_dead_letters: bool,
    /// At most this many parked cancellations come out of the table in one batch.
    pub parked_page: i32,
}

/// The end the database gave one record, as the batch function names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The end's name, as `crate::pipeline::End` names it.
    pub end: String,
    /// The booking's row id, for an end that names one.
    pub id: Option<i32>,
    /// A dead letter's reason, error and SQLSTATE.
    pub reason: Option<String>,
    pub error: Option<String>,
    pub sqlstate: Option<String>,
}

/// What a batch did, as the database answered.
#[derive(Debug, Default)]
pub struct AppliedBatch {
    /// One per record of the batch, in order.
    pub records: Vec<Decided>,
    /// The parked cancellations the batch took out, oldest first, each with its end.
    pub released: Vec<(ParkedCancellation, Decided)>,
    /// Bookings that may have more parked cancellations than one page released.
    pub more_parked: Vec<String>,
}

/// Applies a batch in one statement and returns every record's end. Nothing is written unless all
/// of it is.
///
/// A booking's stored record (key, payload, baggage) is sent only when it becomes a dead letter,
/// which is rare: the batch goes without them, and when the function answers that one is a dead
/// letter (a `bytes_wanted` row, having written nothing), again with them.
pub fn apply_batch<C: GenericClient>(
    conn: &mut C,
    records: &[BatchRecord<'_>],
    release: &[&str],
    options: BatchOptions,
) -> Result<AppliedBatch, DbError> {
    let applied = match apply(conn, records, release, options, Bytes::OfNoBooking)? {
        Answer::BytesWanted => match apply(conn, records, release, options, Bytes::All)? {
            Answer::BytesWanted => return Err(unexpected("the batch function asked twice for the bytes".into())),
            Answer::Applied(applied) => applied,
        },
        Answer::Applied(applied) => applied,
    };
    if applied.records.len() != records.len() {
        return Err(unexpected(format!(
            "the batch function answered for {} of {} records",
            applied.records.len(),
            records.len()
        )));
    }
    Ok(applied)
}

/// Which records' stored bytes go with the batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bytes {
    OfNoBooking,
    All,
}

/// What the batch function answered.
enum Answer {
    Applied(AppliedBatch),
    /// A booking sent without its bytes is a dead letter: nothing was written.
    BytesWanted,
}

fn apply<C: GenericClient>(
    conn: &mut C,
    records: &[BatchRecord<'_>],
    release: &[&str],
    options: BatchOptions,
    bytes: Bytes,
) -> Result<Answer, DbError> {
    let columns = BatchColumns::new(records, bytes);
    let mut params = columns.params();
    params.push((&release, Type::TEXT_ARRAY));
    params.push((&options.adopt_legacy_rows, Type::BOOL));
    params.push((&options.replaying_dead_letters, Type::BOOL));
    params.push((&options.parked_page, Type::INT4));
    let rows = query(conn, APPLY_BATCH, &params)?;
    read_answer(&rows)
}

const APPLY_BATCH: &str = "SELECT r_item AS item, r_end AS end_name, r_id AS id, r_reason AS reason,
        r_error AS error, r_sqlstate AS sqlstate, r_booking AS booking_ref, r_user AS user_ref,
        r_topic AS topic, r_partition AS kafka_partition, r_offset AS kafka_offset,
        r_key AS record_key, r_payload AS payload, r_baggage AS baggage, r_parked_at AS parked_at
   FROM booking_worker.apply_batch_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                                      $16, $17, $18, $19, $20, $21, $22, $23)";

/// The rows of the batch function, sorted by what they are.
fn read_answer(rows: &[Row]) -> Result<Answer, DbError> {
    let mut applied = AppliedBatch::default();
    for row in rows {
        match get::<&str>(row, "item")? {
            "record" => applied.records.push(decided(row)?),
            "released" => applied
                .released
                .push((ParkedCancellation::from_row(row)?, decided(row)?)),
            "more" => applied.more_parked.push(get(row, "booking_ref")?),
            "bytes_wanted" => return Ok(Answer::BytesWanted),
            other => return Err(unexpected(format!("the batch function answered a {other:?} row"))),
        }
    }
    Ok(Answer::Applied(applied))
}

fn decided(row: &Row) -> Result<Decided, DbError> {
    Ok(Decided {
        end: get(row, "end_name")?,
        id: get(row, "id")?,
        reason: get(row, "reason")?,
        error: get(row, "error")?,
        sqlstate: get(row, "sqlstate")?,
    })
}

/// An answer this worker does not understand: the function is not the one its migration made.
fn unexpected(message: String) -> DbError {
    DbError {
        class: ErrorClass::Systemic,
        sqlstate: None,
        message,
    }
}

/// The records as one array per parameter of the batch function.
#[derive(Default)]
struct BatchColumns<'a> {
    sources: SourceColumns<'a>,
    kinds: Vec<&'static str>,
    reasons: Vec<Option<&'a str>>,
    errors: Vec<Option<String>>,
    sqlstates: Vec<Option<&'a str>>,
    booking_ids: Vec<Option<&'a str>>,
    users: Vec<Option<&'a str>>,
    rooms: Vec<Option<&'a str>>,
    guests: Vec<Option<i32>>,
    starts: Vec<Option<NaiveDate>>,
    start_instants: Vec<Option<DateTime<Utc>>>,
    ends: Vec<Option<NaiveDate>>,
    end_instants: Vec<Option<DateTime<Utc>>>,
    payments: Vec<Option<&'a str>>,
}

impl<'a> BatchColumns<'a> {
    fn new(records: &'a [BatchRecord<'_>], bytes: Bytes) -> BatchColumns<'a> {
        let keep = |r: &BatchRecord<'_>| bytes == Bytes::All || !matches!(r.input, RecordInput::Booking(_));
        let mut c = BatchColumns {
            sources: SourceColumns::new(records.iter().map(|r| (&r.source, keep(r)))),
            ..BatchColumns::default()
        };
        for record in records {
            c.push(&record.input);
        }
        c
    }

    fn push(&mut self, input: &RecordInput<'a>) {
        let (kind, booking_id, user) = match input {
            RecordInput::Booking(b) => ("booking", Some(b.booking_id), Some(b.user_ref)),
            RecordInput::Cancellation { booking_id, user_ref } => ("cancellation", Some(*booking_id), Some(*user_ref)),
            RecordInput::Rejected { booking_id, .. } => ("rejected", *booking_id, None),
        };
        self.kinds.push(kind);
        self.booking_ids.push(booking_id);
        self.users.push(user);
        let rejected = match input {
            RecordInput::Rejected {
                reason,
                error,
                sqlstate,
                ..
            } => Some((*reason, text(error), *sqlstate)),
            _ => None,
        };
        self.reasons.push(rejected.as_ref().map(|r| r.0));
        self.sqlstates.push(rejected.as_ref().and_then(|r| r.2));
        self.errors.push(rejected.map(|r| r.1));
        let booking = match input {
            RecordInput::Booking(b) => Some(b),
            _ => None,
        };
        self.rooms.push(booking.map(|b| b.room_ref));
        self.guests.push(booking.map(|b| b.guests));
        self.starts.push(booking.map(|b| b.start_date));
        self.start_instants.push(booking.and_then(|b| b.start_instant));
        self.ends.push(booking.map(|b| b.end_date));
        self.end_instants.push(booking.and_then(|b| b.end_instant));
        self.payments.push(booking.map(|b| b.payment_id));
    }

    /// Parameters $1 to $19, in the order of the function's parameters.
    fn params(&self) -> Vec<Param<'_>> {
        let rest: [Param<'_>; 13] = [
            (&self.kinds, Type::TEXT_ARRAY),
            (&self.reasons, Type::TEXT_ARRAY),
            (&self.errors, Type::TEXT_ARRAY),
            (&self.sqlstates, Type::TEXT_ARRAY),
            (&self.booking_ids, Type::TEXT_ARRAY),
            (&self.users, Type::TEXT_ARRAY),
            (&self.rooms, Type::TEXT_ARRAY),
            (&self.guests, Type::INT4_ARRAY),
            (&self.starts, Type::DATE_ARRAY),
            (&self.start_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.ends, Type::DATE_ARRAY),
            (&self.end_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.payments, Type::TEXT_ARRAY),
        ];
        self.sources.params().into_iter().chain(rest).collect()
    }
}
