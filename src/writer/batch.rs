//! How a writer brings a batch to a durable end: one state machine over the transactions it runs.
//!
//! A [`Job`] is one kind of transaction: records applied together, a refused record stored as a
//! dead letter, or a page of parked cancellations released. Each attempt at a job comes to an
//! [`Attempt`]: committed; refused (the database refused a record for its own values, SQLSTATE
//! class 22 or 23); back off (a transient failure); or halt (a systemic failure, or the circuit
//! breaker tripped). A job runs until it [`Settled`]: committed, refused, or shut down while the
//! database could not take it. From there a batch goes on by name:
//!
//! - committed: its ends are logged and counted, then what it left parked is released
//!   ([`Writer::release_parked`], a page per transaction);
//! - refused, several records: the batch is isolated, its records applied one by one
//!   ([`Writer::isolate`]);
//! - refused, one record: it is dead-lettered with its SQLSTATE once the circuit breaker
//!   (`DB_REJECT_HALT_AFTER`) allows one more; until then the worker halts and the record itself is
//!   retried ([`Writer::dead_letter`]);
//! - shut down: the batch is abandoned, its offsets unstored, and consumed again on the next start.

use super::Writer;
use crate::database::{Backoff, DbError, ErrorClass};
use crate::handlers::{self, BatchResult};
use crate::logger;
use crate::models::{Reason, Rejection};
use crate::observe;
use crate::pipeline::{End, Work};
use std::time::Duration;

/// A transaction a writer runs until it settles.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// Records applied together. A record the database refuses fails the whole job, so a
    /// committed one holds no refusal for the circuit breaker to look at.
    Apply(&'a [Work]),
    /// A refused record stored as a dead letter the circuit breaker allowed: the record as
    /// consumed, and the [`Work::Reject`] that says why.
    StoreDeadLetter { work: &'a Work, rejected: &'a Work },
    /// The next page of parked cancellations of these bookings.
    ReleaseParked(&'a [&'a str]),
}

impl Job<'_> {
    /// The consumed records the job carries, as the transaction metric and the retry line count
    /// them.
    fn records(&self) -> usize {
        match self {
            Job::Apply(records) => records.len(),
            Job::StoreDeadLetter { .. } => 1,
            Job::ReleaseParked(_) => 0,
        }
    }
}

/// What one attempt at a job came to.
enum Attempt {
    /// It committed.
    Committed(BatchResult),
    /// The database refused a record of it for its own values (SQLSTATE class 22 or 23).
    Refused(DbError),
    /// A transient failure: wait with backoff, then try again.
    BackOff(DbError),
    /// A systemic failure, or the circuit breaker tripped: halt, wait with backoff, then try again.
    Halt(DbError),
}

/// How a job settled.
enum Settled {
    /// It committed.
    Committed(BatchResult),
    /// The database refused a record of it (SQLSTATE class 22 or 23).
    Refused(DbError),
    /// Shutdown came while the database could not take it.
    ShutDown,
}

/// How a batch ended.
pub(super) enum Processed {
    /// Every record of it reached an end that is durable in PostgreSQL.
    Durable,
    /// Shutdown came while the database could not take it: its records stay unstored and are
    /// consumed again on the next start.
    Abandoned,
}

/// Whether a wait before the next attempt ran its course or shutdown came first.
enum Waited {
    Retry,
    ShutDown,
}

impl Writer {
    /// Brings every record of the batch to a durable end, or abandons it at shutdown.
    pub(super) fn process(&self, batch: &[Work]) -> Processed {
        fail::fail_point!("writer-batch");
        match self.settle(Job::Apply(batch)) {
            Settled::Committed(result) => self.committed(batch, result),
            Settled::Refused(error) if batch.len() > 1 => self.isolate(batch, &error),
            Settled::Refused(error) => self.dead_letter(&batch[0], error),
            Settled::ShutDown => Processed::Abandoned,
        }
    }

