//! The writer pool: named threads that take records off bounded channels in batches, apply each
//! batch in one PostgreSQL transaction, and only then mark the records durable in the offset
//! tracker and release their bytes. What a failed batch does depends on the class of its error: a
//! transient one is retried with capped, jittered backoff; a systemic one halts the worker (see
//! [`crate::halt`]) while the same batch is retried; a record's own refusal sets that record apart
//! as a dead letter. The state machine that brings a batch to its end is in `writer/batch.rs`.
//!
//! Records of one booking id always go to the same writer, so they are applied in the order they
//! were consumed. Closing the channels (dropping every [`Dispatcher`]) drains and stops the pool.

mod batch;

use crate::budget::ByteBudget;
use crate::config::PipelineConfig;
use crate::database::Pool;
use crate::halt::Halt;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::pipeline::Work;
use crate::shutdown::Shutdown;
use batch::Processed;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
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

/// How often an idle writer beats while its channel stays empty.
const IDLE_BEAT: Duration = Duration::from_secs(1);

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
                alive: wiring.health.register(&name),
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
    /// Marks this writer dead for `/healthz` when the thread ends; beats at every turn of its
    /// loop, so that a writer stuck in one place stops the watchdog's pings.
    alive: crate::health::Alive,
    batch_size: usize,
    linger: Duration,
    max_backoff: Duration,
}

impl Writer {
    fn run(self) {
        let mut batch: Vec<Work> = Vec::with_capacity(self.batch_size);
        loop {
            self.alive.beat();
            self.halt.wait_until_running(&self.shutdown, &|| self.alive.beat());
            let Some(first) = self.next_record() else { break };
            batch.push(first);
            self.fill(&mut batch, Instant::now() + self.linger);
            if let Processed::Abandoned = self.process(&batch) {
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

    /// Fills the batch up to `BATCH_SIZE`: with what the channel holds, and, when that is not
    /// enough, with what came by `deadline`. The writer sleeps out the linger rather than waiting
    /// on the channel, so it wakes once per batch, not once per record (a sender wakes only a
    /// receiver that waits).
    fn fill(&self, batch: &mut Vec<Work>, deadline: Instant) {
        self.take_ready(batch);
        let now = Instant::now();
        if batch.len() < self.batch_size && deadline > now {
            std::thread::sleep(deadline - now);
            self.take_ready(batch);
        }
    }

    /// Takes the records already in the channel, up to `BATCH_SIZE`.
    fn take_ready(&self, batch: &mut Vec<Work>) {
        let room = self.batch_size.saturating_sub(batch.len());
        batch.extend(self.rx.try_iter().take(room));
    }

    /// Waits for the next record, beating while the channel stays empty (idle by design). `None`
    /// once the channel is closed and drained.
    fn next_record(&self) -> Option<Work> {
        loop {
            match self.rx.recv_timeout(IDLE_BEAT) {
                Ok(work) => return Some(work),
                Err(RecvTimeoutError::Timeout) => self.alive.beat(),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}
