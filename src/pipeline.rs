//! What travels between the pipeline's stages: a consumed record ([`RecordMeta`]), the one message
//! of the channels from the partition threads to the writers ([`Work`]), the end each record
//! reaches ([`End`]), and what becomes of a parked cancellation ([`ParkedOutcome`]). Every stage
//! imports these; this module imports no stage.

use crate::logger::EventScope;
use crate::models::{Event, Reason, Rejection};
use crate::offsets::TopicPartition;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

/// A consumed record with everything needed to store it anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub tp: TopicPartition,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub baggage: Option<String>,
    pub received_at: Instant,
    /// The record's Kafka timestamp (producer create time, or the broker's log-append time), in
    /// milliseconds since the epoch.
    pub produced_at_ms: Option<i64>,
}

impl RecordMeta {
    /// The bytes this record holds in memory, as [`crate::budget::ByteBudget`] counts them.
    pub fn bytes(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len) + self.baggage.as_ref().map_or(0, String::len)
    }
}

/// What travels from the partition threads to the writers: the only message of that channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A valid event to apply.
    Apply { meta: RecordMeta, event: Event },
    /// A record that failed decoding, to dead-letter.
    Reject { meta: RecordMeta, rejection: Rejection },
}

impl Work {
    pub fn meta(&self) -> &RecordMeta {
        match self {
            Work::Apply { meta, .. } | Work::Reject { meta, .. } => meta,
        }
    }

    pub fn event(&self) -> Option<&Event> {
        match self {
            Work::Apply { event, .. } => Some(event),
            Work::Reject { .. } => None,
        }
    }

    /// The record's fields that every log line about it carries.
    pub fn scope(&self) -> EventScope {
        let meta = self.meta();
        EventScope {
            topic: meta.tp.topic.to_string(),
            partition: meta.tp.partition,
            offset: meta.offset,
            booking_id: self.event().map(|e| e.booking_id().to_string()),
            baggage: meta.baggage.clone(),
        }
    }

    /// Which writer takes this record: by booking id, so one booking's records keep their order.
    pub fn route(&self, writers: usize) -> usize {
        let mut h = DefaultHasher::new();
        match self {
            Work::Apply { event, .. } => event.booking_id().hash(&mut h),
            Work::Reject { meta, .. } => (meta.tp.partition, meta.offset).hash(&mut h),
        }
        (h.finish() % writers as u64) as usize
    }
}

/// The end a record reached: the one source of the `end` field of its log line and of the `end`
/// and `reason` labels of `booking_worker_events_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A booking row was created.
    Created { id: i32 },
    /// A row the Go worker wrote for this booking was given its external id (nothing else).
    Adopted { id: i32 },
    /// The booking already existed: a redelivery.
    Duplicate,
    /// The booking went from Accepted to Cancelled.
    Cancelled { id: i32 },
    /// The booking was already cancelled: nothing changed.
    AlreadyCancelled { id: i32 },
    /// The booking does not exist yet: the cancellation waits for it.
    Parked,
    /// The record was dead-lettered before (a replay after its parked cancellation expired).
    AlreadyDeadLettered,
    /// Stored in the dead letters with its reason.
    DeadLettered(Rejection),
}

impl End {
    /// Every end's name, in the order of [`End::index`].
    pub const NAMES: [&'static str; 8] = [
        "created",
        "adopted",
        "duplicate",
        "cancelled",
        "already_cancelled",
        "parked",
        "already_dead_lettered",
        "dead_lettered",
    ];

    /// The end's place in [`End::NAMES`].
    pub fn index(&self) -> usize {
        match self {
            End::Created { .. } => 0,
            End::Adopted { .. } => 1,
            End::Duplicate => 2,
            End::Cancelled { .. } => 3,
            End::AlreadyCancelled { .. } => 4,
            End::Parked => 5,
            End::AlreadyDeadLettered => 6,
            End::DeadLettered(_) => 7,
        }
    }

    /// The end's name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        End::NAMES[self.index()]
    }

    /// The dead letter's reason code; empty for every other end.
    pub fn reason(&self) -> &'static str {
        match self {
            End::DeadLettered(r) => r.reason.as_str(),
            _ => "",
        }
    }
}

/// What becomes of a parked cancellation when it leaves the parking. Its record's end (`parked`)
/// was logged and counted when it was consumed, so this is an `outcome`: the one source of the
/// `outcome` field of its log line and of the labels of `booking_worker_parked_outcomes_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkedOutcome {
    /// Its booking arrived, and the cancellation was decided by the rules of a consumed one: its
    /// outcome is named as that end (`cancelled`, `already_cancelled`, `dead_lettered`, or
    /// `parked` again when the booking is gone).
    Released(End),
    /// No booking arrived within `PENDING_CANCELLATION_TTL_SECS`: dead-lettered as
    /// `cancellation_expired`.
    Expired,
}

impl ParkedOutcome {
    /// Every outcome's name: the ends, and `expired`.
    pub fn names() -> impl Iterator<Item = &'static str> {
        End::NAMES.into_iter().chain(["expired"])
    }

    /// The outcome's name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ParkedOutcome::Released(end) => end.as_str(),
            ParkedOutcome::Expired => "expired",
        }
    }

    /// The dead letter's reason code; empty when the cancellation was not dead-lettered.
    pub fn reason(&self) -> &'static str {
        match self {
            ParkedOutcome::Released(end) => end.reason(),
            ParkedOutcome::Expired => Reason::CancellationExpired.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_its_own_name_and_parked_outcomes_add_expired() {
        let ends = [
            End::Created { id: 1 },
            End::Adopted { id: 1 },
            End::Duplicate,
            End::Cancelled { id: 1 },
            End::AlreadyCancelled { id: 1 },
            End::Parked,
            End::AlreadyDeadLettered,
            End::DeadLettered(Rejection::new(Reason::Unauthorized, "x")),
        ];
        let names: Vec<&str> = ends.iter().map(End::as_str).collect();
        assert_eq!(names, End::NAMES);
        assert_eq!(ends[7].reason(), "unauthorized");
        assert_eq!(ends[0].reason(), "");
        let expired = ParkedOutcome::Expired;
        assert_eq!(
            (expired.as_str(), expired.reason()),
            ("expired", "cancellation_expired")
        );
        assert_eq!(ParkedOutcome::names().count(), End::NAMES.len() + 1);
        assert!(ParkedOutcome::names().any(|n| n == expired.as_str()));
    }
}
