//! The running service: starts the worker's threads in the data's order (HTTP endpoint, database
//! and migrations, writers, housekeeping, consumer), runs until shutdown, and stops them in reverse
//! order, so that every record taken from Kafka is durable or redelivered.

use crate::config::{Config, DatabaseConfig, MigrateMode};
use crate::database::{Backoff, DbError, ErrorClass, Pool};
use crate::exit::ExitStatus;
use crate::halt::{self, Halt};
use crate::health::{Assignment, Health};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::readiness::{self, BrokerLink, DatabaseAnswers, DatabaseProbe, Readiness};
use crate::repository::{self, MigrateError};
use crate::shutdown::Shutdown;
use crate::writer::{WriterPool, WriterWiring};
use crate::{budget, handlers, http, kafka, notify, observe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the worker stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database cannot be used: {0}")]
    Database(DbError),
    #[error(
        "migration(s) {} pending and not applied by this worker ({reason}): run `booking-worker migrate` \
         as the owner of booking-management's tables, then start the worker again",
        pending.join(", ")
    )]
    MigrationPending { pending: Vec<String>, reason: String },
    #[error("kafka client failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    TopicsMissing(kafka::StartError),
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot serve METRICS_ADDR {addr}: {error}")]
    Http { addr: String, error: std::io::Error },
}

impl RunError {
    /// How the process ends for this failure.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            RunError::Database(_) => ExitStatus::Database,
            RunError::Kafka(_) => ExitStatus::Kafka,
            RunError::TopicsMissing(_) => ExitStatus::TopicsMissing,
            RunError::MigrationPending { .. } => ExitStatus::MigrationRefused,
            RunError::Thread(_) | RunError::Http { .. } => ExitStatus::Failure,
        }
    }
}

/// The state every stage shares.
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    halt: Arc<Halt>,
    assignment: Arc<Assignment>,
    broker: Arc<BrokerLink>,
    database: Arc<DatabaseAnswers>,
}

impl Shared {
    /// What `/readyz` reads.
    fn readiness(&self) -> Readiness {
        Readiness {
            database: Arc::clone(&self.database),
            broker: Arc::clone(&self.broker),
            assignment: Arc::clone(&self.assignment),
            halt: Arc::clone(&self.halt),
        }
    }
}

/// Runs the worker until `shutdown` is triggered, then drains, commits and returns.
pub fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    log::info!(
        brokers = config.kafka.brokers.as_str(), group_id = config.kafka.group_id.as_str(),
        group_protocol = config.kafka.group_protocol.as_str(),
        db_host = config.database.host.as_str(), db_name = config.database.name.as_str(),
        writers = config.pipeline.writers, batch_size = config.pipeline.batch_size;
        "booking-worker starting"
    );
    let pool = Pool::new(&config.database).map_err(RunError::Database)?;
    let shared = Shared {
        metrics: Metrics::new(),
        health: Health::new(),
        halt: Arc::new(Halt::new(config.pipeline.reject_halt_after)),
        assignment: Assignment::new(&kafka::TopicTable::from_config(&config.kafka).topics()),
        broker: BrokerLink::new(config.kafka.unreachable_ready_after),
        database: DatabaseAnswers::new(),
    };
    let probe = readiness::spawn_probe(
        database_probe(pool.clone()),
        Arc::clone(&shared.database),
        shutdown.clone(),
    )?;
    let endpoint = match serve_endpoint(&config, &shared, &shutdown) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            shutdown.trigger();
            join_named(probe);
            return Err(e);
        }
    };
    let notifier = spawn_notifier(&shared, &shutdown);
    let result = match wait_and_migrate(&pool, &shutdown, &config, &shared) {
        Ok(Startup::Migrated) => run_pipeline(&config, pool, shared, &shutdown).map(|()| Startup::Migrated),
        Ok(Startup::ShutDown) => {
            log::info!("shutdown before the database was reachable");
            Ok(Startup::ShutDown)
        }
        Err(e) => Err(e),
    };
    shutdown.trigger();
    if let Some(endpoint) = endpoint {
        if endpoint.stop().is_err() {
            log::error!(thread = "http"; "thread panicked");
        }
    }
    join_named(probe);
    if let Some(notifier) = notifier {
        join_named(notifier);
    }
    // The pipeline ran and stopped without an error.
    if let Ok(Startup::Migrated) = result {
        log::info!("booking-worker stopped cleanly");
    }
    result.map(drop)
}

