//! The pacing of cancellations for `ALIGN_CANCELLATIONS` ([`crate::align`]): a booking partition
//! thread publishes how far it has handed records on, and a cancellation partition thread waits for
//! the booking partitions' horizon before it hands a cancellation on. Everything the partition
//! threads do for it is here.

use crate::align::{self, BookingSlot, CancellationGate, Horizon, Passage};
use crate::models::EventKind;
use crate::pipeline::Work;
use std::sync::Arc;

/// A partition thread's part in keeping cancellations behind a booking backlog.
pub(super) enum Pacing {
    /// Alignment is off.
    Free,
    /// A booking partition: publishes how far it has handed records on.
    Booking(BookingSlot),
    /// A cancellation partition: waits for the booking partitions' horizon.
    Cancellation(CancellationGate),
}

/// What a partition thread's poll came to, as the pacing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Polled {
    /// The poll found no record.
    Nothing,
    /// A record was handed on to the writers, with its Kafka timestamp when it has one.
    HandedOn { produced_at_ms: Option<i64> },
}

impl Pacing {
    pub(super) fn of(kind: EventKind, horizon: Option<&Arc<Horizon>>) -> Pacing {
        match (kind, horizon) {
            (_, None) => Pacing::Free,
            (EventKind::Booking, Some(h)) => Pacing::Booking(h.join()),
            (EventKind::Cancellation, Some(h)) => Pacing::Cancellation(CancellationGate::new(h)),
        }
    }

    /// Before a record is handed on: false when the thread was told to stop meanwhile.
    pub(super) fn before(&mut self, work: &Work, stop: &dyn Fn() -> bool) -> bool {
        let Pacing::Cancellation(gate) = self else {
            return true;
        };
        if work.event().is_none() {
            return true;
        }
        match gate.wait(work.meta().produced_at_ms, stop) {
            Passage::Reached => true,
            Passage::GaveUp => {
                log::debug!(topic = work.meta().tp.topic.as_ref(), partition = work.meta().tp.partition;
                    "the booking partitions' horizon stalled; a cancellation goes on without it");
                true
            }
            Passage::Stopped => false,
        }
    }

    /// After a poll: a booking partition publishes the record it handed on, or that it is idle.
    pub(super) fn after(&self, polled: Polled) {
        if let Pacing::Booking(slot) = self {
            match polled {
                Polled::HandedOn { produced_at_ms } => slot.handed_on(produced_at_ms, align::now_ms()),
                Polled::Nothing => slot.idle(),
            }
        }
    }
}
