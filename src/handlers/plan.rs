//! A batch being applied, as plain data: which records are bookings and cancellations, what each
//! has come to so far, and which bookings are new. The steps of the batch transaction read and
//! fill it in; the decisions that need no database are made here.

use super::cancel::{cancelled_on_insert, dead, CancelAt, CancelRequest};
use crate::database::DbError;
use crate::models::{BookingEvent, CancellationEvent, Event, Reason, Rejection};
use crate::pipeline::{End, Work};
use crate::repository::{NewBooking, ParkedCancellation};
use std::collections::{HashMap, HashSet};

/// A record's place in the log: topic, partition and offset.
pub(super) type LogPosition = (String, i32, i64);

/// The batch as the transaction decides it.
pub(super) struct Plan<'a> {
    /// The outcome of each record of the batch, once decided.
    pub outcomes: Vec<Option<End>>,
    /// The outcome of each released parked cancellation, once decided.
    pub released_outcomes: Vec<Option<End>>,
    /// The batch's booking events to decide, with their index in the batch.
    pub bookings: Vec<(usize, &'a BookingEvent)>,
    /// The batch's cancellation events to decide, with their index in the batch.
    pub cancellations: Vec<(usize, &'a CancellationEvent)>,
    /// Users and rooms by the reference the events use; a missing one does not exist.
    pub users: HashMap<String, i32>,
    pub rooms: HashMap<String, i32>,
    /// The first event of each booking id whose user and room exist, with its index.
    pub new_bookings: Vec<(usize, NewBooking<'a>)>,
    /// Rows of the Go worker that new bookings adopted, by external id.
    pub adopted: HashMap<String, i32>,
}

impl<'a> Plan<'a> {
    /// Sorts the batch: a record already dead-lettered stays so, a record that failed decoding
    /// becomes a dead letter, and the rest are bookings and cancellations to decide.
    pub fn new(batch: &'a [Work], dead_letters: &HashSet<LogPosition>) -> Plan<'a> {
        let mut plan = Plan {
            outcomes: Vec::with_capacity(batch.len()),
            released_outcomes: Vec::new(),
            bookings: Vec::new(),
            cancellations: Vec::new(),
            users: HashMap::new(),
            rooms: HashMap::new(),
            new_bookings: Vec::new(),
            adopted: HashMap::new(),
        };
        for (i, work) in batch.iter().enumerate() {
            let m = work.meta();
            let outcome = match work {
                _ if dead_letters.contains(&(m.tp.topic.to_string(), m.tp.partition, m.offset)) => {
                    Some(End::AlreadyDeadLettered)
                }
                Work::Reject { rejection, .. } => Some(End::DeadLettered(rejection.clone())),
                Work::Apply {
                    event: Event::Booking(b),
                    ..
                } => {
                    plan.bookings.push((i, b));
                    None
                }
                Work::Apply {
                    event: Event::Cancellation(c),
                    ..
                } => {
                    plan.cancellations.push((i, c));
                    None
                }
            };
            plan.outcomes.push(outcome);
        }
        plan
    }

    /// Records the outcome of a cancellation, by where it came from.
    pub fn set(&mut self, at: CancelAt, outcome: End) {
        match at {
            CancelAt::Batch(i) => self.outcomes[i] = Some(outcome),
            CancelAt::Released(j) => self.released_outcomes[j] = Some(outcome),
        }
    }

    /// The users the events name, each once.
    pub fn user_refs(&self) -> Vec<&'a str> {
        let bookings = self.bookings.iter().map(|(_, b)| b.user_id.as_str());
        distinct(bookings.chain(self.cancellations.iter().map(|(_, c)| c.user_id.as_str())))
    }

    /// The rooms the bookings name, each once.
    pub fn room_refs(&self) -> Vec<&'a str> {
        distinct(self.bookings.iter().map(|(_, b)| b.room_id.as_str()))
    }

    /// The first event of a booking id in the batch creates it, later ones are duplicates; a
    /// booking of a user or room that does not exist is dead-lettered.
    pub fn choose_new_bookings(&mut self) {
        let mut seen = HashSet::new();
        for &(i, b) in &self.bookings {
            if !seen.insert(b.booking_id.as_str()) {
                self.outcomes[i] = Some(End::Duplicate);
                continue;
            }
            let Some(&user_id) = self.users.get(&b.user_id) else {
                let error = format!("no user has id, email or username {:?}", b.user_id);
                self.outcomes[i] = Some(dead(Reason::UnknownUser, error));
                continue;
            };
            let Some(&room_id) = self.rooms.get(&b.room_id) else {
                let error = format!("no room has internal id {:?}", b.room_id);
                self.outcomes[i] = Some(dead(Reason::UnknownRoom, error));
                continue;
            };
            self.new_bookings.push((i, new_booking(b, user_id, room_id)));
        }
    }

    /// The booking ids whose parked cancellations this batch releases: those of its new bookings
    /// and those it was asked to release.
    pub fn releasing(&self, release: &[&'a str]) -> Vec<&'a str> {
        distinct(
            self.new_bookings
                .iter()
                .map(|(_, nb)| nb.external_id)
                .chain(release.iter().copied()),
        )
    }

    /// The cancellations to decide, in order: the released parked ones first (they came earlier),
    /// then the batch's own.
    pub fn cancel_requests<'r>(&self, released: &'r [ParkedCancellation]) -> Vec<CancelRequest<'r>>
    where
        'a: 'r,
    {
        let parked = released.iter().enumerate().map(|(j, p)| CancelRequest {
            booking_ref: &p.booking_ref,
            user_ref: &p.user_ref,
            at: CancelAt::Released(j),
        });
        let own = self.cancellations.iter().map(|&(i, c)| CancelRequest {
            booking_ref: &c.booking_id,
            user_ref: &c.user_id,
            at: CancelAt::Batch(i),
        });
        parked.chain(own).collect()
    }

    /// The rows to insert: the new bookings that adopted no row. One that a request cancels is
    /// written as Cancelled, which saves updating the row just written (the usual case when a
    /// backlog of cancellations ran ahead of its bookings and was parked).
    pub fn rows_to_insert(&self, requests: &[CancelRequest<'_>]) -> Vec<NewBooking<'a>> {
        let mut rows: Vec<NewBooking<'a>> = self
            .new_bookings
            .iter()
            .filter(|(_, nb)| !self.adopted.contains_key(nb.external_id))
            .map(|(_, nb)| nb.clone())
            .collect();
        let born_cancelled = cancelled_on_insert(&rows, requests, &self.users);
        for nb in &mut rows {
            nb.cancelled = born_cancelled.contains(nb.external_id);
        }
        rows
    }

    /// Each new booking's outcome, from the rows adopted, created and refused (by external id).
    pub fn record_creations(&mut self, created: &HashMap<String, i32>, refused: &HashMap<String, DbError>) {
        for (i, nb) in &self.new_bookings {
            let x = nb.external_id;
            self.outcomes[*i] = Some(match (self.adopted.get(x), created.get(x), refused.get(x)) {
                (Some(&id), _, _) => End::Adopted { id },
                (None, Some(&id), _) => End::Created { id },
                (None, None, Some(e)) => End::DeadLettered(Rejection::refused(e.sqlstate.as_deref(), &e.message)),
                (None, None, None) => End::Duplicate,
            });
        }
    }

    /// The outcomes, every one decided: one that is not would be a defect, and is dead-lettered
    /// rather than lost.
    pub fn decided(outcomes: Vec<Option<End>>) -> Vec<End> {
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| dead(Reason::DatabaseRejected, "record was not handled")))
            .collect()
    }
}

fn new_booking(b: &BookingEvent, user_id: i32, room_id: i32) -> NewBooking<'_> {
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
    }
}