    /// The database refused a record of the batch: applies its records one by one, so that only
    /// the refused one is dead-lettered.
    fn isolate(&self, batch: &[Work], error: &DbError) -> Processed {
        log::warn!(error = error.to_string(), records = batch.len();
            "database refused a record of the batch; applying its records one by one");
        for work in batch {
            let single = std::slice::from_ref(work);
            let processed = match self.settle(Job::Apply(single)) {
                Settled::Committed(result) => self.committed(single, result),
                Settled::Refused(error) => self.dead_letter(work, error),
                Settled::ShutDown => Processed::Abandoned,
            };
            if let Processed::Abandoned = processed {
                return Processed::Abandoned;
            }
        }
        Processed::Durable
    }

    /// Logs and counts the ends of committed records, then releases the parked cancellations they
    /// left for further pages.
    fn committed(&self, records: &[Work], result: BatchResult) -> Processed {
        self.log_result(records, &result);
        self.release_parked(result.more_parked)
    }

    /// Releases, a page per transaction, the parked cancellations of bookings that had more than
    /// one page of them. A page the database refuses stays parked until it expires.
    fn release_parked(&self, mut refs: Vec<String>) -> Processed {
        while !refs.is_empty() {
            let page: Vec<&str> = refs.iter().map(String::as_str).collect();
            match self.settle(Job::ReleaseParked(&page)) {
                Settled::Committed(result) => {
                    self.log_result(&[], &result);
                    // A page that only parked again (its booking is gone) makes no progress.
                    let progress = result.released.iter().any(|(_, end)| *end != End::Parked);
                    refs = if progress { result.more_parked } else { Vec::new() };
                }
                Settled::Refused(error) => {
                    log::error!(error = error.to_string(), bookings = page.len();
                        "database refused releasing parked cancellations; they stay parked until they expire");
                    return Processed::Durable;
                }
                Settled::ShutDown => return Processed::Abandoned,
            }
        }
        Processed::Durable
    }

    /// Stores a record the database refused as a dead letter with the server's SQLSTATE. While the
    /// circuit breaker forbids one more, the worker halts and the record itself is retried.
    fn dead_letter(&self, work: &Work, error: DbError) -> Processed {
        let mut error = error;
        let mut backoff = Backoff::new(self.max_backoff);
        while !self.halt.breaker().allows(std::iter::once(true)) {
            if let Waited::ShutDown = self.halt_and_wait(&self.breaker_error(&error), &mut backoff) {
                return Processed::Abandoned;
            }
            let single = std::slice::from_ref(work);
            match self.settle(Job::Apply(single)) {
                Settled::Committed(result) => return self.committed(single, result),
                Settled::Refused(again) => error = again,
                Settled::ShutDown => return Processed::Abandoned,
            }
        }
        // The breaker allowed this dead letter: it is stored whatever other writers count meanwhile.
        let rejected = Work::Reject {
            meta: work.meta().clone(),
            rejection: Rejection::refused(error.sqlstate.as_deref(), error.message),
        };
        self.store_dead_letter(work, &rejected)
    }

    /// Stores the dead letter of `work`. Storing one touches only the worker's own table, so a
    /// refusal there means that table is not as its migrations made it: the worker halts until the
    /// dead letter goes through.
    fn store_dead_letter(&self, work: &Work, rejected: &Work) -> Processed {
        let mut backoff = Backoff::new(self.max_backoff);
        let mut refused_before = false;
        loop {
            let error = match self.settle(Job::StoreDeadLetter { work, rejected }) {
                Settled::Committed(result) => return self.committed(std::slice::from_ref(rejected), result),
                Settled::Refused(error) => error,
                Settled::ShutDown => return Processed::Abandoned,
            };
            if !refused_before {
                logger::with_event(
                    work.scope(),
                    || log::error!(error = error.to_string(); "database refuses to store a dead letter"),
                );
                refused_before = true;
            }
            let systemic = DbError {
                class: ErrorClass::Systemic,
                ..error
            };
            if let Waited::ShutDown = self.halt_and_wait(&systemic, &mut backoff) {
                return Processed::Abandoned;
            }
        }
    }

