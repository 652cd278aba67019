//! What each event does to the database: the booking handler, the cancellation handler, and the
//! expiry of parked cancellations. A whole batch is applied in one statement, the batch function
//! `booking_worker.apply_batch_v2` (`sql/migrations/0005_apply_batch_v2.sql`, whose numbered steps say
//! how), and every record in it gets exactly one [`End`]. The statement is its own transaction:
//! one round trip, commit included.
//!
//! # The rules the batch function keeps
//!
//! - Two events for one booking id never race, even across worker instances: the batch takes the
//!   transaction-scoped advisory lock of each of its booking ids, in one sorted order, before it
//!   reads anything.
//! - A record already dead-lettered (same topic, partition and offset) stays a dead letter: its end
//!   is `already_dead_lettered`. Only `dead-letters replay` applies them again, on purpose.
//! - The first booking event of a booking id creates it; later ones, in the batch or redelivered,
//!   are duplicates (`ON CONFLICT (external_id) DO NOTHING`). A booking of an unknown user or room
//!   is dead-lettered.
//! - Cancellation: only the owner cancels, only Accepted becomes Cancelled, every change sets
//!   `updated_at`, and a reference is an external id or, when all digits, a row id (the external
//!   id wins). Cancellations are decided in order, each against the booking as the ones before it
//!   left it.
//!
//! Record isolation: a record the database refuses for its own values (SQLSTATE class 22 or 23,
//! see `crate::database`) fails the whole statement, so nothing of the batch is written; the
//! writer then applies the batch's records one by one, and the refused one is dead-lettered alone
//! as `database_rejected`, with the server's message and SQLSTATE, once the circuit breaker allows.
//!
//! # Adopting the Go worker's rows
//!
//! A booking event whose external id matches no row adopts a row with no external id and the same
//! user, room, number of guests and payment id, whose dates are each either the day written in the
//! event or the day the server's `TimeZone` gives the event's timestamp. (The Go worker bound the
//! timestamp itself to the `DATE` column, so the server's time zone picked the day:
//! `2025-01-15T23:30:00-05:00` is the 16th on a server in UTC.) The worker sets that row's
//! `external_id` and changes nothing else: status, dates, `created_at` and `updated_at` stay. Of
//! several matching rows, the lowest id not yet adopted is taken; two events that match one row
//! adopt it once, and the second is inserted. The partial index `bookings_legacy_match_idx` keeps
//! the look-up cheap, and the worker's own rows, which always carry an external id, never enter it.
//! `ADOPT_LEGACY_ROWS=false` turns adoption off.
//!
//! # Parked cancellations
//!
//! A cancellation whose booking does not exist yet is parked (see `crate::repository`) and applied
//! in the batch that creates the booking, before that batch's own cancellations. What later
//! becomes of a parked cancellation (applied, expired, unauthorized) is logged with an `outcome`
//! field. Parked cancellations older than `PENDING_CANCELLATION_TTL_SECS` expire into dead letters
//! as `cancellation_expired`, checked every `PENDING_CHECK_INTERVAL_SECS` by the `housekeeping`
//! thread.

use crate::database::{DbError, ErrorClass};
use crate::models::{Event, Reason, Rejection};
use crate::pipeline::{End, RecordMeta, Work};
use crate::repository::{
    self, AppliedBatch, BatchOptions, BatchRecord, BookingFields, DeadLetter, Decided, ParkedCancellation, RecordInput,
    Source,
};
use postgres::Client;
use std::time::Duration;

/// What a committed batch did: one outcome per record of the batch, in order, and the outcomes
/// of parked cancellations that the batch's new bookings released.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outcomes: Vec<End>,
    pub released: Vec<(ParkedCancellation, End)>,
    /// Bookings that may have more parked cancellations than one page released: the writer
    /// releases them in further batches ([`release_parked`]).
    pub more_parked: Vec<String>,
}

