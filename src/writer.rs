//! The writer pool: named threads that take records off bounded channels in batches, apply each
//! batch in one PostgreSQL transaction, and only then mark the records durable in the offset
//! tracker. What a failed batch does depends on the class of its error: a transient one is retried
//! with capped, jittered backoff; a systemic one halts the worker (see [`crate::halt`]) while the
//! same batch is retried; a record's own refusal sets that record apart as a dead letter.
//!
//! Records of one booking id always go to the same writer, so they are applied in the order they
//! were consumed. Closing the channels (dropping every [`Dispatcher`]) drains and stops the pool.

use crate::budget::ByteBudget;
use crate::config::PipelineConfig;
use crate::database::{Backoff, DbError, ErrorClass, Pool};
use crate::halt::Halt;
use crate::handlers::{self, BatchResult};
use crate::health::Health;
use crate::logger;
use crate::metrics::Metrics;
use crate::models::{Reason, Rejection};
use crate::observe;
use crate::offsets::OffsetTracker;
use crate::pipeline::{End, Work};
use crate::shutdown::Shutdown;
use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The sending side of the writer channels. Cloned into every partition thread.
#[derive(Clone)]
pub struct Dispatcher {
    senders: Vec<Sender<Work>>,
    tracker: Arc<OffsetTracker>,
    budget: Arc<ByteBudget>,
}

/// How often a blocked send checks whether it should give up.
const SEND_POLL: Duration = Duration::from_millis(100);

impl Dispatcher {
    /// Hands a record to its writer, blocking while that writer's channel is full (back-pressure).
    /// Gives up, and withdraws the record from the watermark, when `stop` turns true or the
    /// writers are gone. Returns whether the record was handed over.
    /// Also waits while the record's bytes would pass `MAX_IN_FLIGHT_BYTES`.
    pub fn dispatch(&self, work: Work, stop: &dyn Fn() -> bool) -> bool {
        let tp = work.meta().tp.clone();
        let offset = work.meta().offset;
        let bytes = work.meta().bytes();
        let sender = &self.senders[work.route(self.senders.len())];
        self.tracker.dispatched(&tp, offset);
        if !self.budget.acquire(bytes, stop) {
            self.tracker.withdrawn(&tp, offset);
            return false;
        }
        let mut work = work;
        loop {
            match sender.send_timeout(work, SEND_POLL) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(w)) if !stop() => work = w,
                Err(_) => {
                    self.budget.release(bytes);
                    self.tracker.withdrawn(&tp, offset);
                    return false;
                }
            }
        }
    }

    /// Payload bytes in flight between the partition threads and the writers.
    pub fn in_flight_bytes(&self) -> usize {
        self.budget.in_flight()
    }

    /// Records queued across all writer channels.
    pub fn queued(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }
}

/// What the writers share with the rest of the worker.
pub struct WriterWiring {
    pub pool: Pool,
    pub tracker: Arc<OffsetTracker>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub halt: Arc<Halt>,
    pub shutdown: Shutdown,
    pub budget: Arc<ByteBudget>,
}

/// The running writer threads.
pub struct WriterPool {
    handles: Vec<JoinHandle<()>>,
}

