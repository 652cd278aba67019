//! The systemic halt: the state the writers share when the database is not what the worker needs
//! (a renamed column, a revoked grant, a full disk), and the circuit breaker that turns a run of
//! refused records into such a halt.
//!
//! While halted, no writer starts a new batch; the halted ones retry theirs until it goes through.
//! Offsets do not move, the channels fill, and back-pressure pauses consumption while the group
//! membership is kept. `/readyz` reports the SQLSTATE, and one ERROR line with the remedy is logged
//! at most every [`LOG_EVERY`].

use crate::database::{remedy, DbError};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest silence between two ERROR lines of one halt.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// The start-up's own place in the halt, beside the writers' numbers: its check of the database
/// and its migrations, before any record is read.
pub const AT_START: usize = usize::MAX;

/// Why the worker is halted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub sqlstate: Option<String>,
    pub message: String,
    pub since: Instant,
}

impl Cause {
    /// The short reason `/readyz` gives.
    pub fn reason(&self) -> String {
        match &self.sqlstate {
            Some(code) => format!("halted: SQLSTATE {code}: {}", self.message),
            None => format!("halted: {}", self.message),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The cause of each halted writer, by writer number.
    writers: HashMap<usize, Cause>,
    last_log: Option<Instant>,
}

/// What a change of the halt means for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The worker was running and is halted now.
    Halted,
    /// The last halted writer went through: the worker runs again.
    Resumed,
    /// Nothing changed for the worker as a whole.
    Unchanged,
}

/// The halt shared by every writer, `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct Halt {
    state: Mutex<State>,
    resumed: Condvar,
    breaker: Breaker,
}