/// How a batch is applied.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Whether a new booking adopts a matching row the Go worker wrote (`ADOPT_LEGACY_ROWS`).
    pub adopt_legacy_rows: bool,
    /// `dead-letters replay`: the records are dead letters, applied again on purpose. Otherwise a
    /// record already dead-lettered (same topic, partition and offset) stays a dead letter.
    pub replaying_dead_letters: bool,
}

impl Rules {
    fn options(self) -> BatchOptions {
        BatchOptions {
            adopt_legacy_rows: self.adopt_legacy_rows,
            replaying_dead_letters: self.replaying_dead_letters,
            parked_page: PARKED_PAGE as i32,
        }
    }
}

/// Applies a batch in one statement: nothing is written unless all of it is.
pub fn apply_batch(conn: &mut Client, batch: &[Work], rules: Rules) -> Result<BatchResult, DbError> {
    let records: Vec<BatchRecord<'_>> = batch.iter().map(batch_record).collect();
    let applied = repository::apply_batch(conn, &records, &[], rules.options())?;
    result_of(applied)
}

/// Stores a record as a dead letter, in one statement: `work` as it was consumed (its booking id
/// goes with the dead letter), `rejected` the [`Work::Reject`] that says why.
pub fn store_dead_letter(
    conn: &mut Client,
    work: &Work,
    rejected: &Work,
    rules: Rules,
) -> Result<BatchResult, DbError> {
    let mut record = batch_record(rejected);
    if let RecordInput::Rejected { booking_id, .. } = &mut record.input {
        *booking_id = work.event().map(Event::booking_id);
    }
    let applied = repository::apply_batch(conn, &[record], &[], rules.options())?;
    result_of(applied)
}

/// Releases the next page of parked cancellations of bookings that exist, in one statement.
pub fn release_parked(conn: &mut Client, booking_refs: &[&str], rules: Rules) -> Result<BatchResult, DbError> {
    let applied = repository::apply_batch(conn, &[], booking_refs, rules.options())?;
    result_of(applied)
}

/// A record as the batch function takes it: what its event asks, or why it is a dead letter.
fn batch_record(work: &Work) -> BatchRecord<'_> {
    let input = match work {
        Work::Reject { rejection, .. } => RecordInput::Rejected {
            booking_id: None,
            reason: rejection.reason.as_str(),
            error: &rejection.error,
            sqlstate: rejection.sqlstate.as_deref(),
        },
        Work::Apply {
            event: Event::Booking(b),
            ..
        } => RecordInput::Booking(BookingFields {
            booking_id: &b.booking_id,
            user_ref: &b.user_id,
            room_ref: &b.room_id,
            guests: b.guests,
            start_date: b.start_date,
            end_date: b.end_date,
            start_instant: b.start_instant,
            end_instant: b.end_instant,
            payment_id: &b.payment_id,
        }),
        Work::Apply {
            event: Event::Cancellation(c),
            ..
        } => RecordInput::Cancellation {
            booking_id: &c.booking_id,
            user_ref: &c.user_id,
        },
    };
    BatchRecord {
        source: source_of(work.meta()),
        input,
    }
}

/// A consumed record as the dead letters and the parking store it.
fn source_of(meta: &RecordMeta) -> Source<'_> {
    Source {
        topic: &meta.tp.topic,
        partition: meta.tp.partition,
        offset: meta.offset,
        key: meta.key.as_deref(),
        payload: &meta.payload,
        baggage: meta.baggage.as_deref(),
    }
}

fn result_of(applied: AppliedBatch) -> Result<BatchResult, DbError> {
    let outcomes = applied.records.into_iter().map(end_of).collect::<Result<_, _>>()?;
    let released = applied
        .released
        .into_iter()
        .map(|(parked, decided)| Ok((parked, end_of(decided)?)))
        .collect::<Result<_, DbError>>()?;
    Ok(BatchResult {
        outcomes,
        released,
        more_parked: applied.more_parked,
    })
}

