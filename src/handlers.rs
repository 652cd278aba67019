//! What each event does to the database: the booking handler, the cancellation handler, and the
//! expiry of parked cancellations. A whole batch is applied in one transaction, and every record in
//! it gets exactly one [`Outcome`].
//!
//! The rules (see the README's Architecture section): idempotent by booking id; only the owner
//! cancels; only Accepted becomes Cancelled; a cancellation that arrives before its booking is
//! parked and applied when the booking is created; bookings are serialized by advisory locks.

use crate::database::{DbError, ErrorClass};
use crate::models::{BookingEvent, CancellationEvent, Event, Reason, Rejection};
use crate::pipeline::{Outcome, Work};
use crate::repository::{self, BookingRow, DeadLetter, NewBooking, ParkedCancellation, Parking, Source};
use postgres::{Client, Transaction};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What a committed batch did: one outcome per record of the batch, in order, and the outcomes
/// of parked cancellations that the batch's new bookings released.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outcomes: Vec<Outcome>,
    pub released: Vec<(ParkedCancellation, Outcome)>,
    /// Bookings that may have more parked cancellations than one page released: the writer
    /// releases them in further transactions ([`release_parked`]).
    pub more_parked: Vec<String>,
}

/// A cancellation being decided: from this batch (by index) or released from the parking.
struct CancelRequest<'a> {
    booking_ref: &'a str,
    user_ref: &'a str,
    origin: Origin,
}

#[derive(Clone, Copy)]
enum Origin {
    Batch(usize),
    Released(usize),
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
) -> Result<HashSet<(String, i32, i64)>, DbError> {
    if rules.replaying_dead_letters {
        return Ok(HashSet::new());
    }
    let sources: Vec<Source<'_>> = batch.iter().map(|w| w.meta().source()).collect();
    repository::dead_lettered(conn, &sources)
}

