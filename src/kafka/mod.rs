//! The Kafka side: a synchronous rdkafka `BaseConsumer` in a consumer group, one named thread per
//! assigned topic-partition reading that partition's split queue, and the rebalance handling that
//! starts and stops those threads and commits durable offsets.
//!
//! How the consumer works with librdkafka:
//! - a partition's queue is split in `pre_rebalance`, before `assign()`, or messages race onto the
//!   main queue;
//! - the main queue is still polled on its own thread: rebalances, commit results, statistics and
//!   errors arrive only there, and any message that arrives there is processed all the same;
//! - a split stays split for the life of the client, so each new assignment of a partition gets a
//!   new queue and a new thread;
//! - on revocation the partition threads are joined, in-flight records drained, and the durable
//!   watermark committed synchronously unless the assignment was lost.
//!
//! The files, in the data's order: `client.rs` (the client's properties, which `config` declares
//! in [`crate::config::kafka_properties`]), `topics.rs` (the table of topics, and waiting for them
//! at the start), `rebalance.rs` (the consumer's context: assignment, revocation, commits,
//! statistics), `start.rs` (`KAFKA_START_FROM`), `partition.rs` (the partition threads),
//! `record.rs` (headers, and the work a record becomes). This
//! file holds the [`Worker`]: its start, the poll loop and the final commit.

mod client;
mod partition;
mod rebalance;
mod record;
mod start;
mod topics;

pub use client::consumer_config;
pub use partition::{partition_thread_name, THREAD_NAME_MAX};
pub use rebalance::{broker_contact, ConsumerWiring, WorkerContext};
pub use record::{raw_headers, to_work};
pub use topics::TopicTable;

use crate::config::KafkaConfig;
use crate::health::Alive;
use crate::offsets::TopicPartition;
use crate::shutdown::Shutdown;
use crate::writer::Dispatcher;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

/// How long a poll of the main queue blocks before the loop looks at the shutdown flag, beats its
/// health and stores the durable offsets again.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The group member: the consumer, its context and the thread that polls its main queue.
pub struct Worker {
    consumer: Arc<BaseConsumer<WorkerContext>>,
    topics: TopicTable,
}

impl Worker {
    /// Creates the consumer and subscribes to the configured topics, once every one of them has
    /// partitions with leaders (so the first assignment covers them all).
    pub fn start(config: &KafkaConfig, dispatcher: Dispatcher, wiring: ConsumerWiring) -> Result<Worker, StartError> {
        let topics = TopicTable::from_config(config);
        let context = WorkerContext::new(topics.clone(), config.start_from, dispatcher, wiring);
        let consumer: BaseConsumer<WorkerContext> = consumer_config(config).create_with_context(context)?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        topics::ensure_topics(&consumer, &topics.topics());
        topics::wait_for_topics(&consumer, &topics.topics(), config.topic_wait)?;
        fail::fail_point!("subscribe");
        consumer.subscribe(&topics.topics())?;
        log::info!(brokers = config.brokers.as_str(), group_id = config.group_id.as_str(),
            topics = topics.topics().join(","); "subscribed");
        Ok(Worker { consumer, topics })
    }

    pub fn context(&self) -> &WorkerContext {
        self.consumer.context()
    }

    /// Polls the main queue until shutdown, storing durable offsets as they advance. On return the
    /// partition threads are stopped and this worker's channel senders are dropped.
    pub fn poll_until(self, shutdown: &Shutdown) -> Arc<BaseConsumer<WorkerContext>> {
        let wiring = &self.context().wiring;
        let alive = wiring.health.register("consumer-poll");
        while !shutdown.is_triggered() {
            fail::fail_point!("consumer-poll");
            wiring.health.beat();
            alive.beat();
            let (depth, bytes) = self
                .context()
                .lock()
                .dispatcher
                .as_ref()
                .map_or((0, 0), |d| (d.queued(), d.in_flight_bytes()));
            wiring.metrics.set_channel_depth(depth);
            wiring.metrics.set_in_flight_bytes(bytes);
            match self.consumer.poll(POLL_INTERVAL) {
                None => {}
                Some(Ok(message)) => self.stray_message(&message, shutdown, &alive),
                Some(Err(e)) => log::warn!(error = e.to_string(); "consumer error"),
            }
            self.store_progress();
        }
        log::info!("shutdown: stopping partition threads");
        let context = self.consumer.context();
        context.stop_all();
        context.lock().dispatcher = None;
        self.store_progress();
        self.consumer
    }

    /// A message on the main queue (a partition whose queue could not be split) is processed like
    /// any other, never dropped. Waiting for room in a writer's channel is idle by design: it beats.
    fn stray_message(&self, message: &BorrowedMessage<'_>, shutdown: &Shutdown, alive: &Alive) {
        let Some(kind) = self.topics.kind(message.topic()) else {
            log::error!(topic = message.topic(); "message from a topic that is not in the table of topics");
            return;
        };
        let tp = TopicPartition::new(message.topic(), message.partition());
        let Some(dispatcher) = self.context().lock().dispatcher.clone() else {
            return;
        };
        let work = to_work(message, kind, &tp, self.context().wiring.max_payload_bytes);
        dispatcher.dispatch(work, &|| {
            alive.beat();
            shutdown.is_triggered()
        });
    }

    fn store_progress(&self) {
        store(&self.consumer, &self.context().wiring.tracker.take_to_store());
    }
}

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("kafka client failed: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "topic(s) {} have no partitions with a leader after {waited_secs} s: create them, or let the broker \
         create them (KAFKA_ALLOW_AUTO_CREATE_TOPICS and the broker's auto.create.topics.enable)",
        .missing.join(", ")
    )]
    TopicsMissing { missing: Vec<String>, waited_secs: u64 },
}

/// Stores the durable watermarks, which librdkafka commits on its next automatic commit.
fn store(consumer: &BaseConsumer<WorkerContext>, offsets: &[(TopicPartition, i64)]) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, offset) in offsets {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        log::debug!(error = e.to_string(); "could not store offsets");
    }
}

/// After the writers have drained: commit every durable watermark synchronously.
pub fn commit_final(consumer: &BaseConsumer<WorkerContext>) {
    let tracker = &consumer.context().wiring.tracker;
    tracker.take_to_store();
    let assignment: Vec<TopicPartition> = match consumer.assignment() {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect(),
        Err(_) => Vec::new(),
    };
    rebalance::commit(consumer, &tracker.committable(&assignment));
}
