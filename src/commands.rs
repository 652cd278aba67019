//! The operator commands besides `run`: `check`, `migrate`, `dead-letters list`,
//! `dead-letters replay` and `healthcheck`. Each returns an [`ExitStatus`]; only `main` exits.

use crate::config::Config;
use crate::database::{DbError, ErrorClass, Pool};
use crate::handlers;
use crate::http;
use crate::kafka::{self, TopicTable};
use crate::models::EventKind;
use crate::models::{Reason, Rejection};
use crate::offsets::TopicPartition;
use crate::pipeline::{End, RecordMeta, Work};
use crate::repository::{self, DeadLetterFilter, MigrateError, StoredDeadLetter};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

pub use crate::exit::ExitStatus;

/// `check`: the configuration is valid (it was parsed), the database answers and has
/// booking-management's tables, the broker answers, and the topics exist. Logs one line per check
/// and returns the first failure.
pub fn check(config: &Config) -> ExitStatus {
    log::info!(check = "config"; "configuration is valid");
    let db = Pool::new(&config.database)
        .and_then(|pool| pool.get())
        .and_then(|mut c| repository::missing_shared_tables(c.client()));
    let mut status = ExitStatus::Ok;
    match db {
        Ok(missing) if missing.is_empty() => {
            log::info!(check = "database", host = config.database.host.as_str(); "database reachable")
        }
        Ok(missing) => {
            log::error!(check = "database", missing = missing.join(","); "database reachable, but tables are missing");
            status = ExitStatus::Database;
        }
        Err(e) => {
            log::error!(check = "database", error = e.to_string(); "database not reachable");
            status = ExitStatus::Database;
        }
    }

    // The worker's own client settings, KAFKA_PROP_* (TLS, SASL) included; a check creates no topic.
    let consumer: Result<BaseConsumer, _> = kafka::consumer_config(&config.kafka)
        .set("allow.auto.create.topics", "false")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg)
        .create();
    let metadata = consumer.and_then(|c| c.fetch_metadata(None, Duration::from_secs(10)));
    match metadata {
        Err(e) => {
            log::error!(check = "kafka", brokers = config.kafka.brokers.as_str(), error = e.to_string();
                "broker not reachable");
            if status == ExitStatus::Ok {
                status = ExitStatus::Kafka;
            }
        }
        Ok(metadata) => {
            log::info!(check = "kafka", brokers = metadata.brokers().len(); "broker reachable");
            let table = TopicTable::from_config(&config.kafka);
            let missing: Vec<&str> = table
                .topics()
                .into_iter()
                .filter(|t| {
                    !metadata
                        .topics()
                        .iter()
                        .any(|m| m.name() == *t && !m.partitions().is_empty())
                })
                .collect();
            if missing.is_empty() {
                log::info!(check = "topics", topics = table.topics().join(","); "topics present");
            } else {
                log::error!(check = "topics", missing = missing.join(","); "topics missing");
                if status == ExitStatus::Ok {
                    status = ExitStatus::TopicsMissing;
                }
            }
        }
    }
    status
}

/// `migrate`: applies the worker's own migrations, online (see the README's "Migrations").
pub fn migrate(config: &Config) -> ExitStatus {
    let result = Pool::new(&config.database)
        .and_then(|pool| pool.get())
        .map_err(MigrateError::Database)
        .and_then(|mut conn| {
            conn.discard();
            repository::migrate(conn.client(), config.database.migration_lock_timeout)
        });
    match result {
        Ok(applied) => {
            log::info!(applied = applied.join(","); "migrations applied");
            ExitStatus::Ok
        }
        Err(MigrateError::NotAllowed { pending, error }) => {
            log::error!(pending = pending.join(","), error = error.to_string();
                "this role may not change the schema: run `booking-worker migrate` as the owner of booking-management's tables");
            ExitStatus::MigrationRefused
        }
        Err(MigrateError::Database(e)) => {
            log::error!(error = e.to_string(); "migration failed");
            ExitStatus::Database
        }
    }
}

