//! What each event does to the database: the booking handler, the cancellation handler, and the
//! expiry of parked cancellations. A whole batch is applied in one transaction, and every record in
//! it gets exactly one [`End`].
//!
//! # The batch transaction, step by step
//!
//! 1. `pg_advisory_xact_lock(hashtextextended(booking_id, 0))` for every booking id of the batch, in
//!    sorted order, so two events for one booking never race, even across worker instances.
//! 2. Records already dead-lettered (same topic, partition and offset) stay dead letters: their end
//!    is `already_dead_lettered`. Only `dead-letters replay` applies them, on purpose.
//! 3. Users and rooms are resolved in bulk.
//! 4. Bookings whose external id matches no row adopt the Go worker's matching row (below).
//! 5. A page of the parked cancellations of the batch's bookings is taken out.
//! 6. Bookings are inserted `ON CONFLICT (external_id) DO NOTHING`. A booking that one of those
//!    cancellations, or one in the batch, cancels (by the rules of `cancel`, against the booking as
//!    it is created) is inserted as Cancelled instead of inserted and updated; the outcomes and logs
//!    are the same.
//! 7. Cancellations are applied, parked, or dead-lettered.
//! 8. The circuit breaker looks at the batch's refusals; then the writer commits.
//!
//! Record isolation: the booking rows are inserted under a savepoint. When the server refuses them
//! with a record-class SQLSTATE (see `crate::database`), they are inserted again one by one, each
//! under its own savepoint: a refused row is rolled back alone and its record dead-lettered as
//! `database_rejected`, with the server's message and SQLSTATE, in the transaction that applies the
//! rest of the batch.
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
//! in the transaction that creates the booking. What later becomes of a parked cancellation
//! (applied, expired, unauthorized) is logged with an `outcome` field. Parked cancellations older
//! than `PENDING_CANCELLATION_TTL_SECS` expire into dead letters as `cancellation_expired`, checked
//! every `PENDING_CHECK_INTERVAL_SECS` by the `housekeeping` thread.

mod cancel;
mod plan;

use crate::database::{DbError, ErrorClass};
use crate::models::{Event, Reason};
use crate::pipeline::{End, RecordMeta, Work};
use crate::repository::{self, DeadLetter, NewBooking, ParkedCancellation, Parking, Source};
use cancel::{decide_cancel, BookingsByReference, CancelAt, CancelRequest, ACCEPTED};
use plan::{distinct, LogPosition, Plan};
use postgres::{Client, Transaction};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What a committed batch did: one outcome per record of the batch, in order, and the outcomes
/// of parked cancellations that the batch's new bookings released.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outcomes: Vec<End>,
    pub released: Vec<(ParkedCancellation, End)>,
    /// Bookings that may have more parked cancellations than one page released: the writer
    /// releases them in further transactions ([`release_parked`]).
    pub more_parked: Vec<String>,
}

/// A last look at a batch's outcomes before its transaction commits; an error rolls it back.
pub type BeforeCommit<'a> = &'a dyn Fn(&BatchResult) -> Result<(), DbError>;

/// How a batch is applied.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// Whether a new booking adopts a matching row the Go worker wrote (`ADOPT_LEGACY_ROWS`).
    pub adopt_legacy_rows: bool,
    /// `dead-letters replay`: the records are dead letters, applied again on purpose. Otherwise a
    /// record already dead-lettered (same topic, partition and offset) stays a dead letter.
    pub replaying_dead_letters: bool,
    /// The last look before the commit.
    pub before_commit: BeforeCommit<'a>,
}

/// Applies a batch in one transaction. Nothing is written unless all of it is, and nothing is
/// committed that `rules.before_commit` refuses (the writer's circuit breaker looks there).
pub fn apply_batch(conn: &mut Client, batch: &[Work], rules: Rules<'_>) -> Result<BatchResult, DbError> {
    apply(conn, batch, &[], rules)
}

/// Releases the next page of parked cancellations of bookings that exist, in one transaction.
pub fn release_parked(conn: &mut Client, booking_refs: &[&str], rules: Rules<'_>) -> Result<BatchResult, DbError> {
    apply(conn, &[], booking_refs, rules)
}

fn apply(conn: &mut Client, batch: &[Work], release: &[&str], rules: Rules<'_>) -> Result<BatchResult, DbError> {
    let mut tx = conn.transaction()?;
    let result = apply_in_transaction(&mut tx, batch, release, rules)?;
    let before_commit = rules.before_commit;
    before_commit(&result)?;
    tx.commit()?;
    Ok(result)
}

