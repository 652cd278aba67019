//! The observer of ends: each end a consumed record reaches ([`End`]) and each outcome of a parked
//! cancellation ([`ParkedOutcome`]) is logged once and counted once, here and nowhere else, so that
//! the log line and the metric always use the same words.
//!
//! Every consumed record gets exactly one line with an `end` field and one count in
//! `booking_worker_events_total{topic,end,reason}`. What later becomes of a parked cancellation
//! gets one line with an `outcome` field and one count in
//! `booking_worker_parked_outcomes_total{outcome,reason}`. Dead letters of either kind are also
//! counted in `booking_worker_dead_letters_total{reason}`.

use crate::logger::{self, EventScope};
use crate::metrics::Metrics;
use crate::models::Event;
use crate::pipeline::{End, ParkedOutcome, Work};
use crate::repository::ParkedCancellation;

/// A consumed record reached `end`, durable in PostgreSQL. `now_ms` is the wall clock in
/// milliseconds since the epoch, to measure from the record's Kafka timestamp.
pub fn record_ended(metrics: &Metrics, work: &Work, end: &End, now_ms: i64) {
    let meta = work.meta();
    let seconds = meta.received_at.elapsed().as_secs_f64();
    let since_produced = meta.produced_at_ms.map(|t| (now_ms - t).max(0) as f64 / 1000.0);
    metrics.record_end(
        &meta.tp.topic,
        work.event().map(Event::kind),
        end,
        seconds,
        since_produced,
    );
    logger::with_event(work.scope(), || log_end(end, seconds * 1000.0));
}

/// A parked cancellation's booking arrived, and the cancellation reached `end` (durable).
pub fn parked_released(metrics: &Metrics, parked: &ParkedCancellation, end: &End) {
    let outcome = ParkedOutcome::Released(end.clone());
    metrics.record_parked_outcome(&outcome, 1);
    logger::with_event(parked_scope(parked), || log_released(end, &outcome));
}

/// A committed page of parked cancellations expired into dead letters.
pub fn parked_expired(metrics: &Metrics, page: &[ParkedCancellation]) {
    let outcome = ParkedOutcome::Expired;
    metrics.record_parked_outcome(&outcome, page.len());
    logger::in_one_write(|| {
        for parked in page {
            logger::with_event(parked_scope(parked), || {
                log::warn!(outcome = outcome.as_str(), reason = outcome.reason();
                    "parked cancellation expired; dead-lettered")
            });
        }
    });
}

/// The log scope of a parked cancellation: the record it came from.
fn parked_scope(parked: &ParkedCancellation) -> EventScope {
    EventScope {
        topic: parked.record.topic.clone(),
        partition: parked.record.kafka_partition,
        offset: parked.record.kafka_offset,
        booking_id: Some(parked.booking_ref.clone()),
        baggage: parked.record.baggage.clone(),
    }
}

/// The one `end` line of a consumed record.
fn log_end(end: &End, latency_ms: f64) {
    let name = end.as_str();
    match end {
        End::Created { id } => log::info!(end = name, row_id = id, latency_ms; "booking created"),
        End::Adopted { id } => {
            log::info!(end = name, row_id = id, latency_ms; "booking adopted: the Go worker's row now carries its external id")
        }
        End::Duplicate => log::info!(end = name, latency_ms; "booking already exists; duplicate ignored"),
        End::Cancelled { id } => log::info!(end = name, row_id = id, latency_ms; "booking cancelled"),
        End::AlreadyCancelled { id } => {
            log::warn!(end = name, row_id = id, latency_ms; "booking already cancelled; nothing changed")
        }
        End::Parked => log::info!(end = name, latency_ms; "booking not found yet; cancellation parked"),
        End::AlreadyDeadLettered => {
            log::info!(end = name, latency_ms; "record was dead-lettered before; nothing changed")
        }
        End::DeadLettered(r) => {
            log::warn!(end = name, reason = r.reason.as_str(), error = r.error.as_str(),
                sqlstate = r.sqlstate.as_deref().unwrap_or(""), latency_ms; "record dead-lettered")
        }
    }
}

/// The one `outcome` line of a released parked cancellation.
fn log_released(end: &End, outcome: &ParkedOutcome) {
    let name = outcome.as_str();
    match end {
        End::Cancelled { id } => {
            log::info!(outcome = name, row_id = id; "parked cancellation applied to its booking")
        }
        End::DeadLettered(r) => log::warn!(outcome = name, reason = r.reason.as_str(),
            error = r.error.as_str(); "parked cancellation dead-lettered"),
        _ => log::warn!(outcome = name; "parked cancellation released; nothing changed"),
    }
}
