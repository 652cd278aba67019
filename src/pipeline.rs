//! What travels between the pipeline's stages: a consumed record ([`RecordMeta`]), the one message
//! of the channels from the partition threads to the writers ([`Work`]), and the end each record
//! reaches ([`Outcome`]). Every stage imports these; this module imports no stage.

use crate::logger::EventScope;
use crate::models::{Event, Rejection};
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

/// The end a record reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
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

impl Outcome {
    /// The outcome's name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Created { .. } => "created",
            Outcome::Adopted { .. } => "adopted",
            Outcome::Duplicate => "duplicate",
            Outcome::Cancelled { .. } => "cancelled",
            Outcome::AlreadyCancelled { .. } => "already_cancelled",
            Outcome::Parked => "parked",
            Outcome::AlreadyDeadLettered => "already_dead_lettered",
            Outcome::DeadLettered(_) => "dead_lettered",
        }
    }
}