    /// Runs a job until it commits or the database refuses a record of it, waiting out transient
    /// and systemic failures; a systemic one halts the worker until a transaction of this writer
    /// commits.
    fn settle(&self, job: Job<'_>) -> Settled {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let waited = match self.attempt(job) {
                Attempt::Committed(result) => {
                    self.halt.leave_counted(self.number, &self.metrics);
                    return Settled::Committed(result);
                }
                Attempt::Refused(error) => return Settled::Refused(error),
                Attempt::BackOff(error) => self.back_off(&error, &mut backoff, job.records()),
                Attempt::Halt(error) => self.halt_and_wait(&error, &mut backoff),
            };
            if let Waited::ShutDown = waited {
                return Settled::ShutDown;
            }
        }
    }

    /// One attempt at a job, counted in the transaction metric by its error's class. Each
    /// attempt is a turn of the writer: it beats.
    fn attempt(&self, job: Job<'_>) -> Attempt {
        self.alive.beat();
        let result = self.transaction(job);
        let label = match &result {
            Ok(_) => "committed",
            Err(e) => match e.class {
                ErrorClass::Transient => "transient_error",
                ErrorClass::Systemic => "systemic_error",
                ErrorClass::Record => "record_error",
            },
        };
        self.metrics.transaction(label, job.records());
        match result {
            Ok(result) => Attempt::Committed(result),
            Err(e) => match e.class {
                ErrorClass::Record => Attempt::Refused(e),
                ErrorClass::Transient => Attempt::BackOff(e),
                ErrorClass::Systemic => Attempt::Halt(e),
            },
        }
    }

    /// A job in one statement, which is its own transaction. A connection that reached a read-only
    /// standby is dropped, not pooled.
    fn transaction(&self, job: Job<'_>) -> Result<BatchResult, DbError> {
        let mut conn = self.pool.get()?;
        let rules = handlers::Rules {
            adopt_legacy_rows: self.adopt_legacy_rows,
            replaying_dead_letters: false,
        };
        let result = match job {
            Job::Apply(records) => handlers::apply_batch(conn.client(), records, rules),
            Job::StoreDeadLetter { work, rejected } => {
                handlers::store_dead_letter(conn.client(), work, rejected, rules)
            }
            Job::ReleaseParked(refs) => handlers::release_parked(conn.client(), refs, rules),
        };
        if result.as_ref().is_err_and(DbError::is_read_only) {
            conn.discard();
        }
        result
    }

    /// The systemic error a tripped circuit breaker halts with; a new trip is counted.
    fn breaker_error(&self, refusal: &DbError) -> DbError {
        let breaker = self.halt.breaker();
        if breaker.trip() {
            self.metrics.count_breaker_trip();
        }
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

    /// Logs and counts the end of every record of a committed job, and the outcome of every
    /// parked cancellation it released.
    fn log_result(&self, records: &[Work], result: &BatchResult) {
        self.halt.breaker().committed(result.outcomes.iter().map(is_refusal));
        logger::in_one_write(|| {
            let now_ms = chrono::Utc::now().timestamp_millis();
            for (work, end) in records.iter().zip(&result.outcomes) {
                observe::record_ended(&self.metrics, work, end, now_ms);
            }
            for (parked, end) in &result.released {
                observe::parked_released(&self.metrics, parked, end);
            }
        })
    }

    /// Waits out a transient failure before the next attempt.
    fn back_off(&self, error: &DbError, backoff: &mut Backoff, records: usize) -> Waited {
        let delay = backoff.next_delay();
        log::warn!(error = error.to_string(), attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64,
            records; "database unavailable; retrying the batch");
        self.wait(delay)
    }

    /// Halts the worker for a systemic failure, and waits before the next attempt.
    fn halt_and_wait(&self, error: &DbError, backoff: &mut Backoff) -> Waited {
        let delay = backoff.next_delay();
        self.halt.enter_counted(self.number, error, &self.metrics);
        self.wait(delay)
    }

    /// Waits before the next attempt; retrying is waiting by design, so it beats.
    fn wait(&self, delay: Duration) -> Waited {
        self.alive.beat();
        if self.shutdown.sleep(delay) {
            Waited::ShutDown
        } else {
            Waited::Retry
        }
    }
}

/// Whether an end is a record the database refused (what the circuit breaker counts).
fn is_refusal(end: &End) -> bool {
    matches!(end, End::DeadLettered(r) if r.reason == Reason::DatabaseRejected)
}