fn apply_in_transaction(
    conn: &mut Transaction<'_>,
    batch: &[Work],
    release: &[&str],
    rules: Rules<'_>,
) -> Result<BatchResult, DbError> {
    let adopt = rules.adopt_legacy_rows;
    let booking_ids = distinct(
        batch
            .iter()
            .filter_map(Work::event)
            .map(Event::booking_id)
            .chain(release.iter().copied()),
    );
    repository::lock_booking_ids(conn, &booking_ids)?;
    let dead_letters = already_dead_lettered(conn, batch, rules)?;
    let is_dead = |w: &Work| {
        let m = w.meta();
        dead_letters.contains(&(m.tp.topic.to_string(), m.tp.partition, m.offset))
    };

    let mut outcomes: Vec<Option<Outcome>> = batch
        .iter()
        .map(|w| match w {
            _ if is_dead(w) => Some(Outcome::AlreadyDeadLettered),
            Work::Reject { rejection, .. } => Some(Outcome::DeadLettered(rejection.clone())),
            Work::Apply { .. } => None,
        })
        .collect();

    let bookings: Vec<(usize, &BookingEvent)> = batch
        .iter()
        .enumerate()
        .filter(|(_, w)| !is_dead(w))
        .filter_map(|(i, w)| match w.event() {
            Some(Event::Booking(b)) => Some((i, b)),
            _ => None,
        })
        .collect();
    let cancellations: Vec<(usize, &CancellationEvent)> = batch
        .iter()
        .enumerate()
        .filter(|(_, w)| !is_dead(w))
        .filter_map(|(i, w)| match w.event() {
            Some(Event::Cancellation(c)) => Some((i, c)),
            _ => None,
        })
        .collect();

    let user_refs = distinct(
        bookings
            .iter()
            .map(|(_, b)| b.user_id.as_str())
            .chain(cancellations.iter().map(|(_, c)| c.user_id.as_str())),
    );
    let mut users = repository::resolve_user_ids(conn, &user_refs)?;
    let rooms = repository::resolve_room_ids(conn, &distinct(bookings.iter().map(|(_, b)| b.room_id.as_str())))?;

    // Bookings: the first event of a booking id in the batch creates it, later ones are duplicates.
    let mut seen = HashSet::new();
    let mut new_bookings: Vec<(usize, NewBooking<'_>)> = Vec::new();
    for &(i, b) in &bookings {
        if !seen.insert(b.booking_id.as_str()) {
            outcomes[i] = Some(Outcome::Duplicate);
            continue;
        }
        let Some(&user_id) = users.get(&b.user_id) else {
            outcomes[i] = Some(dead(
                Reason::UnknownUser,
                format!("no user has id, email or username {:?}", b.user_id),
            ));
            continue;
        };
        let Some(&room_id) = rooms.get(&b.room_id) else {
            outcomes[i] = Some(dead(
                Reason::UnknownRoom,
                format!("no room has internal id {:?}", b.room_id),
            ));
            continue;
        };
        new_bookings.push((
            i,
            NewBooking {
                external_id: &b.booking_id,
                user_id,
                room_id,
                guests: b.guests,
                start_date: b.start_date,
                end_date: b.end_date,
                start_instant: b.start_instant,
                end_instant: b.end_instant,
                payment_id: &b.payment_id,
                cancelled: false,
            },
        ));
    }
    let adopted = if adopt {
        adopt_legacy_rows(conn, &new_bookings)?
    } else {
        HashMap::new()
    };
    // Cancellations parked for this batch's bookings are decided now, before this batch's own.
    let new_refs = distinct(
        new_bookings
            .iter()
            .map(|(_, nb)| nb.external_id)
            .chain(release.iter().copied()),
    );
    let released = repository::take_parked_cancellations(conn, &new_refs, PARKED_PAGE)?;
    let page_full = released.len() as i64 >= PARKED_PAGE;
    let missing_users = distinct(
        released
            .iter()
            .map(|p| p.user_ref.as_str())
            .filter(|u| !users.contains_key(*u)),
    );
    users.extend(repository::resolve_user_ids(conn, &missing_users)?);

    let requests: Vec<CancelRequest<'_>> = released
        .iter()
        .enumerate()
        .map(|(j, p)| CancelRequest {
            booking_ref: &p.booking_ref,
            user_ref: &p.user_ref,
            origin: Origin::Released(j),
        })
        .chain(cancellations.iter().map(|&(i, c)| CancelRequest {
            booking_ref: &c.booking_id,
            user_ref: &c.user_id,
            origin: Origin::Batch(i),
        }))
        .collect();

    // A booking that one of these cancellations will cancel is inserted as Cancelled, which saves
    // updating the row it has just written (the usual case when a backlog of cancellations ran
    // ahead of its bookings and was parked).
    let mut rows: Vec<NewBooking<'_>> = new_bookings
        .iter()
        .filter(|(_, nb)| !adopted.contains_key(nb.external_id))
        .map(|(_, nb)| nb.clone())
        .collect();
    let born_cancelled = cancelled_on_insert(&rows, &requests, &users);
    for nb in &mut rows {
        nb.cancelled = born_cancelled.contains(nb.external_id);
    }
    let (created, refused) = create_isolating(conn, &rows)?;
    // A full page may have left parked cancellations of these bookings (of any of them, as the
    // page is shared); those of bookings that exist now are released in further transactions.
    let more_parked: Vec<String> = if page_full {
        new_refs
            .iter()
            .filter(|r| !refused.contains_key(**r))
            .map(|r| r.to_string())
            .collect()
    } else {
        Vec::new()
    };
    for (i, nb) in &new_bookings {
        let x = nb.external_id;
        outcomes[*i] = Some(match (adopted.get(x), created.get(x), refused.get(x)) {
            (Some(&id), _, _) => Outcome::Adopted { id },
            (None, Some(&id), _) => Outcome::Created { id },
            (None, None, Some(e)) => Outcome::DeadLettered(Rejection::refused(e.sqlstate.as_deref(), &e.message)),
            (None, None, None) => Outcome::Duplicate,
        });
    }
    // The rows written as Cancelled, by id. The decisions below see them as the Accepted rows they
    // were a moment ago, so that every outcome is the one an insert and an update would give.
    let written_cancelled: HashSet<i32> = born_cancelled.iter().filter_map(|x| created.get(*x).copied()).collect();

    let refs: Vec<&str> = requests.iter().map(|r| r.booking_ref).collect();
    let mut rows = repository::find_bookings_for_cancel(conn, &refs)?;
    for row in &mut rows {
        if written_cancelled.contains(&row.id) {
            row.status = ACCEPTED.to_string();
        }
    }
    let mut targets = Targets::new(rows);

    let mut to_cancel = Vec::new();
    let mut parkings: Vec<(Origin, Parking<'_>)> = Vec::new();
    let mut released_outcomes: Vec<Option<Outcome>> = vec![None; released.len()];
    for request in &requests {
        let outcome = match targets.find(request.booking_ref) {
            None => {
                let source = match request.origin {
                    Origin::Batch(i) => batch[i].meta().source(),
                    Origin::Released(j) => released[j].source(),
                };
                let parked_at = match request.origin {
                    Origin::Batch(_) => None,
                    // Parked again: it keeps the time it was first parked, so it still expires.
                    Origin::Released(j) => Some(released[j].parked_at),
                };
                let parking = Parking {
                    source,
                    booking_ref: request.booking_ref,
                    user_ref: request.user_ref,
                    parked_at,
                };
                parkings.push((request.origin, parking));
                continue;
            }
            Some(row) => decide_cancel(row, users.get(request.user_ref).copied(), request, &mut to_cancel),
        };
        match request.origin {
            Origin::Batch(i) => outcomes[i] = Some(outcome),
            Origin::Released(j) => released_outcomes[j] = Some(outcome),
        }
    }
    let decided_on_insert = to_cancel.iter().filter(|id| written_cancelled.contains(id)).count();
    if decided_on_insert != written_cancelled.len() {
        // Cannot happen: every booking written as Cancelled is cancelled by a request above. Were it
        // to, the transaction is rolled back rather than committing a status nobody decided.
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
    repository::cancel_bookings(conn, &to_cancel)?;

    // A cancellation replayed after it expired into a dead letter stays a dead letter.
    let sources: Vec<Source<'_>> = parkings.iter().map(|(_, p)| p.source.clone()).collect();
    let dead_before = repository::dead_lettered(conn, &sources)?;
    let mut to_park = Vec::new();
    for (origin, parking) in parkings {
        let key = (
            parking.source.topic.to_string(),
            parking.source.partition,
            parking.source.offset,
        );
        let outcome = if dead_before.contains(&key) {
            Outcome::AlreadyDeadLettered
        } else {
            to_park.push(parking);
            Outcome::Parked
        };
        match origin {
            Origin::Batch(i) => outcomes[i] = Some(outcome),
            Origin::Released(j) => released_outcomes[j] = Some(outcome),
        }
    }
    repository::park_cancellations(conn, &to_park)?;

    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| dead(Reason::DatabaseRejected, "record was not handled")))
        .collect();
    let released: Vec<(ParkedCancellation, Outcome)> = released
        .into_iter()
        .zip(released_outcomes)
        .map(|(p, o)| {
            (
                p,
                o.unwrap_or_else(|| dead(Reason::DatabaseRejected, "record was not handled")),
            )
        })
        .collect();

    let mut letters: Vec<DeadLetter<'_>> = Vec::new();
    for (work, outcome) in batch.iter().zip(&outcomes) {
        if let Outcome::DeadLettered(r) = outcome {
            letters.push(DeadLetter {
                source: work.meta().source(),
                booking_id: work.event().map(Event::booking_id),
                reason: r.reason.as_str(),
                error: &r.error,
                sqlstate: r.sqlstate.as_deref(),
            });
        }
    }
    for (parked, outcome) in &released {
        if let Outcome::DeadLettered(r) = outcome {
            letters.push(DeadLetter {
                source: parked.source(),
                booking_id: Some(&parked.booking_ref),
                reason: r.reason.as_str(),
                error: &r.error,
                sqlstate: r.sqlstate.as_deref(),
            });
        }
    }
    repository::insert_dead_letters(conn, &letters)?;

    Ok(BatchResult {
        outcomes,
        released,
        more_parked,
    })
}

/// The distinct values, sorted: a batch names the same few users and rooms many times, and the
/// database need not see each more than once.
fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn dead(reason: Reason, error: impl Into<String>) -> Outcome {
    Outcome::DeadLettered(Rejection::new(reason, error))
}

const ACCEPTED: &str = "Accepted";
const CANCELLED: &str = "Cancelled";

/// The external ids of the new bookings that `requests`, decided in order, cancel: each is
/// decided against the booking as it is created (Accepted, owned by its user), by the same rules as
/// a booking that exists.
fn cancelled_on_insert<'a>(
    new: &[NewBooking<'a>],
    requests: &[CancelRequest<'_>],
    users: &HashMap<String, i32>,
) -> HashSet<&'a str> {
    let mut rows = Targets::new(
        new.iter()
            .enumerate()
            .map(|(i, nb)| BookingRow {
                // Not a row id yet: negative, so no all-digit reference can name it.
                id: -1 - i as i32,
                external_id: Some(nb.external_id.to_string()),
                user_id: nb.user_id,
                status: ACCEPTED.to_string(),
            })
            .collect(),
    );
    let mut cancelled = Vec::new();
    for request in requests {
        if let Some(row) = rows.find(request.booking_ref) {
            decide_cancel(row, users.get(request.user_ref).copied(), request, &mut cancelled);
        }
    }
    cancelled
        .iter()
        .filter_map(|id| new.get((-1 - id) as usize))
        .map(|nb| nb.external_id)
        .collect()
}

/// The rules of cancellation, for a booking that exists.
fn decide_cancel(
    row: &mut BookingRow,
    user_id: Option<i32>,
    request: &CancelRequest<'_>,
    to_cancel: &mut Vec<i32>,
) -> Outcome {
    let Some(user_id) = user_id else {
        return dead(
            Reason::UnknownUser,
            format!("no user has id, email or username {:?}", request.user_ref),
        );
    };
    if user_id != row.user_id {
        return dead(
            Reason::Unauthorized,
            format!(
                "user {:?} does not own booking {:?}",
                request.user_ref, request.booking_ref
            ),
        );
    }
    match row.status.as_str() {
        ACCEPTED => {
            row.status = CANCELLED.to_string();
            to_cancel.push(row.id);
            Outcome::Cancelled { id: row.id }
        }
        CANCELLED => Outcome::AlreadyCancelled { id: row.id },
        other => dead(
            Reason::NotCancellable,
            format!(
                "booking {:?} is {other}; only Accepted bookings can be cancelled",
                request.booking_ref
            ),
        ),
    }
}

/// The bookings that cancellations refer to, found by external id first and then, for all-digit
/// references, by row id. Status changes made earlier in the batch are kept here.
struct Targets {
    rows: Vec<BookingRow>,
    by_external: HashMap<String, usize>,
    by_id: HashMap<i32, usize>,
}

impl Targets {
    fn new(rows: Vec<BookingRow>) -> Targets {
        let by_external = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.external_id.clone()?, i)))
            .collect();
        let by_id = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        Targets {
            rows,
            by_external,
            by_id,
        }
    }

    fn find(&mut self, reference: &str) -> Option<&mut BookingRow> {
        let index = self.by_external.get(reference).copied().or_else(|| {
            if reference.bytes().all(|b| b.is_ascii_digit()) {
                self.by_id.get(&reference.parse::<i32>().ok()?).copied()
            } else {
                None
            }
        })?;
        self.rows.get_mut(index)
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
    use chrono::NaiveDate;

    fn booking<'a>(external_id: &'a str, user_id: i32) -> NewBooking<'a> {
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

    fn request<'a>(booking_ref: &'a str, user_ref: &'a str) -> CancelRequest<'a> {
        CancelRequest {
            booking_ref,
            user_ref,
            origin: Origin::Batch(0),
        }
    }

    fn users() -> HashMap<String, i32> {
        [("alice".to_string(), 1), ("bob".to_string(), 2)].into()
    }

    fn decided(new: &[NewBooking<'_>], requests: &[CancelRequest<'_>]) -> Vec<String> {
        let mut ids: Vec<String> = cancelled_on_insert(new, requests, &users())
            .into_iter()
            .map(str::to_string)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn only_a_booking_its_owner_cancels_is_written_as_cancelled() {
        let new = [booking("b-1", 1), booking("b-2", 2), booking("b-3", 1)];
        let requests = [
            request("b-1", "alice"),
            request("b-2", "alice"),  // not the owner
            request("b-3", "nobody"), // unknown user
            request("b-9", "alice"),  // not a booking of this batch
            request("b-1", "alice"),  // already cancelled
        ];
        assert_eq!(decided(&new, &requests), ["b-1"]);
    }

    #[test]
    fn a_refused_cancellation_does_not_stop_a_later_one_by_the_owner() {
        let new = [booking("b-1", 2)];
        assert_eq!(
            decided(&new, &[request("b-1", "alice"), request("b-1", "bob")]),
            ["b-1"]
        );
        assert!(decided(&new, &[]).is_empty());
    }

    #[test]
    fn an_all_digit_reference_never_names_a_booking_not_yet_written() {
        // The placeholder ids of unwritten rows are negative; "1" is a row id, not one of them.
        let new = [booking("b-1", 1)];
        assert!(decided(&new, &[request("1", "alice"), request("0", "alice")]).is_empty());
        let numeric = [booking("42", 1)];
        assert_eq!(decided(&numeric, &[request("42", "alice")]), ["42"]);
    }
}