/// Which dead letters a `dead-letters` command works on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub id: Option<i64>,
    pub reason: Option<String>,
    pub include_replayed: bool,
    pub limit: i64,
}

fn select(config: &Config, selection: &Selection) -> Result<Vec<StoredDeadLetter>, DbError> {
    if let Some(reason) = &selection.reason {
        if Reason::parse(reason).is_none() {
            let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            return Err(DbError::systemic(
                None,
                format!("unknown reason {reason:?}; the reasons are {}", codes.join(", ")),
            ));
        }
    }
    let mut conn = Pool::new(&config.database)?.get()?;
    let filter = DeadLetterFilter {
        id: selection.id,
        reason: selection.reason.as_deref(),
        include_replayed: selection.include_replayed,
        limit: selection.limit,
    };
    repository::list_dead_letters(conn.client(), &filter)
}

/// `dead-letters list`: one JSON object per dead letter on stdout, newest first.
pub fn list_dead_letters(config: &Config, selection: &Selection, out: &mut dyn std::io::Write) -> ExitStatus {
    match select(config, selection) {
        Ok(rows) => {
            for row in &rows {
                let line = serde_json::json!({
                    "id": row.id,
                    "created_at": row.created_at.to_rfc3339(),
                    "reason": row.reason,
                    "error": row.error,
                    "sqlstate": row.sqlstate,
                    "topic": row.record.topic,
                    "partition": row.record.kafka_partition,
                    "offset": row.record.kafka_offset,
                    "booking_id": row.booking_id,
                    "baggage": row.record.baggage,
                    "key": row.record.record_key.as_deref().map(String::from_utf8_lossy),
                    "payload": String::from_utf8_lossy(&row.record.payload[..row.record.payload.len().min(4096)]),
                    "payload_bytes": row.record.payload.len(),
                    "replayed_at": row.replayed_at.map(|t| t.to_rfc3339()),
                });
                if writeln!(out, "{line}").is_err() {
                    return ExitStatus::Failure;
                }
            }
            log::info!(count = rows.len(); "dead letters listed");
            ExitStatus::Ok
        }
        Err(e) => {
            log::error!(error = e.to_string(); "could not list dead letters");
            ExitStatus::Database
        }
    }
}

/// Applies one dead letter again, on purpose, and marks it replayed or notes its new failure.
fn replay_one(pool: &Pool, config: &Config, row: &StoredDeadLetter, kind: EventKind) -> Result<Option<End>, DbError> {
    let meta = RecordMeta {
        tp: TopicPartition::new(&row.record.topic, row.record.kafka_partition),
        offset: row.record.kafka_offset,
        key: row.record.record_key.clone(),
        payload: row.record.payload.clone(),
        baggage: row.record.baggage.clone(),
        received_at: Instant::now(),
        produced_at_ms: None,
    };
    let work = match kind.decode(&meta.payload, config.pipeline.max_payload_bytes) {
        Ok(event) => Work::Apply { meta, event },
        Err(rejection) => Work::Reject { meta, rejection },
    };
    let mut conn = pool.get()?;
    let rules = handlers::Rules {
        adopt_legacy_rows: config.pipeline.adopt_legacy_rows,
        replaying_dead_letters: true,
    };
    let outcome = match handlers::apply_batch(conn.client(), std::slice::from_ref(&work), rules) {
        Ok(result) => {
            release_parked(conn.client(), result.more_parked, rules)?;
            result.outcomes.into_iter().next()
        }
        // The database refused the record for its own values: it stays a dead letter, with why.
        Err(e) if e.is(ErrorClass::Record) => {
            Some(End::DeadLettered(Rejection::refused(e.sqlstate.as_deref(), e.message)))
        }
        Err(e) => return Err(e),
    };
    match &outcome {
        Some(End::DeadLettered(r)) => {
            let sqlstate = r.sqlstate.as_deref();
            repository::note_replay_failure(conn.client(), row.id, r.reason.as_str(), &r.error, sqlstate)?
        }
        Some(End::AlreadyDeadLettered) | None => {}
        Some(_) => repository::mark_replayed(conn.client(), row.id)?,
    }
    Ok(outcome)
}