/// Starts the `http` thread when `METRICS_ADDR` is not off.
fn serve_endpoint(config: &Config, shared: &Shared, shutdown: &Shutdown) -> Result<Option<http::Endpoint>, RunError> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let metrics = Arc::clone(&shared.metrics);
    let served = http::serve(
        addr,
        metrics,
        Arc::clone(&shared.health),
        shared.readiness(),
        shutdown.clone(),
    );
    served.map(Some).map_err(|error| RunError::Http {
        addr: addr.to_string(),
        error,
    })
}

/// Starts the `sd-notify` thread when systemd asked for notifications (`NOTIFY_SOCKET`). Its
/// readiness verdict is `/readyz`'s, read from memory. Without the thread the worker runs on;
/// under `Type=notify` systemd then stops it at `TimeoutStartSec` and starts it again.
fn spawn_notifier(shared: &Shared, shutdown: &Shutdown) -> Option<JoinHandle<()>> {
    let readiness = shared.readiness();
    let sources = notify::Sources {
        health: Arc::clone(&shared.health),
        halt: Arc::clone(&shared.halt),
        metrics: Arc::clone(&shared.metrics),
        readiness: Box::new(move || readiness.check()),
    };
    notify::spawn(sources, shutdown.clone())
        .inspect_err(|e| log::error!(error = e.to_string(); "could not start the sd-notify thread"))
        .ok()
        .flatten()
}

/// The readiness probe's question to the database: a connection from the pool answers a trivial
/// query.
fn database_probe(pool: Pool) -> DatabaseProbe {
    Box::new(move || {
        pool.get_timeout(readiness::PROBE_DEADLINE)
            .and_then(|mut c| repository::ping(c.client()))
            .map_err(|e| e.to_string())
    })
}

/// The writers, the housekeeping thread and the consumer, until shutdown; then the writers drain
/// before the consumer commits its last offsets.
fn run_pipeline(config: &Config, pool: Pool, shared: Shared, shutdown: &Shutdown) -> Result<(), RunError> {
    let tracker = OffsetTracker::new();
    let wiring = WriterWiring {
        pool: pool.clone(),
        tracker: tracker.clone(),
        metrics: Arc::clone(&shared.metrics),
        health: Arc::clone(&shared.health),
        halt: shared.halt,
        shutdown: shutdown.clone(),
        budget: budget::ByteBudget::new(config.pipeline.max_in_flight_bytes),
    };
    let (dispatcher, writers) = WriterPool::start(&config.pipeline, wiring)?;
    let housekeeping = spawn_housekeeping(
        pool,
        shutdown.clone(),
        config,
        Arc::clone(&shared.metrics),
        &shared.health,
    )?;
    let wiring = kafka::ConsumerWiring {
        tracker,
        metrics: shared.metrics,
        health: shared.health,
        assignment: shared.assignment,
        broker: shared.broker,
        max_payload_bytes: config.pipeline.max_payload_bytes,
        drain_timeout: config.pipeline.rebalance_drain_timeout,
    };
    let result = match kafka::Worker::start(&config.kafka, dispatcher, wiring) {
        Ok(worker) => consume_until_shutdown(worker, writers, shutdown),
        Err(e) => {
            // The dispatcher went with the failed start, so the writers drain and stop.
            shutdown.trigger();
            writers.join();
            Err(match e {
                kafka::StartError::Kafka(e) => RunError::Kafka(e),
                missing => RunError::TopicsMissing(missing),
            })
        }
    };
    shutdown.trigger();
    join_named(housekeeping);
    result
}