impl Halt {
    pub fn new(reject_halt_after: u32) -> Halt {
        Halt {
            breaker: Breaker::new(reject_halt_after),
            ..Halt::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Writer `writer` cannot get its batch through because of `error`. Logs the ERROR line when
    /// the last one is older than [`LOG_EVERY`].
    pub fn enter(&self, writer: usize, error: &DbError) -> Transition {
        let mut state = self.lock();
        let was_running = state.writers.is_empty();
        let since = state.writers.get(&writer).map_or_else(Instant::now, |c| c.since);
        state.writers.insert(
            writer,
            Cause {
                sqlstate: error.sqlstate.clone(),
                message: error.message.clone(),
                since,
            },
        );
        if state.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            state.last_log = Some(Instant::now());
            log::error!(sqlstate = error.sqlstate.as_deref().unwrap_or(""), error = error.message.as_str(),
                halted_secs = since.elapsed().as_secs(), remedy = remedy(error.sqlstate.as_deref());
                "database cannot take the worker's writes; halted: no new batches, offsets kept, retrying");
        }
        if was_running {
            Transition::Halted
        } else {
            Transition::Unchanged
        }
    }

    /// Writer `writer` got its batch through.
    pub fn leave(&self, writer: usize) -> Transition {
        let mut state = self.lock();
        let Some(cause) = state.writers.remove(&writer) else {
            return Transition::Unchanged;
        };
        if !state.writers.is_empty() {
            return Transition::Unchanged;
        }
        state.last_log = None;
        log::info!(halted_secs = cause.since.elapsed().as_secs(), sqlstate = cause.sqlstate.as_deref().unwrap_or("");
            "database takes the worker's writes again; resuming");
        self.resumed.notify_all();
        Transition::Resumed
    }

    /// [`Halt::enter`], then the metrics: one halt more when the worker was running, and the
    /// gauge as the halt stands after this change, whatever others changed meanwhile.
    pub fn enter_counted(&self, who: usize, error: &DbError, metrics: &Metrics) {
        if self.enter(who, error) == Transition::Halted {
            metrics.count_halt();
        }
        metrics.set_halted(self.cause().is_some());
    }

    /// [`Halt::leave`], then the gauge when the worker runs again.
    pub fn leave_counted(&self, who: usize, metrics: &Metrics) {
        if self.leave(who) == Transition::Resumed {
            metrics.set_halted(self.cause().is_some());
        }
    }

    /// The cause of the halt, if the worker is halted.
    pub fn cause(&self) -> Option<Cause> {
        let state = self.lock();
        state.writers.values().min_by_key(|c| c.since).cloned()
    }

    /// Blocks while another writer is halted (a writer takes no new batch then), calling `beat`
    /// at every wake (at least every 200 ms): waiting out a halt is idle by design. Returns early
    /// on shutdown.
    pub fn wait_until_running(&self, shutdown: &Shutdown, beat: &dyn Fn()) {
        let mut state = self.lock();
        while !state.writers.is_empty() && !shutdown.is_triggered() {
            beat();
            state = self
                .resumed
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Counts consecutive records refused by the database. Past the limit the cause is systemic
/// (booking-management added a NOT NULL column, say), so the worker halts rather than
/// dead-letter the whole stream.
#[derive(Debug, Default)]
pub struct Breaker {
    limit: u32,
    consecutive: AtomicU32,
    /// Tripped, and no record has gone through since.
    open: AtomicBool,
}

impl Breaker {
    /// A breaker that trips past `limit` consecutive refusals; zero never trips.
    pub fn new(limit: u32) -> Breaker {
        Breaker {
            limit,
            consecutive: AtomicU32::new(0),
            open: AtomicBool::new(false),
        }
    }

    /// Whether a batch whose records end in `refused` order (true: refused by the database) may
    /// commit: it may not when, counting from the refusals already in a row, more than the limit
    /// would be dead-lettered in a row.
    pub fn allows(&self, refused: impl Iterator<Item = bool>) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut run = self.consecutive.load(Ordering::SeqCst);
        for r in refused {
            run = if r { run + 1 } else { 0 };
            if run > self.limit {
                return false;
            }
        }
        true
    }

    /// A batch with these ends committed.
    pub fn committed(&self, refused: impl Iterator<Item = bool>) {
        for r in refused {
            if r {
                self.consecutive.fetch_add(1, Ordering::SeqCst);
            } else {
                self.consecutive.store(0, Ordering::SeqCst);
                self.open.store(false, Ordering::SeqCst);
            }
        }
    }

    /// The breaker refused a batch or a dead letter: true when that is a new trip, false while it
    /// is still open from the last one (the refused batch is retried, and refused again, until a
    /// record goes through).
    pub fn trip(&self) -> bool {
        !self.open.swap(true, Ordering::SeqCst)
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Refusals in a row so far.
    pub fn consecutive(&self) -> u32 {
        self.consecutive.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::database::ErrorClass;

    fn error(code: &str) -> DbError {
        DbError {
            class: ErrorClass::Systemic,
            sqlstate: Some(code.into()),
            message: "column \"payment_id\" does not exist".into(),
        }
    }

    #[test]
    fn the_worker_is_halted_while_any_writer_is() {
        let halt = Halt::new(25);
        assert_eq!(halt.cause(), None);
        assert_eq!(halt.enter(1, &error("42703")), Transition::Halted);
        assert_eq!(halt.enter(2, &error("42703")), Transition::Unchanged);
        assert_eq!(
            halt.enter(1, &error("42703")),
            Transition::Unchanged,
            "a retry is no new halt"
        );
        let cause = halt.cause().unwrap();
        assert_eq!(cause.sqlstate.as_deref(), Some("42703"));
        assert!(
            cause.reason().starts_with("halted: SQLSTATE 42703: column"),
            "{}",
            cause.reason()
        );
        assert_eq!(halt.leave(1), Transition::Unchanged);
        assert!(halt.cause().is_some());
        assert_eq!(halt.leave(2), Transition::Resumed);
        assert_eq!(halt.leave(2), Transition::Unchanged);
        assert_eq!(halt.cause(), None);
    }

    #[test]
    fn a_waiting_writer_goes_on_when_the_halt_ends() {
        let halt = std::sync::Arc::new(Halt::new(25));
        halt.enter(1, &error("42501"));
        let waiter = {
            let halt = std::sync::Arc::clone(&halt);
            std::thread::spawn(move || {
                let beats = AtomicU32::new(0);
                halt.wait_until_running(&Shutdown::new(), &|| {
                    beats.fetch_add(1, Ordering::SeqCst);
                });
                beats.into_inner()
            })
        };
        std::thread::sleep(Duration::from_millis(450));
        assert!(
            !waiter.is_finished(),
            "a writer starts no batch while another is halted"
        );
        halt.leave(1);
        let beats = waiter.join().unwrap();
        assert!(beats >= 2, "the waiting writer beats while it waits: {beats}");
    }

    #[test]
    fn the_breaker_trips_past_its_limit_of_refusals_in_a_row() {
        let b = Breaker::new(3);
        assert!(b.allows([true, true, true].into_iter()));
        assert!(!b.allows([true, true, true, true].into_iter()));
        assert!(b.allows([true, true, false, true, true, true].into_iter()));
        b.committed([true, true].into_iter());
        assert_eq!(b.consecutive(), 2);
        assert!(b.allows([true].into_iter()));
        assert!(!b.allows([true, true].into_iter()), "the run goes on across batches");
        b.committed([false].into_iter());
        assert_eq!(b.consecutive(), 0);
        assert!(
            Breaker::new(0).allows(std::iter::repeat_n(true, 1000)),
            "zero never trips"
        );
    }

    #[test]
    fn a_trip_is_new_only_after_a_record_went_through() {
        let b = Breaker::new(1);
        assert!(b.trip());
        assert!(!b.trip(), "a retry of the refused batch is the same trip");
        b.committed([true].into_iter());
        assert!(!b.trip(), "a refused record does not close the breaker");
        b.committed([false].into_iter());
        assert!(b.trip(), "a record went through: the next refusal is a new trip");
    }
}