/// The distinct values, sorted: a batch names the same few users and rooms many times, and the
/// database need not see each more than once.
pub(super) fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::EventKind;
    use crate::offsets::TopicPartition;
    use crate::pipeline::RecordMeta;

    /// A batch from one line per record: `booking ID USER ROOM`, `cancel ID USER`, `garbage`,
    /// or `dead ...` for a record already dead-lettered.
    fn batch(spec: &str) -> (Vec<Work>, HashSet<LogPosition>) {
        let mut works = Vec::new();
        let mut dead_letters = HashSet::new();
        for (offset, line) in spec.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
            let offset = offset as i64;
            let line = line.strip_prefix("dead ").map_or(line, |rest| {
                dead_letters.insert(("t".to_string(), 0, offset));
                rest
            });
            let words: Vec<&str> = line.split_whitespace().collect();
            let (kind, payload) = match words.as_slice() {
                ["booking", id, user, room] => (
                    EventKind::Booking,
                    format!(
                        r#"{{"bookingId":"{id}","userId":"{user}","roomId":"{room}","guests":2,"startDate":"2026-03-01","endDate":"2026-03-04","paymentId":"p"}}"#
                    ),
                ),
                ["cancel", id, user] => (
                    EventKind::Cancellation,
                    format!(r#"{{"bookingId":"{id}","userId":"{user}"}}"#),
                ),
                _ => (EventKind::Booking, "not json".to_string()),
            };
            works.push(work(kind, offset, payload.into_bytes()));
        }
        (works, dead_letters)
    }

    fn work(kind: EventKind, offset: i64, payload: Vec<u8>) -> Work {
        let meta = RecordMeta {
            tp: TopicPartition::new("t", 0),
            offset,
            key: None,
            payload,
            baggage: None,
            received_at: std::time::Instant::now(),
            produced_at_ms: None,
        };
        match kind.decode(&meta.payload, 65_536) {
            Ok(event) => Work::Apply { meta, event },
            Err(rejection) => Work::Reject { meta, rejection },
        }
    }

    /// Each record's outcome so far after sorting the batch and choosing its new bookings, as
    /// one word per record (`new` for a booking to create, `-` for one still undecided).
    fn decide(spec: &str, users: &[&str], rooms: &[&str]) -> String {
        let (works, dead_letters) = batch(spec);
        let mut plan = Plan::new(&works, &dead_letters);
        plan.users = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.to_string(), i as i32))
            .collect();
        plan.rooms = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.to_string(), i as i32))
            .collect();
        plan.choose_new_bookings();
        let new: HashSet<usize> = plan.new_bookings.iter().map(|(i, _)| *i).collect();
        let words: Vec<String> = plan
            .outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| match o {
                _ if new.contains(&i) => "new".to_string(),
                Some(End::DeadLettered(r)) => format!("dead:{}", r.reason.as_str()),
                Some(o) => o.as_str().to_string(),
                None => "-".to_string(),
            })
            .collect();
        words.join(" ")
    }

    fn check(spec: &str, users: &[&str], rooms: &[&str], expect: &str) {
        assert_eq!(decide(spec, users, rooms), expect, "for the batch:\n{spec}");
    }

    #[test]
    fn the_first_event_of_a_booking_id_creates_it_and_later_ones_are_duplicates() {
        check(
            "booking b1 alice r1
             booking b1 alice r1
             booking b2 alice r1",
            &["alice"],
            &["r1"],
            "new duplicate new",
        );
    }

    #[test]
    fn a_booking_of_an_unknown_user_or_room_is_dead_lettered_and_not_a_duplicate_source() {
        check(
            "booking b1 nobody r1
             booking b2 alice r9
             booking b1 alice r1",
            &["alice"],
            &["r1"],
            "dead:unknown_user dead:unknown_room duplicate",
        );
    }

    #[test]
    fn rejected_and_already_dead_lettered_records_are_decided_before_anything_else() {
        check(
            "garbage
             dead booking b1 alice r1
             cancel b2 alice
             dead cancel b3 alice
             booking b1 alice r1",
            &["alice"],
            &["r1"],
            "dead:malformed_json already_dead_lettered - already_dead_lettered new",
        );
    }

    fn parked(booking_ref: &str, user_ref: &str) -> ParkedCancellation {
        ParkedCancellation {
            booking_ref: booking_ref.to_string(),
            user_ref: user_ref.to_string(),
            record: crate::repository::StoredRecord {
                topic: "t".to_string(),
                kafka_partition: 1,
                kafka_offset: 0,
                record_key: None,
                payload: Vec::new(),
                baggage: None,
            },
            parked_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn released_cancellations_are_decided_before_the_batch_own() {
        let (works, dead_letters) = batch("booking b1 alice r1\ncancel b1 alice\ncancel b2 bob");
        let plan = Plan::new(&works, &dead_letters);
        let released = [parked("b1", "alice"), parked("b7", "bob")];
        let order: Vec<(CancelAt, &str)> = plan
            .cancel_requests(&released)
            .iter()
            .map(|r| (r.at, r.booking_ref))
            .collect();
        let expect = [
            (CancelAt::Released(0), "b1"),
            (CancelAt::Released(1), "b7"),
            (CancelAt::Batch(1), "b1"),
            (CancelAt::Batch(2), "b2"),
        ];
        assert_eq!(order, expect);
        assert_eq!(plan.user_refs(), ["alice", "bob"]);
        assert_eq!(plan.room_refs(), ["r1"]);
    }

    /// The new bookings written as Cancelled, given the batch and the users that exist.
    fn born_cancelled(spec: &str, released: &[ParkedCancellation]) -> Vec<String> {
        let (works, dead_letters) = batch(spec);
        let mut plan = Plan::new(&works, &dead_letters);
        plan.users = [("alice".to_string(), 1), ("bob".to_string(), 2)].into();
        plan.rooms = [("r1".to_string(), 1)].into();
        plan.choose_new_bookings();
        let requests = plan.cancel_requests(released);
        let rows = plan.rows_to_insert(&requests);
        rows.iter()
            .filter(|nb| nb.cancelled)
            .map(|nb| nb.external_id.to_string())
            .collect()
    }

    #[test]
    fn a_booking_its_owner_cancels_in_the_same_transaction_is_written_as_cancelled() {
        for (spec, released, expect) in [
            ("booking b1 alice r1\ncancel b1 alice", vec![], vec!["b1"]),
            ("booking b1 alice r1\ncancel b1 bob", vec![], vec![]),
            ("booking b1 alice r1", vec![parked("b1", "alice")], vec!["b1"]),
            ("booking b1 alice r1", vec![parked("b1", "bob")], vec![]),
            (
                "booking b1 alice r1\nbooking b2 bob r1\ncancel b2 bob",
                vec![],
                vec!["b2"],
            ),
        ] {
            assert_eq!(born_cancelled(spec, &released), expect, "for the batch:\n{spec}");
        }
    }
}