/// Polls on the `consumer-poll` thread until shutdown, drains the writers, then commits the
/// offsets of every durable record and closes the consumer.
fn consume_until_shutdown(worker: kafka::Worker, writers: WriterPool, shutdown: &Shutdown) -> Result<(), RunError> {
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
    Ok(())
}

/// How waiting for the database at the start ended.
enum Startup {
    /// The database answered and the worker's migrations are up to date.
    Migrated,
    /// Shutdown came before the database could be used.
    ShutDown,
}

/// Waits for the database and brings the worker's migrations up to date: applies them under
/// `DB_MIGRATE=auto`, or only checks that none is pending under `off`. A transient failure is
/// retried with backoff; a systemic one (a refused login, a missing grant or table) halts the
/// worker as it would mid-stream, `/readyz` naming it, and is retried until it clears.
fn wait_and_migrate(pool: &Pool, shutdown: &Shutdown, config: &Config, shared: &Shared) -> Result<Startup, RunError> {
    let mut backoff = Backoff::new(config.pipeline.retry_max_backoff);
    loop {
        match migrate_once(pool, &config.database) {
            Ok(applied) => {
                shared.halt.leave_counted(halt::AT_START, &shared.metrics);
                log::info!(applied = applied.join(","); "database ready; migrations up to date");
                return Ok(Startup::Migrated);
            }
            Err(MigrateError::Database(e)) => {
                let delay = backoff.next_delay();
                if e.is(ErrorClass::Transient) {
                    log::warn!(error = e.to_string(), attempt = backoff.attempts; "database not reachable yet; retrying");
                } else {
                    shared.halt.enter_counted(halt::AT_START, &e, &shared.metrics);
                }
                if shutdown.sleep(delay) {
                    return Ok(Startup::ShutDown);
                }
            }
            Err(MigrateError::NotAllowed { pending, error }) => {
                let reason = match config.database.migrate {
                    MigrateMode::Off => "DB_MIGRATE=off".to_string(),
                    MigrateMode::Auto => format!("the role may not change the schema: {error}"),
                };
                return Err(RunError::MigrationPending { pending, reason });
            }
        }
    }
}

/// One attempt at [`wait_and_migrate`], on a connection of its own that is closed afterwards.
fn migrate_once(pool: &Pool, config: &DatabaseConfig) -> Result<Vec<String>, MigrateError> {
    let mut conn = pool.get()?;
    conn.discard();
    if config.migrate == MigrateMode::Off {
        let pending = repository::pending(conn.client())?;
        if !pending.is_empty() {
            return Err(MigrateError::NotAllowed {
                pending,
                error: DbError::systemic(None, "DB_MIGRATE=off"),
            });
        }
        return Ok(Vec::new());
    }
    repository::migrate(conn.client(), config.migration_lock_timeout)
}

/// The `housekeeping` thread: expires parked cancellations into dead letters, keeps the parked
/// gauge current, and logs the periodic stats line. It beats at every turn of its loop.
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
        let mut next_expiry = Instant::now() + expiry_every;
        let mut next_stats = stats_every.map(|d| Instant::now() + d);
        while !shutdown.sleep(Duration::from_millis(500)) {
            alive.beat();
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

/// Expires parked cancellations into dead letters, a page per transaction (each committed page is
/// logged and counted), and sets the parked gauge.
fn expire_parked(pool: &Pool, ttl: Duration, metrics: &Metrics) {
    let result = pool.get().and_then(|mut conn| {
        handlers::expire_parked(conn.client(), ttl, &mut |page| observe::parked_expired(metrics, page))?;
        repository::parked_now(conn.client())
    });
    match result {
        Ok(parked) => metrics.set_parked(parked.count, parked.oldest_age_secs),
        Err(e) => log::warn!(error = e.to_string(); "could not expire parked cancellations; will retry"),
    }
}

fn join_named(handle: JoinHandle<()>) {
    let name = handle.thread().name().unwrap_or("thread").to_string();
    if handle.join().is_err() {
        log::error!(thread = name; "thread panicked");
    }
}
