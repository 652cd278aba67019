//! The writer pool: named threads that take records off bounded channels in batches, apply each
//! batch in one PostgreSQL transaction, retry transient failures forever with capped backoff, and
//! only then mark the records durable in the offset tracker.
//!
//! Records of one booking id always go to the same writer, so they are applied in the order they
//! were consumed. Closing the channels (dropping every [`Dispatcher`]) drains and stops the pool.

use crate::config::PipelineConfig;
use crate::database::{Backoff, DbError, Pool};
use crate::handlers::{self, BatchResult, Outcome};
use crate::http::Health;
use crate::logger::{self, EventScope};
use crate::metrics::Metrics;
use crate::models::{Event, Reason, Rejection};
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::repository::{ParkedCancellation, Source};
use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A consumed record with everything needed to store it anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub tp: TopicPartition,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub baggage: Option<String>,
    pub received_at: Instant,
}

impl RecordMeta {
    pub fn source(&self) -> Source<'_> {
        Source {
            topic: &self.tp.topic,
            partition: self.tp.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: &self.payload,
            baggage: self.baggage.as_deref(),
        }
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

    fn scope(&self) -> EventScope {
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
    fn route(&self, writers: usize) -> usize {
        let mut h = DefaultHasher::new();
        match self {
            Work::Apply { event, .. } => event.booking_id().hash(&mut h),
            Work::Reject { meta, .. } => (meta.tp.partition, meta.offset).hash(&mut h),
        }
        (h.finish() % writers as u64) as usize
    }
}

/// The sending side of the writer channels. Cloned into every partition thread.
#[derive(Clone)]
pub struct Dispatcher {
    senders: Vec<Sender<Work>>,
    tracker: Arc<OffsetTracker>,
}

/// How often a blocked send checks whether it should give up.
const SEND_POLL: Duration = Duration::from_millis(100);

impl Dispatcher {
    /// Hands a record to its writer, blocking while that writer's channel is full (back-pressure).
    /// Gives up, and withdraws the record from the watermark, when `stop` turns true or the
    /// writers are gone. Returns whether the record was handed over.
    pub fn dispatch(&self, work: Work, stop: &dyn Fn() -> bool) -> bool {
        let tp = work.meta().tp.clone();
        let offset = work.meta().offset;
        let sender = &self.senders[work.route(self.senders.len())];
        self.tracker.dispatched(&tp, offset);
        let mut work = work;
        loop {
            match sender.send_timeout(work, SEND_POLL) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(w)) if !stop() => work = w,
                Err(_) => {
                    self.tracker.withdrawn(&tp, offset);
                    return false;
                }
            }
        }
    }

    /// Records queued across all writer channels.
    pub fn queued(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }
}

/// The running writer threads.
pub struct WriterPool {
    handles: Vec<JoinHandle<()>>,
}

impl WriterPool {
    /// Starts `config.writers` threads named `writer-N`.
    pub fn start(
        config: &PipelineConfig,
        pool: Pool,
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> std::io::Result<(Dispatcher, WriterPool)> {
        let mut senders = Vec::with_capacity(config.writers);
        let mut handles = Vec::with_capacity(config.writers);
        for n in 1..=config.writers {
            let (tx, rx) = bounded(config.channel_capacity);
            senders.push(tx);
            let name = format!("writer-{n}");
            let writer = Writer {
                rx,
                pool: pool.clone(),
                tracker: Arc::clone(&tracker),
                metrics: Arc::clone(&metrics),
                _alive: health.register(&name),
                batch_size: config.batch_size,
                linger: config.batch_linger,
                max_backoff: config.retry_max_backoff,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("writer-{n}"))
                    .spawn(move || writer.run())?,
            );
        }
        Ok((Dispatcher { senders, tracker }, WriterPool { handles }))
    }

    /// Waits for every writer to drain its channel and finish. The channels close when the last
    /// [`Dispatcher`] is dropped.
    pub fn join(self) {
        for handle in self.handles {
            let name = handle.thread().name().unwrap_or("writer").to_string();
            if handle.join().is_err() {
                log::error!(thread = name; "writer thread panicked");
            }
        }
    }
}

/// How often a single record refused by the database is tried before it is dead-lettered.
const PERMANENT_ATTEMPTS: u32 = 3;

struct Writer {
    rx: Receiver<Work>,
    pool: Pool,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    /// Marks this writer dead for `/healthz` when the thread ends.
    _alive: crate::http::Alive,
    batch_size: usize,
    linger: Duration,
    max_backoff: Duration,
}

impl Writer {
    fn run(self) {
        let mut batch: Vec<Work> = Vec::with_capacity(self.batch_size);
        while let Ok(first) = self.rx.recv() {
            batch.push(first);
            let deadline = Instant::now() + self.linger;
            while batch.len() < self.batch_size {
                match self.rx.recv_deadline(deadline) {
                    Ok(work) => batch.push(work),
                    Err(_) => break,
                }
            }
            self.process(&batch);
            self.tracker
                .completed(batch.iter().map(|w| (&w.meta().tp, w.meta().offset)));
            batch.clear();
        }
        log::debug!("writer drained and stopped");
    }

