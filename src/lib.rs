//! booking-worker: consumes booking and cancellation events from Apache Kafka and keeps the
//! `bookings` table of the shared PostgreSQL database in step, losing nothing and doubling nothing.
//!
//! [`run`] is the whole service; the binary only parses the command line, installs the signal
//! handler and maps the result to an exit code. Tests drive [`run`] with a [`Shutdown`] they
//! control.

pub mod baggage;
pub mod config;
pub mod database;
pub mod handlers;
pub mod kafka;
pub mod logger;
pub mod models;
pub mod offsets;
pub mod repository;
pub mod shutdown;
pub mod writer;

use crate::config::Config;
use crate::database::{Backoff, DbError, Pool};
use crate::offsets::OffsetTracker;
use crate::shutdown::Shutdown;
use crate::writer::WriterPool;
use std::thread::JoinHandle;
use std::time::Duration;

/// Why the worker stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database cannot be used: {0}")]
    Database(DbError),
    #[error("kafka client failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl RunError {
    /// The process exit code for this failure (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Database(_) => 3,
            RunError::Kafka(_) => 4,
            RunError::Thread(_) => 1,
        }
    }
}

/// Runs the worker until `shutdown` is triggered, then drains, commits and returns.
pub fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    log::info!(
        brokers = config.kafka.brokers.as_str(), group_id = config.kafka.group_id.as_str(),
        db_host = config.database.host.as_str(), db_name = config.database.name.as_str(),
        writers = config.pipeline.writers, batch_size = config.pipeline.batch_size;
        "booking-worker starting"
    );
    let pool = database::pool(&config.database);
    if !wait_and_migrate(&pool, &shutdown, config.pipeline.retry_max_backoff)? {
        log::info!("shutdown before the database was reachable");
        return Ok(());
    }

    let tracker = OffsetTracker::new();
    let (dispatcher, writers) = WriterPool::start(&config.pipeline, pool.clone(), tracker.clone())?;
    let expiry = spawn_expiry(pool.clone(), shutdown.clone(), &config)?;

    let worker = match kafka::Worker::start(
        &config.kafka,
        dispatcher,
        tracker,
        config.pipeline.max_payload_bytes,
        config.pipeline.rebalance_drain_timeout,
    ) {
        Ok(worker) => worker,
        Err(e) => {
            shutdown.trigger();
            writers.join();
            join_named(expiry);
            return Err(e.into());
        }
    };
    let poll_shutdown = shutdown.clone();
    let poller = std::thread::Builder::new()
        .name("consumer-poll".into())
        .spawn(move || worker.poll_until(&poll_shutdown))?;

    let consumer = match poller.join() {
        Ok(consumer) => consumer,
        Err(_) => {
            log::error!("consumer thread panicked");
            shutdown.trigger();
            writers.join();
            join_named(expiry);
            return Ok(());
        }
    };
    log::info!("shutdown: draining writers");
    writers.join();
    kafka::commit_final(&consumer);
    log::info!("shutdown: closing the consumer");
    drop(consumer);
    join_named(expiry);
    log::info!("booking-worker stopped cleanly");
    Ok(())
}

/// Waits for the database (retrying with backoff) and applies the worker's migrations. Returns
/// false when shutdown came first.
fn wait_and_migrate(pool: &Pool, shutdown: &Shutdown, max_backoff: Duration) -> Result<bool, RunError> {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        let result = pool
            .get()
            .map_err(DbError::from)
            .and_then(|mut conn| repository::migrate(&mut conn));
        match result {
            Ok(applied) => {
                log::info!(applied = format!("{applied:?}"); "database ready; migrations applied");
                return Ok(true);
            }
            Err(DbError::Transient(error)) => {
                let delay = backoff.next_delay();
                log::warn!(error = error, attempt = backoff.attempts; "database not reachable yet; retrying");
                if shutdown.sleep(delay) {
                    return Ok(false);
                }
            }
            Err(permanent) => return Err(RunError::Database(permanent)),
        }
    }
}

/// The thread that dead-letters parked cancellations whose booking never came.
fn spawn_expiry(pool: Pool, shutdown: Shutdown, config: &Config) -> std::io::Result<JoinHandle<()>> {
    let ttl = config.pipeline.pending_cancellation_ttl;
    let interval = config.pipeline.pending_check_interval;
    std::thread::Builder::new().name("parked-expiry".into()).spawn(move || {
        while !shutdown.sleep(interval) {
            let result = pool
                .get()
                .map_err(DbError::from)
                .and_then(|mut conn| handlers::expire_parked(&mut conn, ttl));
            match result {
                Ok(expired) => {
                    for parked in &expired {
                        logger::with_event(writer::parked_scope(parked), || {
                            log::warn!(end = "dead_lettered", reason = "cancellation_expired";
                                    "parked cancellation expired; dead-lettered")
                        });
                    }
                }
                Err(e) => log::warn!(error = e.to_string(); "could not expire parked cancellations; will retry"),
            }
        }
    })
}

fn join_named(handle: JoinHandle<()>) {
    let name = handle.thread().name().unwrap_or("thread").to_string();
    if handle.join().is_err() {
        log::error!(thread = name; "thread panicked");
    }
}