/// `dead-letters replay`: runs each selected dead letter through the same handling again. One that
/// now reaches another end is marked replayed; one that still fails keeps its row, with the new
/// reason and error.
pub fn replay_dead_letters(config: &Config, selection: &Selection) -> ExitStatus {
    let rows = match select(config, selection) {
        Ok(rows) => rows,
        Err(e) => {
            log::error!(error = e.to_string(); "could not read dead letters");
            return ExitStatus::Database;
        }
    };
    let table = TopicTable::from_config(&config.kafka);
    let pool = match Pool::new(&config.database) {
        Ok(pool) => pool,
        Err(e) => {
            log::error!(error = e.to_string(); "database cannot be used");
            return ExitStatus::Database;
        }
    };
    let (mut replayed, mut failing) = (0usize, 0usize);
    for row in rows.iter().filter(|r| r.replayed_at.is_none()) {
        let Some(kind) = table.kind(&row.record.topic) else {
            log::error!(id = row.id, topic = row.record.topic.as_str();
                "dead letter from a topic that is not configured; set KAFKA_*_TOPIC to replay it");
            failing += 1;
            continue;
        };
        match replay_one(&pool, config, row, kind) {
            Ok(Some(End::DeadLettered(r))) => {
                failing += 1;
                log::warn!(id = row.id, reason = r.reason.as_str(), error = r.error.as_str(); "still failing");
            }
            Ok(Some(End::AlreadyDeadLettered)) | Ok(None) => {
                failing += 1;
                log::warn!(id = row.id; "still failing: the booking has not arrived");
            }
            Ok(Some(outcome)) => {
                replayed += 1;
                log::info!(id = row.id, end = outcome.as_str(); "dead letter replayed");
            }
            Err(e) => {
                log::error!(id = row.id, error = e.to_string(); "database error; nothing changed");
                return ExitStatus::Database;
            }
        }
    }
    log::info!(replayed, still_failing = failing; "replay finished");
    if failing > 0 {
        ExitStatus::StillFailing
    } else {
        ExitStatus::Ok
    }
}

/// Releases, a page per transaction, the parked cancellations a replayed booking left (it had
/// more than one page of them).
fn release_parked(conn: &mut postgres::Client, mut refs: Vec<String>, rules: handlers::Rules) -> Result<(), DbError> {
    while !refs.is_empty() {
        let page: Vec<&str> = refs.iter().map(String::as_str).collect();
        let result = handlers::release_parked(conn, &page, rules)?;
        let progress = result.released.iter().any(|(_, o)| *o != End::Parked);
        log::info!(released = result.released.len(); "parked cancellations of a replayed booking released");
        refs = if progress { result.more_parked } else { Vec::new() };
    }
    Ok(())
}

/// `healthcheck`: 0 when `/healthz` answers 200, for Docker's HEALTHCHECK.
pub fn healthcheck(config: &Config) -> ExitStatus {
    let Some(addr) = config.metrics_addr else {
        eprintln!("booking-worker healthcheck: METRICS_ADDR is off, so there is no endpoint to ask");
        return ExitStatus::Failure;
    };
    match http::get_status(&addr.to_string(), "/healthz", Duration::from_secs(3)) {
        Ok(200) => ExitStatus::Ok,
        Ok(code) => {
            eprintln!("booking-worker healthcheck: /healthz answered {code}");
            ExitStatus::Failure
        }
        Err(e) => {
            eprintln!("booking-worker healthcheck: {addr}: {e}");
            ExitStatus::Failure
        }
    }
}