/// Ids of created bookings and refusals of the others, both by external id.
type CreatedAndRefused = (HashMap<String, i32>, HashMap<String, DbError>);

/// Creates the bookings; a row the database refuses for its own values (SQLSTATE class 22 or 23:
/// too long, a foreign key gone) is set apart under a savepoint, so that the rest of the batch
/// still applies.
fn create_isolating(tx: &mut Transaction<'_>, rows: &[NewBooking<'_>]) -> Result<CreatedAndRefused, DbError> {
    let mut refused = HashMap::new();
    let mut all = tx.savepoint("create_bookings")?;
    match repository::create_bookings(&mut all, rows) {
        Ok(created) => {
            all.commit()?;
            return Ok((created, refused));
        }
        Err(e) if e.is(ErrorClass::Record) && rows.len() > 1 => all.rollback()?,
        Err(e) if e.is(ErrorClass::Record) => {
            all.rollback()?;
            refused.insert(rows[0].external_id.to_string(), e);
            return Ok((HashMap::new(), refused));
        }
        Err(e) => return Err(e),
    }
    let mut created = HashMap::new();
    for row in rows {
        let mut one = tx.savepoint("create_booking")?;
        match repository::create_bookings(&mut one, std::slice::from_ref(row)) {
            Ok(ids) => {
                one.commit()?;
                created.extend(ids);
            }
            Err(e) if e.is(ErrorClass::Record) => {
                one.rollback()?;
                refused.insert(row.external_id.to_string(), e);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((created, refused))
}

/// The rows the Go worker wrote that these bookings adopt: each booking takes the lowest
/// matching id that no booking before it took.
fn choose_adoptions<'a>(rows: &[NewBooking<'a>], matches: &HashMap<usize, Vec<i32>>) -> Vec<(i32, &'a str)> {
    let mut taken = HashSet::new();
    let mut adoptions = Vec::new();
    for (k, nb) in rows.iter().enumerate() {
        let free = matches
            .get(&k)
            .and_then(|ids| ids.iter().find(|id| !taken.contains(*id)));
        if let Some(&id) = free {
            taken.insert(id);
            adoptions.push((id, nb.external_id));
        }
    }
    adoptions
}

/// Adopts the Go worker's rows for the new bookings that match one; returns the row id of each
/// booking adopted, by external id. A row that another transaction adopted first (a booking of
/// another writer or instance with the same details) is looked for again among the others.
fn adopt_legacy_rows(
    conn: &mut Transaction<'_>,
    new_bookings: &[(usize, NewBooking<'_>)],
) -> Result<HashMap<String, i32>, DbError> {
    let mut pending: Vec<NewBooking<'_>> = new_bookings.iter().map(|(_, nb)| nb.clone()).collect();
    let mut adopted = HashMap::new();
    for _ in 0..ADOPTION_ROUNDS {
        let matches = repository::find_legacy_matches(conn, &pending)?;
        let chosen = choose_adoptions(&pending, &matches);
        if chosen.is_empty() {
            break;
        }
        let got = repository::adopt_bookings(conn, &chosen)?;
        let raced = got.len() < chosen.len();
        adopted.extend(got);
        if !raced {
            break;
        }
        pending.retain(|nb| !adopted.contains_key(nb.external_id));
    }
    Ok(adopted)
}

/// How often adoption looks again after another transaction took a matching row first.
const ADOPTION_ROUNDS: usize = 3;

/// The records of the batch that are dead letters already (a replay of the log): they stay so.
fn already_dead_lettered(
    conn: &mut Transaction<'_>,
    batch: &[Work],
    rules: Rules<'_>,
) -> Result<HashSet<LogPosition>, DbError> {
    if rules.replaying_dead_letters {
        return Ok(HashSet::new());
    }
    let sources: Vec<Source<'_>> = batch.iter().map(|w| source_of(w.meta())).collect();
    repository::dead_lettered(conn, &sources)
}

/// The batch transaction, as its steps: each reads and fills in the [`Plan`].
fn apply_in_transaction<'a>(
    tx: &mut Transaction<'_>,
    batch: &'a [Work],
    release: &[&'a str],
    rules: Rules<'_>,
) -> Result<BatchResult, DbError> {
    repository::lock_booking_ids(tx, &booking_ids(batch, release))?;
    let mut plan = Plan::new(batch, &already_dead_lettered(tx, batch, rules)?);
    plan.users = repository::resolve_user_ids(tx, &plan.user_refs())?;
    plan.rooms = repository::resolve_room_ids(tx, &plan.room_refs())?;
    plan.choose_new_bookings();
    if rules.adopt_legacy_rows {
        plan.adopted = adopt_legacy_rows(tx, &plan.new_bookings)?;
    }
    // Cancellations parked for this batch's bookings are decided now, before this batch's own.
    let releasing = plan.releasing(release);
    let released = take_released(tx, &mut plan, &releasing)?;
    let requests = plan.cancel_requests(&released);
    let (written_cancelled, refused) = create_bookings(tx, &mut plan, &requests)?;
    // A full page may have left parked cancellations of these bookings (of any of them, as the
    // page is shared); those of bookings that exist now are released in further transactions.
    let more_parked = if released.len() as i64 >= PARKED_PAGE {
        releasing
            .iter()
            .filter(|r| !refused.contains(**r))
            .map(|r| r.to_string())
            .collect()
    } else {
        Vec::new()
    };
    let parkings = cancel(tx, &mut plan, batch, &requests, &released, &written_cancelled)?;
    park(tx, &mut plan, parkings)?;
    finish(tx, plan, batch, released, more_parked)
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

/// The booking ids the batch touches, each once, for their advisory locks.
fn booking_ids<'a>(batch: &'a [Work], release: &[&'a str]) -> Vec<&'a str> {
    let events = batch.iter().filter_map(Work::event).map(Event::booking_id);
    distinct(events.chain(release.iter().copied()))
}

/// Takes the next page of parked cancellations of `releasing` out of the table, looks up the users
/// they name that the batch did not, and gives the plan a place for each one's outcome.
fn take_released(
    tx: &mut Transaction<'_>,
    plan: &mut Plan<'_>,
    releasing: &[&str],
) -> Result<Vec<ParkedCancellation>, DbError> {
    let released = repository::take_parked_cancellations(tx, releasing, PARKED_PAGE)?;
    let missing_users = distinct(
        released
            .iter()
            .map(|p| p.user_ref.as_str())
            .filter(|u| !plan.users.contains_key(*u)),
    );
    let found = repository::resolve_user_ids(tx, &missing_users)?;
    plan.users.extend(found);
    plan.released_outcomes = vec![None; released.len()];
    Ok(released)
}

/// Inserts the new bookings that adopted no row. Returns the ids of the rows written as
/// Cancelled, and the external ids the database refused.
fn create_bookings(
    tx: &mut Transaction<'_>,
    plan: &mut Plan<'_>,
    requests: &[CancelRequest<'_>],
) -> Result<(HashSet<i32>, HashSet<String>), DbError> {
    let rows = plan.rows_to_insert(requests);
    let (created, refused) = create_isolating(tx, &rows)?;
    plan.record_creations(&created, &refused);
    let written_cancelled = rows
        .iter()
        .filter(|nb| nb.cancelled)
        .filter_map(|nb| created.get(nb.external_id).copied())
        .collect();
    Ok((written_cancelled, refused.into_keys().collect()))
}

/// Decides every cancellation against the booking it names and cancels those it may. Returns
/// those whose booking does not exist yet, to park. The rows written as Cancelled a moment ago
/// are seen as the Accepted rows they were, so that every outcome is the one an insert and an
/// update would give.
fn cancel<'r>(
    tx: &mut Transaction<'_>,
    plan: &mut Plan<'_>,
    batch: &'r [Work],
    requests: &[CancelRequest<'r>],
    released: &'r [ParkedCancellation],
    written_cancelled: &HashSet<i32>,
) -> Result<Vec<(CancelAt, Parking<'r>)>, DbError> {
    let refs: Vec<&str> = requests.iter().map(|r| r.booking_ref).collect();
    let mut rows = repository::find_bookings_for_cancel(tx, &refs)?;
    for row in rows.iter_mut().filter(|row| written_cancelled.contains(&row.id)) {
        row.status = ACCEPTED.to_string();
    }
    let mut targets = BookingsByReference::new(rows);
    let mut to_cancel = Vec::new();
    let mut parkings = Vec::new();
    for request in requests {
        let Some(row) = targets.find(request.booking_ref) else {
            parkings.push((request.at, parking(request, batch, released)));
            continue;
        };
        let outcome = decide_cancel(row, plan.users.get(request.user_ref).copied(), request, &mut to_cancel);
        plan.set(request.at, outcome);
    }
    let decided_on_insert = to_cancel.iter().filter(|id| written_cancelled.contains(id)).count();
    if decided_on_insert != written_cancelled.len() {
        // Every booking written as Cancelled is cancelled by a request above. Were one not, the
        // transaction is rolled back rather than committing a status nobody decided.
        return Err(DbError {
            class: ErrorClass::Record,
            sqlstate: None,
            message: format!(
                "{} bookings were written as Cancelled but only {decided_on_insert} were cancelled",
                written_cancelled.len()
            ),
        });
    }
    to_cancel.retain(|id| !written_cancelled.contains(id));
    repository::cancel_bookings(tx, &to_cancel)?;
    Ok(parkings)
}

/// A cancellation to park, from the record it came in.
fn parking<'r>(request: &CancelRequest<'r>, batch: &'r [Work], released: &'r [ParkedCancellation]) -> Parking<'r> {
    let (source, parked_at) = match request.at {
        CancelAt::Batch(i) => (source_of(batch[i].meta()), None),
        // Parked again: it keeps the time it was first parked, so it still expires.
        CancelAt::Released(j) => (released[j].source(), Some(released[j].parked_at)),
    };
    Parking {
        source,
        booking_ref: request.booking_ref,
        user_ref: request.user_ref,
        parked_at,
    }
}

/// Parks the cancellations whose booking does not exist yet. One replayed after it expired into
/// a dead letter stays a dead letter.
fn park(tx: &mut Transaction<'_>, plan: &mut Plan<'_>, parkings: Vec<(CancelAt, Parking<'_>)>) -> Result<(), DbError> {
    let sources: Vec<Source<'_>> = parkings.iter().map(|(_, p)| p.source.clone()).collect();
    let dead_before = repository::dead_lettered(tx, &sources)?;
    let mut to_park = Vec::new();
    for (at, parking) in parkings {
        let s = &parking.source;
        let position = (s.topic.to_string(), s.partition, s.offset);
        if dead_before.contains(&position) {
            plan.set(at, End::AlreadyDeadLettered);
        } else {
            to_park.push(parking);
            plan.set(at, End::Parked);
        }
    }
    repository::park_cancellations(tx, &to_park)
}

/// Stores the dead letters of the batch and of the released cancellations, and returns what the
/// batch did.
fn finish(
    tx: &mut Transaction<'_>,
    plan: Plan<'_>,
    batch: &[Work],
    released: Vec<ParkedCancellation>,
    more_parked: Vec<String>,
) -> Result<BatchResult, DbError> {
    let outcomes = Plan::decided(plan.outcomes);
    let released: Vec<(ParkedCancellation, End)> = released
        .into_iter()
        .zip(Plan::decided(plan.released_outcomes))
        .collect();
    {
        let of_batch = batch
            .iter()
            .zip(&outcomes)
            .map(|(w, o)| (source_of(w.meta()), w.event().map(Event::booking_id), o));
        let of_released = released
            .iter()
            .map(|(p, o)| (p.source(), Some(p.booking_ref.as_str()), o));
        let letters: Vec<DeadLetter<'_>> = of_batch
            .chain(of_released)
            .filter_map(|(source, booking_id, outcome)| match outcome {
                End::DeadLettered(r) => Some(DeadLetter {
                    source,
                    booking_id,
                    reason: r.reason.as_str(),
                    error: &r.error,
                    sqlstate: r.sqlstate.as_deref(),
                }),
                _ => None,
            })
            .collect();
        repository::insert_dead_letters(tx, &letters)?;
    }
    Ok(BatchResult {
        outcomes,
        released,
        more_parked,
    })
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
    use chrono::NaiveDate;

    pub(super) fn booking<'a>(external_id: &'a str, user_id: i32) -> NewBooking<'a> {
        let day = |d| NaiveDate::from_ymd_opt(2026, 3, d).unwrap();
        NewBooking {
            external_id,
            user_id,
            room_id: 1,
            guests: 2,
            start_date: day(1),
            end_date: day(4),
            start_instant: None,
            end_instant: None,
            payment_id: "pay",
            cancelled: false,
        }
    }

    #[test]
    fn each_booking_adopts_the_lowest_legacy_row_no_booking_before_it_took() {
        let rows = [booking("a", 1), booking("b", 1), booking("c", 1), booking("d", 1)];
        let matches: HashMap<usize, Vec<i32>> = [(0, vec![7, 9]), (1, vec![7, 9]), (2, vec![7]), (3, vec![3])].into();
        assert_eq!(choose_adoptions(&rows, &matches), [(7, "a"), (9, "b"), (3, "d")]);
        assert!(choose_adoptions(&rows, &HashMap::new()).is_empty());
    }
}
