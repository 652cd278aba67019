//! booking-worker: consumes booking and cancellation events from Apache Kafka and keeps the
//! `bookings` table of the shared PostgreSQL database in step, losing nothing and doubling nothing.
//!
//! [`run`] is the whole service; the binary parses the command line, installs the signal handler
//! and maps the result to an exit code. The modules are listed in layers: each uses only those above
//! it (`tests/it/structure.rs` checks it), so there is no import cycle.
//!
//! # The data flow
//!
//! ```text
//!             Kafka (booking-events, booking-cancellations)
//!                  │ librdkafka fetches into per-partition queues (split in pre_rebalance)
//!    ┌─────────────┼──────────────────────────────┐
//!    ▼             ▼                              ▼
//! bk-events/<p>, cancels/<p>   (one thread per assigned partition: poll, read headers, decode,
//!    │                          validate; no I/O)
//!    │  bounded crossbeam channel per writer, one closed enum `Work` = Apply | Reject,
//!    │  routed by booking id so one booking's records stay in order; a full channel, or
//!    │  MAX_IN_FLIGHT_BYTES of payload in flight, blocks (back-pressure)
//!    ▼
//! writer-1 … writer-N   (batch up to BATCH_SIZE / BATCH_LINGER_MS; one statement per batch;
//!    │                   no new batch while the worker is halted)
//!    ▼
//! offset tracker (per-partition contiguous watermark of durable records)
//!    ▲
//! consumer-poll   (the main queue: rebalances, commit results, statistics, errors; stores the
//!                  watermarks; a message that still lands there is processed, never dropped)
//! housekeeping    (expires parked cancellations, logs the stats line)
//! ready-probe     (asks the database for /readyz, off the request path)
//! http-1 … http-3 (/metrics, /healthz, /readyz, answered from memory)
//! shutdown-timer  (exits 124 if a clean shutdown overruns SHUTDOWN_TIMEOUT_SECS)
//! sd-notify       (under systemd only: READY=1, STATUS=, STOPPING=1, and the watchdog's pings
//!                  while the writers, consumer-poll and housekeeping beat)
//! ```
//!
//! What one batch does, and the rules it keeps, is in `handlers`.
//!
//! # Invariants
//!
//! Each is stated as what never happens, with the module that keeps it.
//!
//! - **An offset is never committed before its record's end is durable in PostgreSQL.** A writer
//!   marks records durable only once their transaction has committed (`writer`); only the
//!   contiguous per-partition watermark of durable records is stored, as last durable + 1
//!   (`offsets`); the consumer runs with `enable.auto.offset.store=false`, and every explicit commit
//!   stores that watermark first, so an unassign never commits an older stored offset (`kafka`).
//! - **A booking id is never inserted twice, and a redelivery never changes anything.** Bookings are
//!   inserted `ON CONFLICT (external_id) DO NOTHING`; dead letters and parked cancellations are kept
//!   by topic, partition and offset (`handlers`, `repository`).
//! - **A record is never dropped silently.** Every consumed record reaches exactly one end, logged
//!   with an `end` field: `created`, `adopted`, `duplicate`, `cancelled`, `already_cancelled`,
//!   `parked`, `already_dead_lettered`, or `dead_lettered` with a reason (`pipeline`). No bad
//!   record stops the worker (`handlers`, `writer`).
//! - **A record already dead-lettered never applies on a replay of the log**; only
//!   `booking-worker dead-letters replay` applies it (`handlers`).
//! - **A transient database failure never advances an offset.** It is retried with capped, jittered
//!   backoff, forever; the channels fill and consumption pauses, while `consumer-poll` keeps polling
//!   so the group membership survives (`writer`).
//! - **A systemic database error never turns records into dead letters.** A renamed column, a
//!   revoked grant or a full disk (and any SQLSTATE the worker does not know) is systemic
//!   (`database`); the worker halts (`halt`) and the writer retries the same batch while its offsets
//!   stay where they are. A run of more than `DB_REJECT_HALT_AFTER` refused records halts the same
//!   way.
//! - **An error's class is never decided from the message text**, only from its SQLSTATE, since the
//!   text follows the server's `lc_messages` (`database`).
//! - **Two events for one booking id never race**, even across worker instances: each batch
//!   (one statement, its own transaction) takes an advisory lock per booking id, in sorted order,
//!   before touching them (`handlers`).
//! - **A cancellation that arrives before its booking is never lost**: it is parked and applied in
//!   the batch that creates the booking, or expires into a dead letter (`handlers`).
//! - **A cancellation never cancels another user's booking, and nothing but Accepted ever becomes
//!   Cancelled**; cancelling a cancelled booking changes nothing and is logged as a warning; every
//!   change sets `updated_at` (`handlers`).
//! - **A row the Go worker wrote is never duplicated by the switch-over**: the booking event that
//!   matches it adopts it (`handlers`).
//! - **The bytes of records in flight never exceed `MAX_IN_FLIGHT_BYTES`**, except a single record
//!   larger than the cap, which goes through alone (`budget`); parked cancellations are taken out in
//!   pages (`repository`).
//! - **A thread never dies silently.** A panic in any thread ends the process with exit 70, after
//!   one line naming the thread (`main`).
//! - **SQL never appears outside `repository`**: every statement is there, hand-written and
//!   parameterized.
//! - **Only `main` exits the process**, and it holds none of the worker's logic.
//!
//! # The stages, module by module
//!
//! ## kafka
//!
//! The consumer in its group, one thread per assigned partition (headers, decoding, hand-off to the
//! writers), the rebalance handling, the commits of the durable watermark, and the table of topics
//! (`TopicTable`).
//!
//! The client is `rdkafka` (librdkafka, bundled and built from source, with `libz`, `zstd` and
//! `ssl`), through its synchronous `BaseConsumer` and `BaseProducer` only. The `ssl` feature lets an
//! operator reach a secured cluster with TLS and SASL PLAIN, SCRAM or OAUTHBEARER through
//! `KAFKA_PROP_*` alone; Kerberos (GSSAPI) is not compiled in. `booking-worker check` uses the same
//! client settings.
//!
//! The consumer always runs with `enable.auto.offset.store=false`, `enable.auto.commit=true`,
//! `auto.offset.reset` from `KAFKA_START_FROM`, `allow.auto.create.topics` from
//! `KAFKA_ALLOW_AUTO_CREATE_TOPICS`, `group.protocol` from `KAFKA_GROUP_PROTOCOL` and
//! `topic.metadata.refresh.interval.ms=10000`; its fetch and buffer properties come from
//! `config`. A record batch that decompresses beyond `receive.message.max.bytes` cannot be read,
//! nor dead-lettered (librdkafka gives no offset with the error); it is logged at error level
//! with the remedy (`KAFKA_PROP_RECEIVE_MESSAGE_MAX_BYTES`).
//!
//! Headers are read without panicking: a header whose name is not UTF-8 is ignored (it cannot be
//! `Baggage`), and a `Baggage` value that is not UTF-8 is kept lossily and logged once at warn
//! level. A partition thread lets go of librdkafka's message (which pins its whole fetched batch)
//! before it waits for room in a channel.
//!
//! Topics and the first start. The worker subscribes only once every subscribed topic has
//! partitions with leaders, so the first assignment covers both topics. It asks the broker for each
//! topic's metadata once before subscribing: librdkafka's own subscription does not ask for
//! creation while the client knows no topic, and a broker with `auto.create.topics.enable=true`
//! answers the question by creating it. So with `KAFKA_ALLOW_AUTO_CREATE_TOPICS=true` a mistyped
//! `KAFKA_BOOKING_TOPIC` creates an empty topic and the worker waits on it quietly. With `false`, a
//! topic that does not exist stops the start after `KAFKA_TOPIC_WAIT_SECS` with exit 5, naming it.
//! A topic created later is picked up within seconds.
//!
//! Start position. A committed offset always wins. A partition without one starts at
//! `KAFKA_START_FROM`: `earliest`; `latest` (its end when it is assigned); or an RFC 3339 time (on
//! each assignment, the first record at or after it through the broker's offsets-for-times; a
//! partition with no record that recent starts at its end as it is then, and one whose look-up
//! fails starts at its earliest record rather than skip anything).
//!
//! Rebalances. Partition queues are split in `pre_rebalance`, before the assignment takes effect.
//! On revocation the partition threads are stopped and joined, in-flight records are drained
//! (bounded by `REBALANCE_DRAIN_TIMEOUT_SECS`), and the watermarks are stored and committed
//! synchronously unless the assignment was lost. The eager and the cooperative assignment
//! strategies work (`KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY=cooperative-sticky` for the latter),
//! and so does KIP-848's consumer protocol (`KAFKA_GROUP_PROTOCOL=consumer`), whose assignments are
//! incremental and whose session settings are the broker's (`group.consumer.*`).
//!
//! An idle partition thread sleeps until librdkafka says its queue has a record or it is told to
//! stop, so a revocation or a shutdown does not wait for it; the main queue's poll loop looks at the
//! shutdown flag every 250 ms.
//!
//! ## writer
//!
//! The writer threads: records off the bounded channels in batches, one statement (and so one
//! transaction and one round trip) per batch, what a failed batch does by its error's class, and
//! only then the records marked durable in `offsets`.
//! Records of one booking id always go to the same writer, so they are applied in the order they
//! were consumed. A transient error retries the same batch with backoff (from 50 ms, doubling up to
//! `RETRY_MAX_BACKOFF_MS`, with jitter). A systemic error halts the worker (`halt`). A record-class
//! refusal fails the batch's statement, so nothing of it is written, and its records are then
//! applied one by one, each in its own statement; a record still refused on its own is
//! dead-lettered as `database_rejected`. A writer retrying when SIGINT or SIGTERM comes
//! gives up, logs `shutdown while the database cannot take writes; these records are consumed again
//! on the next start` with the number of records, and stops; their offsets were never stored. A
//! writer writes a batch's log lines at once.
//!
//! ## halt
//!
//! While a writer is halted, no writer starts a new batch; the halted writer retries its batch with
//! the same backoff until it goes through. Offsets do not move, the channels fill and back-pressure
//! pauses consumption, while `consumer-poll` keeps polling, so no rebalance happens. Meanwhile
//! `/readyz` answers 503 with `halted: SQLSTATE xxxxx: message`, `booking_worker_halted` is 1,
//! `booking_worker_halts_total` counts the halt once, and one error line, `database cannot take the
//! worker's writes; halted: no new batches, offsets kept, retrying`, gives the `sqlstate`, the
//! `error`, `halted_secs` and a `remedy`, at most every 30 s. When the batch goes through the worker
//! logs `database takes the worker's writes again; resuming` and goes on; nothing needs restarting.
//! The same holds at start-up: a systemic error while the worker checks its migrations halts it
//! until the check goes through. Only a migration this worker may not apply stops the start (exit 7).
//!
//! The circuit breaker counts records the database refuses one after another, across batches and
//! writers; a record that reaches any other end resets the count. A run of refusals is itself
//! systemic (booking-management added a `NOT NULL` column, say): when a batch would make more than
//! `DB_REJECT_HALT_AFTER` refusals in a row it is rolled back whole, nothing of it is dead-lettered,
//! and the worker halts with the SQLSTATE of the last refusal and the error `N records in a row
//! refused by the database (DB_REJECT_HALT_AFTER=25); last: ...`. The batch goes through once the
//! schema is fixed. To dead-letter such records instead, raise `DB_REJECT_HALT_AFTER` (0 never
//! halts) and restart; the count lives in memory and starts at zero.
//!
//! ## metrics
//!
//! One `Metrics`, shared by every thread; the names are those of the README's list.
//! - `booking_worker_events_total{topic,outcome,reason}`: consumed records by end (`applied`,
//!   `adopted`, `duplicate`, `noop`, `parked`, `dead_lettered` with its `reason`).
//! - `booking_worker_processing_seconds{event_type}`: histogram from consume to durable.
//! - `booking_worker_end_to_end_seconds{event_type}`: histogram from the record's Kafka timestamp
//!   (the producer's, or the broker's for a topic with `LogAppendTime`) to durable, including lag.
//! - `booking_worker_db_transactions_total{result}`: one per attempt, `committed`,
//!   `transient_error`, `systemic_error` (also a batch held back by the circuit breaker) or
//!   `record_error`; `booking_worker_batch_size`: records per committed batch.
//! - `booking_worker_halted`, `booking_worker_halts_total` and
//!   `booking_worker_circuit_breaker_trips_total` (the halts the circuit breaker caused, each trip
//!   once however often its batch is retried): see `halt`.
//! - `booking_worker_consumer_lag{topic,partition}`: librdkafka's `consumer_lag_stored`.
//! - `booking_worker_dead_letters_total{reason}` (including expired parked cancellations and
//!   released unauthorized ones), `booking_worker_parked_cancellations` (waiting now, with
//!   `booking_worker_oldest_parked_age_seconds`, both as of the last expiry check) and
//!   `booking_worker_parked_outcomes_total{outcome,reason}` (what became of those that left the
//!   parking, with the words of their log lines).
//! - `booking_worker_channel_depth`, `booking_worker_in_flight_bytes`,
//!   `booking_worker_assigned_partitions`.
//! - `booking_worker_ready`, `booking_worker_kafka_brokers_up` (brokers the client holds a usable
//!   connection to) and `booking_worker_kafka_last_contact_age_seconds`, as of the scrape.
//! - the process metrics: `process_resident_memory_bytes`, CPU, open fds, threads,
//!   `process_start_time_seconds`.
//!
//! Every `STATS_LOG_INTERVAL_SECS` the `housekeeping` thread logs one line,
//! `{"msg":"stats","consumed":...,"applied":...,"noop":...,"parked":...,"dead_lettered":...,
//! "lag":...,"parked_now":...,"channel_depth":...,"partitions":...,"rss_bytes":...}`.
//!
//! ## http and health
//!
//! A small hand-written HTTP/1.0 responder on three named threads, `http-1` to `http-3`: one
//! request per connection, each with a 2 s deadline, so a stalled client holds one thread for at
//! most that long. An HTTP crate would start unnamed threads of its own. Every answer comes from
//! memory: `health` holds what the threads report (which long-running threads are alive, whether
//! the poll loop goes round, what the group assigned), and `readiness` the `ready-probe` thread's
//! last answer from the database. The same module holds the client of `booking-worker healthcheck`.
//!
//! ## notify
//!
//! Under systemd (`NOTIFY_SOCKET` set; otherwise no thread starts) the `sd-notify` thread tells the
//! service manager what `/readyz` knows: `READY=1` once, when it is first ready; a `STATUS=` line
//! whenever the text changes (`starting: …`, `consuming 8 partitions`, `halted: SQLSTATE 42501: …
//! (remedy)`, `not ready: …`, `draining: shutting down`); `STOPPING=1` at shutdown. It pings the
//! watchdog (`WATCHDOG_USEC`) every half interval only while every thread that beats (`health`'s
//! `Alive::beat`: each writer at each batch, idle second and retry, `consumer-poll` at each poll,
//! `housekeeping` at each turn) has beaten within the interval. Waiting is a beat too (an idle
//! channel, a halt, back-pressure), so only a thread stuck in one place stops the pings.
//!
//! ## service
//!
//! `run` starts the threads in the data's order (HTTP endpoint, database and migrations, writers,
//! housekeeping, consumer), runs until shutdown, and stops them in reverse order. One r2d2 pool of
//! `DB_POOL_SIZE` connections serves the writers (one each, per batch), the housekeeping thread's
//! expiry, the `ready-probe` thread and, at start-up, the migrations. Shutdown: the partition
//! threads stop and are joined, which closes the channels; the writers drain and finish their
//! transactions; the durable watermarks are stored and committed synchronously; the consumer closes.
//!
//! ## pipeline
//!
//! What travels between the stages: a consumed record (`RecordMeta`), the channels' one message
//! (`Work`: `Apply` or `Reject`), the end each record reaches (`Outcome`). It imports no stage.
//!
//! ## main
//!
//! Parses the command line, installs the logger, the panic hook and the signal handler (ctrlc, with
//! its `termination` feature), runs the command and exits with its `ExitStatus`. The panic hook,
//! rather than `panic = "abort"`, logs one JSON line naming the thread (`"thread":"writer-2"`, the
//! message and the place) through the JSON logger, then exits with 70, a code that means "restart
//! me", wherever the panic happened (a worker thread, or inside a librdkafka callback).

// The ground everything stands on: configuration, logs, memory, the shutdown latch.
pub mod config;

pub mod exit;

pub mod logger;

pub mod allocator;

pub mod shutdown;

// A consumed record: the event contract, its baggage, its offset.
pub mod models;

pub mod baggage;

pub mod offsets;

// What travels from the partition threads to the writers, and the state the threads share.
pub mod budget;

pub mod pipeline;

pub mod metrics;

// PostgreSQL: the client and its error classes, the halt, the health it feeds, the SQL.
pub mod database;

pub mod halt;

pub mod health;

pub mod readiness;

pub mod repository;

// The stages, in the data's order: handlers, the observer of each end, writers, the consumer; the
// HTTP endpoint and the service manager's notifications.
pub mod handlers;

pub mod observe;

pub mod writer;

pub mod kafka;

pub mod http;

pub mod notify;

// The whole service, the other commands, and the load generator.
pub mod service;

pub mod commands;

pub mod loadgen;

pub use service::{run, RunError};