/// The [`End`] the batch function named. A name or reason this worker does not know means the
/// function is not the one its migration made: a systemic error.
fn end_of(decided: Decided) -> Result<End, DbError> {
    let id = || {
        decided
            .id
            .ok_or_else(|| unexpected(format!("the end {:?} came without a booking id", decided.end)))
    };
    Ok(match decided.end.as_str() {
        "created" => End::Created { id: id()? },
        "adopted" => End::Adopted { id: id()? },
        "duplicate" => End::Duplicate,
        "cancelled" => End::Cancelled { id: id()? },
        "already_cancelled" => End::AlreadyCancelled { id: id()? },
        "parked" => End::Parked,
        "already_dead_lettered" => End::AlreadyDeadLettered,
        "dead_lettered" => {
            let code = decided.reason.as_deref().unwrap_or_default();
            let reason = Reason::parse(code).ok_or_else(|| unexpected(format!("unknown reason {code:?}")))?;
            End::DeadLettered(Rejection {
                reason,
                error: decided.error.unwrap_or_default(),
                sqlstate: decided.sqlstate,
            })
        }
        other => return Err(unexpected(format!("unknown end {other:?}"))),
    })
}

fn unexpected(message: String) -> DbError {
    DbError {
        class: ErrorClass::Systemic,
        sqlstate: None,
        message: format!("the batch function answered what this worker does not know: {message}"),
    }
}

/// How many parked cancellations one transaction takes out of the table, at most: when they are
/// released by their booking, and when they expire. A booking with more gets them in further
/// transactions, so memory stays bounded whatever piles up for one booking id.
pub const PARKED_PAGE: i64 = 500;

/// Dead-letters parked cancellations older than `ttl` as `cancellation_expired`, a page per
/// transaction, under the same advisory locks as the writers; `expired` sees each committed page.
/// Returns how many expired.
pub fn expire_parked(
    conn: &mut Client,
    ttl: Duration,
    expired: &mut dyn FnMut(&[ParkedCancellation]),
) -> Result<usize, DbError> {
    let mut total = 0;
    loop {
        let mut tx = conn.transaction()?;
        let refs = repository::expired_parked_refs(&mut tx, ttl, PARKED_PAGE)?;
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        repository::lock_booking_ids(&mut tx, &refs)?;
        let batch = repository::take_expired_parked(&mut tx, &refs, ttl, PARKED_PAGE)?;
        let error = format!("no booking arrived within {} s", ttl.as_secs());
        let letters: Vec<DeadLetter<'_>> = batch
            .iter()
            .map(|p| DeadLetter {
                source: p.source(),
                booking_id: Some(&p.booking_ref),
                reason: Reason::CancellationExpired.as_str(),
                error: &error,
                sqlstate: None,
            })
            .collect();
        repository::insert_dead_letters(&mut tx, &letters)?;
        tx.commit()?;
        expired(&batch);
        total += batch.len();
        if (batch.len() as i64) < PARKED_PAGE {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(end: &str, id: Option<i32>, reason: Option<&str>) -> Decided {
        Decided {
            end: end.to_string(),
            id,
            reason: reason.map(str::to_string),
            error: reason.map(|_| "why".to_string()),
            sqlstate: None,
        }
    }

    #[test]
    fn every_end_the_batch_function_names_is_an_end_of_the_worker() {
        for name in End::NAMES {
            let reason = (name == "dead_lettered").then_some("unknown_user");
            let end = end_of(decided(name, Some(7), reason)).expect(name);
            assert_eq!(end.as_str(), name);
        }
        let dead = end_of(decided("dead_lettered", None, Some("not_cancellable"))).unwrap();
        assert_eq!(dead, End::DeadLettered(Rejection::new(Reason::NotCancellable, "why")));
    }

    #[test]
    fn an_answer_the_worker_does_not_know_is_a_systemic_error() {
        for bad in [
            decided("exploded", Some(1), None),
            decided("created", None, None),
            decided("dead_lettered", None, Some("no_such_reason")),
        ] {
            let error = end_of(bad).expect_err("refused");
            assert!(error.is(ErrorClass::Systemic), "{error}");
        }
    }
}