    /// Brings every record of the batch to a durable end.
    fn process(&self, batch: &[Work]) {
        match self.apply_until_done(batch) {
            Ok(result) => self.log_result(batch, &result),
            Err(error) if batch.len() > 1 => {
                log::warn!(error = error.to_string(), records = batch.len();
                    "database refused a batch; applying its records one by one");
                for work in batch {
                    self.process_one(work);
                }
            }
            Err(_) => self.process_one(&batch[0]),
        }
    }

    /// Applies one record, and dead-letters it as `database_rejected` when the database keeps
    /// refusing it.
    fn process_one(&self, work: &Work) {
        let single = std::slice::from_ref(work);
        let mut backoff = Backoff::new(self.max_backoff);
        let mut last_error = String::new();
        for _ in 0..PERMANENT_ATTEMPTS {
            match self.apply_until_done(single) {
                Ok(result) => return self.log_result(single, &result),
                Err(error) => {
                    last_error = error.to_string();
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
        let rejected = [Work::Reject {
            meta: work.meta().clone(),
            rejection: Rejection::new(Reason::DatabaseRejected, last_error),
        }];
        loop {
            match self.apply_until_done(&rejected) {
                Ok(result) => return self.log_result(&rejected, &result),
                Err(error) => {
                    logger::with_event(work.scope(), || {
                        log::error!(error = error.to_string();
                            "database refuses to store a dead letter; retrying, the offset stays put")
                    });
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }

    /// Logs and counts the end of every record of a committed batch.
    fn log_result(&self, batch: &[Work], result: &BatchResult) {
        logger::in_one_write(|| {
            for (work, outcome) in batch.iter().zip(&result.outcomes) {
                let seconds = work.meta().received_at.elapsed().as_secs_f64();
                self.metrics
                    .record_end(&work.meta().tp.topic, work.event().map(Event::kind), outcome, seconds);
                logger::with_event(work.scope(), || log_outcome(outcome, seconds * 1000.0));
            }
            for (parked, outcome) in &result.released {
                self.metrics.record_released(outcome);
                logger::with_event(parked_scope(parked), || log_released(outcome));
            }
        })
    }

    /// Applies a batch, retrying transient failures with capped backoff for as long as they last.
    /// Returns only success or a permanent failure.
    fn apply_until_done(&self, batch: &[Work]) -> Result<BatchResult, DbError> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let result = self
                .pool
                .get()
                .map_err(DbError::from)
                .and_then(|mut conn| handlers::apply_batch(&mut conn, batch));
            match &result {
                Ok(_) => self.metrics.transaction("committed", batch.len()),
                Err(DbError::Transient(_)) => self.metrics.transaction("transient_error", batch.len()),
                Err(DbError::Permanent(_)) => self.metrics.transaction("permanent_error", batch.len()),
            }
            match result {
                Err(DbError::Transient(error)) => {
                    let delay = backoff.next_delay();
                    log::warn!(error = error, attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64,
                        records = batch.len(); "database unavailable; retrying the batch");
                    std::thread::sleep(delay);
                }
                other => return other,
            }
        }
    }
}

/// The log scope of a parked cancellation: the record it came from.
pub fn parked_scope(parked: &ParkedCancellation) -> EventScope {
    EventScope {
        topic: parked.record.topic.clone(),
        partition: parked.record.kafka_partition,
        offset: parked.record.kafka_offset,
        booking_id: Some(parked.booking_ref.clone()),
        baggage: parked.record.baggage.clone(),
    }
}

/// The one `end` line of a consumed record.
fn log_outcome(outcome: &Outcome, latency_ms: f64) {
    let end = outcome.as_str();
    match outcome {
        Outcome::Created { id } => log::info!(end, row_id = id, latency_ms; "booking created"),
        Outcome::Duplicate => log::info!(end, latency_ms; "booking already exists; duplicate ignored"),
        Outcome::Cancelled { id } => log::info!(end, row_id = id, latency_ms; "booking cancelled"),
        Outcome::AlreadyCancelled { id } => {
            log::warn!(end, row_id = id, latency_ms; "booking already cancelled; nothing changed")
        }
        Outcome::Parked => log::info!(end, latency_ms; "booking not found yet; cancellation parked"),
        Outcome::AlreadyDeadLettered => {
            log::info!(end, latency_ms; "record was dead-lettered before; nothing changed")
        }
        Outcome::DeadLettered(r) => {
            log::warn!(end, reason = r.reason.as_str(), error = r.error.as_str(), latency_ms; "record dead-lettered")
        }
    }
}

/// What became of a parked cancellation when its booking arrived. Its record's `end` (parked) was
/// logged when it was consumed, so this line says `outcome`, not `end`.
fn log_released(outcome: &Outcome) {
    let outcome_name = outcome.as_str();
    match outcome {
        Outcome::Cancelled { id } => {
            log::info!(outcome = outcome_name, row_id = id; "parked cancellation applied to its booking")
        }
        Outcome::DeadLettered(r) => log::warn!(outcome = outcome_name, reason = r.reason.as_str(),
            error = r.error.as_str(); "parked cancellation dead-lettered"),
        other => log::warn!(outcome = other.as_str(); "parked cancellation released; nothing changed"),
    }
}
