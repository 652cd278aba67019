//! booking-worker: consumes booking and cancellation events from Apache Kafka and keeps the
//! `bookings` table of the shared PostgreSQL database in step, losing nothing and doubling nothing.
//!
//! [`run`] is the whole service; the binary only parses the command line, installs the signal
//! handler and maps the result to an exit code. Tests drive [`run`] with a [`Shutdown`] they
//! control.

pub mod allocator;
pub mod baggage;
pub mod commands;
pub mod config;
pub mod database;
pub mod handlers;
pub mod http;
pub mod kafka;
pub mod loadgen;
pub mod logger;
pub mod metrics;
pub mod models;
pub mod offsets;
pub mod repository;
pub mod shutdown;
pub mod writer;

use crate::config::Config;
use crate::database::{Backoff, DbError, Pool};
use crate::http::{Health, Readiness};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::shutdown::Shutdown;
use crate::writer::WriterPool;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the worker stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database cannot be used: {0}")]
    Database(DbError),
    #[error("kafka client failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot serve METRICS_ADDR {addr}: {error}")]
    Http { addr: String, error: std::io::Error },
}

impl RunError {
    /// The process exit code for this failure (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Database(_) => 3,
            RunError::Kafka(_) => 4,
            RunError::Thread(_) | RunError::Http { .. } => 1,
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
    let metrics = Metrics::new();
    let health = Health::new();
    let assigned = Arc::new(AtomicBool::new(false));
    let http = match config.metrics_addr {
        Some(addr) => {
            let readiness = Readiness {
                pool: pool.clone(),
                assigned: Arc::clone(&assigned),
            };
            let served = http::serve(
                addr,
                Arc::clone(&metrics),
                Arc::clone(&health),
                readiness,
                shutdown.clone(),
            );
            Some(served.map_err(|error| RunError::Http {
                addr: addr.to_string(),
                error,
            })?)
        }
        None => None,
    };
    let stop_http = |shutdown: &Shutdown| {
        shutdown.trigger();
        if let Some(handle) = http {
            join_named(handle);
        }
    };
    match wait_and_migrate(&pool, &shutdown, config.pipeline.retry_max_backoff) {
        Ok(true) => {}
        Ok(false) => {
            log::info!("shutdown before the database was reachable");
            stop_http(&shutdown);
            return Ok(());
        }
        Err(e) => {
            stop_http(&shutdown);
            return Err(e);
        }
    }

    let tracker = OffsetTracker::new();
    let (dispatcher, writers) = WriterPool::start(
        &config.pipeline,
        pool.clone(),
        tracker.clone(),
        Arc::clone(&metrics),
        Arc::clone(&health),
    )?;
    let housekeeping = spawn_housekeeping(pool.clone(), shutdown.clone(), &config, Arc::clone(&metrics), &health)?;

    let links = kafka::Links {
        tracker,
        metrics,
        health,
        assigned,
        max_payload_bytes: config.pipeline.max_payload_bytes,
        drain_timeout: config.pipeline.rebalance_drain_timeout,
    };
    let worker = match kafka::Worker::start(&config.kafka, dispatcher, links) {
        Ok(worker) => worker,
        Err(e) => {
            // The housekeeping thread runs until shutdown: trigger it before joining.
            shutdown.trigger();
            writers.join();
            join_named(housekeeping);
            stop_http(&shutdown);
            return Err(e.into());
        }
    };
    let poll_shutdown = shutdown.clone();
    let poller = std::thread::Builder::new()
        .name("consumer-poll".into())
        .spawn(move || worker.poll_until(&poll_shutdown))?;

    let consumer = poller.join();
    log::info!("shutdown: draining writers");
    writers.join();
    match consumer {
        Ok(consumer) => {
            kafka::commit_final(&consumer);
            log::info!("shutdown: closing the consumer");
            drop(consumer);
        }
        Err(_) => log::error!("consumer thread panicked; offsets since the last commit will be consumed again"),
    }
    join_named(housekeeping);
    stop_http(&shutdown);
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

/// The `housekeeping` thread: expires parked cancellations into dead letters, keeps the parked
/// gauge current, and logs the periodic stats line.
fn spawn_housekeeping(
    pool: Pool,
    shutdown: Shutdown,
    config: &Config,
    metrics: Arc<Metrics>,
    health: &Health,
) -> std::io::Result<JoinHandle<()>> {
    let ttl = config.pipeline.pending_cancellation_ttl;
    let expiry_every = config.pipeline.pending_check_interval;
    let stats_every = config.stats_log_interval;
    let alive = health.register("housekeeping");
    std::thread::Builder::new().name("housekeeping".into()).spawn(move || {
        let _alive = alive;
        let mut next_expiry = Instant::now() + expiry_every;
        let mut next_stats = stats_every.map(|d| Instant::now() + d);
        while !shutdown.sleep(Duration::from_millis(500)) {
            let now = Instant::now();
            if now >= next_expiry {
                next_expiry = now + expiry_every;
                expire_parked(&pool, ttl, &metrics);
            }
            if let (Some(due), Some(every)) = (next_stats, stats_every) {
                if now >= due {
                    next_stats = Some(now + every);
                    metrics.summary().log();
                }
            }
        }
    })
}

fn expire_parked(pool: &Pool, ttl: Duration, metrics: &Metrics) {
    let result = pool.get().map_err(DbError::from).and_then(|mut conn| {
        let expired = handlers::expire_parked(&mut conn, ttl)?;
        let parked = repository::count_parked(&mut conn)?;
        Ok((expired, parked))
    });
    match result {
        Ok((expired, parked)) => {
            metrics.set_parked(parked);
            metrics.record_expired(expired.len());
            for p in &expired {
                logger::with_event(writer::parked_scope(p), || {
                    log::warn!(outcome = "dead_lettered", reason = "cancellation_expired";
                        "parked cancellation expired; dead-lettered")
                });
            }
        }
        Err(e) => log::warn!(error = e.to_string(); "could not expire parked cancellations; will retry"),
    }
}

fn join_named(handle: JoinHandle<()>) {
    let name = handle.thread().name().unwrap_or("thread").to_string();
    if handle.join().is_err() {
        log::error!(thread = name; "thread panicked");
    }
}