impl WriterPool {
    /// Starts `config.writers` threads named `writer-N`.
    pub fn start(config: &PipelineConfig, wiring: WriterWiring) -> std::io::Result<(Dispatcher, WriterPool)> {
        let mut senders = Vec::with_capacity(config.writers);
        let mut handles = Vec::with_capacity(config.writers);
        for n in 1..=config.writers {
            let (tx, rx) = bounded(config.channel_capacity);
            senders.push(tx);
            let name = format!("writer-{n}");
            let writer = Writer {
                number: n,
                rx,
                pool: wiring.pool.clone(),
                tracker: Arc::clone(&wiring.tracker),
                metrics: Arc::clone(&wiring.metrics),
                halt: Arc::clone(&wiring.halt),
                shutdown: wiring.shutdown.clone(),
                budget: Arc::clone(&wiring.budget),
                adopt_legacy_rows: config.adopt_legacy_rows,
                _alive: wiring.health.register(&name),
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
        let tracker = wiring.tracker;
        let budget = wiring.budget;
        Ok((
            Dispatcher {
                senders,
                tracker,
                budget,
            },
            WriterPool { handles },
        ))
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

/// Whether the circuit breaker looks at a transaction before it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    Breaker,
    /// A dead letter the breaker already allowed.
    None,
}

/// Why a batch was not brought to an end.
enum Stop {
    /// The database refused a record of it (SQLSTATE class 22 or 23).
    Refused(DbError),
    /// Shutdown came while the database could not take the batch: its records stay unstored and
    /// are consumed again on the next start.
    Abandoned,
}

struct Writer {
    number: usize,
    rx: Receiver<Work>,
    pool: Pool,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    halt: Arc<Halt>,
    shutdown: Shutdown,
    budget: Arc<ByteBudget>,
    adopt_legacy_rows: bool,
    /// Marks this writer dead for `/healthz` when the thread ends.
    _alive: crate::health::Alive,
    batch_size: usize,
    linger: Duration,
    max_backoff: Duration,
}

impl Writer {
    fn run(self) {
        let mut batch: Vec<Work> = Vec::with_capacity(self.batch_size);
        loop {
            self.halt.wait_until_running(&self.shutdown);
            let Ok(first) = self.rx.recv() else { break };
            batch.push(first);
            let deadline = Instant::now() + self.linger;
            while batch.len() < self.batch_size {
                match self.rx.recv_deadline(deadline) {
                    Ok(work) => batch.push(work),
                    Err(_) => break,
                }
            }
            if self.process(&batch).is_err() {
                let left = batch.len() + self.rx.len();
                log::warn!(records = left;
                    "shutdown while the database cannot take writes; these records are consumed again on the next start");
                return;
            }
            self.tracker
                .completed(batch.iter().map(|w| (&w.meta().tp, w.meta().offset)));
            self.budget.release(batch.iter().map(|w| w.meta().bytes()).sum());
            batch.clear();
        }
        log::debug!("writer drained and stopped");
    }

    /// Brings every record of the batch to a durable end, or gives up at shutdown.
    fn process(&self, batch: &[Work]) -> Result<(), ()> {
        fail::fail_point!("writer-batch");
        match self.apply_until_done(batch) {
            Ok(result) => self.finish(batch, result)?,
            Err(Stop::Abandoned) => return Err(()),
            Err(Stop::Refused(error)) if batch.len() > 1 => {
                log::warn!(error = error.to_string(), records = batch.len();
                    "database refused a record of the batch; applying its records one by one");
                for work in batch {
                    self.process_one(work)?;
                }
            }
            Err(Stop::Refused(error)) => self.dead_letter(&batch[0], error)?,
        }
        Ok(())
    }

    /// Logs a committed batch, then releases whatever parked cancellations it left for further
    /// pages.
    fn finish(&self, batch: &[Work], result: BatchResult) -> Result<(), ()> {
        self.log_result(batch, &result);
        self.release_parked(result.more_parked)
    }

    /// Releases, a page per transaction, the parked cancellations of bookings that had more than
    /// one page of them.
    fn release_parked(&self, mut refs: Vec<String>) -> Result<(), ()> {
        while !refs.is_empty() {
            let page: Vec<&str> = refs.iter().map(String::as_str).collect();
            match self.apply_until_done_with(&[], &page, Guard::Breaker) {
                Ok(result) => {
                    self.log_result(&[], &result);
                    // A page that only parked again (its booking is gone) makes no progress.
                    let progress = result.released.iter().any(|(_, o)| *o != End::Parked);
                    refs = if progress { result.more_parked } else { Vec::new() };
                }
                Err(Stop::Abandoned) => return Err(()),
                Err(Stop::Refused(error)) => {
                    log::error!(error = error.to_string(), bookings = page.len();
                        "database refused releasing parked cancellations; they stay parked until they expire");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Applies one record on its own, and dead-letters it when the database refuses it.
    fn process_one(&self, work: &Work) -> Result<(), ()> {
        let single = std::slice::from_ref(work);
        match self.apply_until_done(single) {
            Ok(result) => self.finish(single, result)?,
            Err(Stop::Abandoned) => return Err(()),
            Err(Stop::Refused(error)) => self.dead_letter(work, error)?,
        }
        Ok(())
    }

    /// Stores a record the database refused as a dead letter with the server's SQLSTATE. When the
    /// circuit breaker forbids one more, the worker halts and the record itself is retried.
    fn dead_letter(&self, work: &Work, error: DbError) -> Result<(), ()> {
        let mut error = error;
        let mut backoff = Backoff::new(self.max_backoff);
        while !self.halt.breaker().allows(std::iter::once(true)) {
            self.wait_out(&self.breaker_error(&error), &mut backoff, 1)?;
            match self.apply_until_done(std::slice::from_ref(work)) {
                Ok(result) => return self.finish(std::slice::from_ref(work), result),
                Err(Stop::Abandoned) => return Err(()),
                Err(Stop::Refused(again)) => error = again,
            }
        }
        // The breaker allowed this dead letter: it is stored whatever other writers count meanwhile.
        let rejected = [Work::Reject {
            meta: work.meta().clone(),
            rejection: Rejection::refused(error.sqlstate.as_deref(), error.message),
        }];
        match self.apply_until_done_with(&rejected, &[], Guard::None) {
            Ok(result) => self.finish(&rejected, result)?,
            Err(Stop::Abandoned) => return Err(()),
            Err(Stop::Refused(error)) => {
                // Storing a dead letter touches only the worker's own table; a refusal there means
                // that table is not as its migrations made it.
                logger::with_event(
                    work.scope(),
                    || log::error!(error = error.to_string(); "database refuses to store a dead letter"),
                );
                self.dead_letter_or_halt(&rejected, error)?;
            }
        }
        Ok(())
    }

    /// Retries storing a dead letter as a systemic failure until it goes through.
    fn dead_letter_or_halt(&self, rejected: &[Work], error: DbError) -> Result<(), ()> {
        let systemic = DbError {
            class: ErrorClass::Systemic,
            ..error
        };
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            self.wait_out(&systemic, &mut backoff, 1)?;
            if let Ok(result) = self.apply_until_done_with(rejected, &[], Guard::None) {
                return self.finish(rejected, result);
            }
        }
    }

    /// Logs and counts the end of every record of a committed batch, and the outcome of every
    /// parked cancellation it released.
    fn log_result(&self, batch: &[Work], result: &BatchResult) {
        self.halt.breaker().committed(result.outcomes.iter().map(is_refusal));
        logger::in_one_write(|| {
            let now_ms = chrono::Utc::now().timestamp_millis();
            for (work, end) in batch.iter().zip(&result.outcomes) {
                observe::record_ended(&self.metrics, work, end, now_ms);
            }
            for (parked, end) in &result.released {
                observe::parked_released(&self.metrics, parked, end);
            }
        })
    }

    /// Applies a batch, retrying transient and systemic failures with capped backoff for as long
    /// as they last (halting the worker for a systemic one). Returns the result, a record's
    /// refusal, or [`Stop::Abandoned`] at shutdown.
    fn apply_until_done(&self, batch: &[Work]) -> Result<BatchResult, Stop> {
        self.apply_until_done_with(batch, &[], Guard::Breaker)
    }

    /// [`Writer::apply_until_done`], also releasing parked cancellations of `release`, with or
    /// without the circuit breaker's look before the commit.
    fn apply_until_done_with(&self, batch: &[Work], release: &[&str], guard: Guard) -> Result<BatchResult, Stop> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let result = self.try_apply(batch, release, guard);
            let label = match &result {
                Ok(_) => "committed",
                Err(e) => match e.class {
                    ErrorClass::Transient => "transient_error",
                    ErrorClass::Systemic => "systemic_error",
                    ErrorClass::Record => "record_error",
                },
            };
            self.metrics.transaction(label, batch.len());
            match result {
                Ok(result) => {
                    self.running();
                    return Ok(result);
                }
                // The halt, if any, lasts until a transaction commits.
                Err(e) if e.is(ErrorClass::Record) => return Err(Stop::Refused(e)),
                Err(e) => self
                    .wait_out(&e, &mut backoff, batch.len())
                    .map_err(|()| Stop::Abandoned)?,
            }
        }
    }

    /// One attempt at a batch, in one transaction, with the circuit breaker's last look before it
    /// commits. A connection that reached a read-only standby is dropped, not pooled.
    fn try_apply(&self, batch: &[Work], release: &[&str], guard: Guard) -> Result<BatchResult, DbError> {
        let mut conn = self.pool.get()?;
        let breaker = |result: &BatchResult| {
            if guard == Guard::None || self.halt.breaker().allows(result.outcomes.iter().map(is_refusal)) {
                return Ok(());
            }
            let last = result.outcomes.iter().rev().find_map(|o| match o {
                End::DeadLettered(r) if r.reason == Reason::DatabaseRejected => Some(r),
                _ => None,
            });
            let error = DbError {
                class: ErrorClass::Record,
                sqlstate: last.and_then(|r| r.sqlstate.clone()),
                message: last.map_or_else(String::new, |r| r.error.clone()),
            };
            Err(self.breaker_error(&error))
        };
        let rules = handlers::Rules {
            adopt_legacy_rows: self.adopt_legacy_rows,
            replaying_dead_letters: false,
            before_commit: &breaker,
        };
        let result = if release.is_empty() {
            handlers::apply_batch(conn.client(), batch, rules)
        } else {
            handlers::release_parked(conn.client(), release, rules)
        };
        if result.as_ref().is_err_and(DbError::is_read_only) {
            conn.discard();
        }
        result
    }

    /// The systemic error a tripped circuit breaker halts with.
    fn breaker_error(&self, refusal: &DbError) -> DbError {
        let breaker = self.halt.breaker();
        DbError {
            class: ErrorClass::Systemic,
            sqlstate: refusal.sqlstate.clone(),
            message: format!(
                "{} records in a row refused by the database (DB_REJECT_HALT_AFTER={}); last: {}",
                breaker.consecutive() + 1,
                breaker.limit(),
                refusal.message
            ),
        }
    }

    /// Waits before the next attempt after a transient or systemic failure; a systemic one halts
    /// the worker. Errs when shutdown comes first.
    fn wait_out(&self, error: &DbError, backoff: &mut Backoff, records: usize) -> Result<(), ()> {
        let delay = backoff.next_delay();
        if error.is(ErrorClass::Systemic) {
            self.halt.enter_counted(self.number, error, &self.metrics);
        } else {
            log::warn!(error = error.to_string(), attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64,
                records; "database unavailable; retrying the batch");
        }
        if self.shutdown.sleep(delay) {
            return Err(());
        }
        Ok(())
    }

    /// The database took this writer's batch: it is no longer halted.
    fn running(&self) {
        self.halt.leave_counted(self.number, &self.metrics);
    }
}

/// Whether an end is a record the database refused (what the circuit breaker counts).
fn is_refusal(outcome: &End) -> bool {
    matches!(outcome, End::DeadLettered(r) if r.reason == Reason::DatabaseRejected)
}
