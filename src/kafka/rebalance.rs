//! The consumer's context: the callbacks librdkafka makes on the thread that polls the main queue.
//! Rebalances start and stop the partition threads (the order of each step is in the `kafka`
//! module docs); commit results, statistics (lag, broker contact) and client errors are reported.

use super::partition::{stop_threads, PartitionReader, PartitionThread};
use super::start::position_at_time;
use super::topics::TopicTable;
use crate::config::StartFrom;
use crate::health::{Assignment, Health};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::readiness::BrokerLink;
use crate::writer::Dispatcher;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What the context guards: where the partition threads send records, and the threads running.
pub(super) struct State {
    /// Where the partition threads send their records; `None` once the consumer is closing.
    pub(super) dispatcher: Option<Dispatcher>,
    pub(super) partitions: HashMap<TopicPartition, PartitionThread>,
}

/// The consumer's context: it owns the partition threads and reacts to rebalances.
pub struct WorkerContext {
    /// The consumer this is the context of, once created: splitting a partition's queue needs it.
    pub(super) consumer: OnceLock<Weak<BaseConsumer<WorkerContext>>>,
    topics: TopicTable,
    start_from: StartFrom,
    state: Mutex<State>,
    pub(super) wiring: ConsumerWiring,
}

/// What the consumer shares with the rest of the worker.
pub struct ConsumerWiring {
    pub tracker: Arc<OffsetTracker>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The topics this instance holds partitions of (for `/readyz`).
    pub assignment: Arc<Assignment>,
    /// What the client last heard from its brokers (for `/readyz` and the metrics).
    pub broker: Arc<BrokerLink>,
    pub max_payload_bytes: usize,
    pub drain_timeout: Duration,
}

impl WorkerContext {
    pub(super) fn new(
        topics: TopicTable,
        start_from: StartFrom,
        dispatcher: Dispatcher,
        wiring: ConsumerWiring,
    ) -> WorkerContext {
        WorkerContext {
            consumer: OnceLock::new(),
            topics,
            start_from,
            state: Mutex::new(State {
                dispatcher: Some(dispatcher),
                partitions: HashMap::new(),
            }),
            wiring,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut state = self.lock();
        let Some(dispatcher) = state.dispatcher.clone() else {
            // Shutting down: the consumer is closing (its last polls, in rdkafka's drop, can still
            // deliver an assignment). Nothing is consumed or stored for these partitions, and the
            // revocation that follows commits nothing for them.
            log::info!(partitions = tpl.count(); "partitions assigned while the consumer closes; left to the group");
            return;
        };
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            log::error!("rebalance before the consumer was ready; partitions fall back to the main queue");
            return;
        };
        for elem in tpl.elements() {
            let tp = TopicPartition::new(elem.topic(), elem.partition());
            let Some(thread) = self.start_partition(&consumer, &dispatcher, &tp) else {
                continue;
            };
            if let Some(old) = state.partitions.insert(tp, thread) {
                stop_threads(vec![old]);
            }
            log::info!(topic = elem.topic(), partition = elem.partition(); "partition assigned");
        }
        self.note_assignment(&state.partitions);
    }

    /// Splits a newly assigned partition's queue and starts its thread; `None`, logged, when the
    /// topic is unknown or either step fails.
    fn start_partition(
        &self,
        consumer: &Arc<BaseConsumer<WorkerContext>>,
        dispatcher: &Dispatcher,
        tp: &TopicPartition,
    ) -> Option<PartitionThread> {
        let Some(kind) = self.topics.kind(&tp.topic) else {
            log::error!(topic = tp.topic.as_ref(); "assigned a topic that is not in the table of topics");
            return None;
        };
        self.wiring.tracker.assign(tp);
        let Some(queue) = consumer.split_partition_queue(&tp.topic, tp.partition) else {
            log::error!(topic = tp.topic.as_ref(), partition = tp.partition;
                "could not split the partition queue; its records arrive on the main queue");
            return None;
        };
        let reader = PartitionReader {
            queue,
            tp: tp.clone(),
            kind,
            dispatcher: dispatcher.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            max_payload_bytes: self.wiring.max_payload_bytes,
        };
        PartitionThread::spawn(reader)
            .map_err(|e| log::error!(error = e.to_string(); "could not start a partition thread"))
            .ok()
    }

    fn note_assignment(&self, partitions: &HashMap<TopicPartition, PartitionThread>) {
        let topics: BTreeSet<String> = partitions.keys().map(|tp| tp.topic.to_string()).collect();
        self.wiring.metrics.set_assigned(partitions.len());
        self.wiring.assignment.set(Some(topics));
    }

    /// Stops the threads of the given partitions, waits for their in-flight records, and commits
    /// the durable watermark.
    fn revoke(&self, consumer: &BaseConsumer<WorkerContext>, tpl: &TopicPartitionList) {
        let tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        stop_threads(self.release(&tps));
        let left = self.wiring.tracker.wait_drained(&tps, self.wiring.drain_timeout);
        if left > 0 {
            log::warn!(in_flight = left; "revoking with records still in flight; they will be consumed again");
        }
        let offsets = self.wiring.tracker.committable(&tps);
        for tp in &tps {
            self.wiring.tracker.revoke(tp);
        }
        if consumer.assignment_lost() {
            log::warn!(partitions = tps.len(); "assignment lost; not committing");
        } else {
            commit(consumer, &offsets);
        }
        for tp in &tps {
            self.wiring.metrics.forget_partition(&tp.topic, tp.partition);
            log::info!(topic = tp.topic.as_ref(), partition = tp.partition; "partition revoked");
        }
    }

    /// Takes the threads of the revoked partitions out of the assignment, which the metrics and
    /// `/readyz` then show.
    fn release(&self, tps: &[TopicPartition]) -> Vec<PartitionThread> {
        let mut state = self.lock();
        let threads = tps.iter().filter_map(|tp| state.partitions.remove(tp)).collect();
        if state.partitions.is_empty() {
            // Everything went back to the group: a new assignment follows.
            self.wiring.metrics.set_assigned(0);
            self.wiring.assignment.set(None);
        } else {
            self.note_assignment(&state.partitions);
        }
        threads
    }

    /// Stops every partition thread (shutdown).
    pub(super) fn stop_all(&self) {
        let threads: Vec<PartitionThread> = self.lock().partitions.drain().map(|(_, t)| t).collect();
        stop_threads(threads);
    }
}

/// Stores and commits explicit offsets synchronously, logging the result.
pub(super) fn commit(consumer: &BaseConsumer<WorkerContext>, offsets: &[(TopicPartition, i64)]) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset)) {
            log::error!(error = e.to_string(); "could not build the commit list");
            return;
        }
    }
    // Store first: librdkafka commits its stored offsets again when partitions are unassigned,
    // and a stale stored offset would move the committed position back.
    if let Err(e) = consumer.store_offsets(&tpl) {
        log::debug!(error = e.to_string(); "could not store offsets before committing");
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => log::info!(partitions = offsets.len(); "offsets committed"),
        Err(e) => {
            log::warn!(error = e.to_string(); "offset commit failed; records since the last commit will be consumed again")
        }
    }
}

/// From the client's statistics: how many brokers are up, and the shortest time since one of
/// them last answered. Only real brokers count: the bootstrap entries and the logical group
/// coordinator stand for them.
pub fn broker_contact(statistics: &Statistics) -> (usize, Option<Duration>) {
    let real = statistics
        .brokers
        .values()
        .filter(|b| b.nodeid >= 0 && b.source != "logical");
    let up: Vec<_> = real.filter(|b| b.state == "UP").collect();
    let idle = up
        .iter()
        .filter(|b| b.rxidle >= 0)
        .map(|b| Duration::from_micros(b.rxidle as u64))
        .min();
    (up.len(), idle)
}

impl ClientContext for WorkerContext {
    fn stats(&self, statistics: Statistics) {
        let (up, idle) = broker_contact(&statistics);
        self.wiring.broker.observe(up, idle, Instant::now());
        let held: Vec<TopicPartition> = self.lock().partitions.keys().cloned().collect();
        for tp in held {
            let lag = statistics
                .topics
                .get(tp.topic.as_ref())
                .and_then(|t| t.partitions.get(&tp.partition))
                .map(|p| p.consumer_lag_stored);
            if let Some(lag) = lag.filter(|l| *l >= 0) {
                self.wiring.metrics.set_lag(&tp.topic, tp.partition, lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.wiring.broker.all_down();
        }
        log::error!(target: "librdkafka", error = error.to_string(); "kafka client error: {reason}");
    }
}

impl ConsumerContext for WorkerContext {
    /// rdkafka's own rebalance handling (pre-rebalance, assign or unassign, post-rebalance), with
    /// the start positions of `KAFKA_START_FROM` set in the assignment before it is applied.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            position_at_time(consumer, self.start_from, tpl);
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let applied = match (assign, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = applied {
            log::error!(error = e.to_string(); "could not apply the rebalance");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.assign(tpl),
            Rebalance::Revoke(tpl) => self.revoke(consumer, tpl),
            Rebalance::Error(e) => log::error!(error = e.to_string(); "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => log::debug!(partitions = offsets.count(); "offsets committed"),
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => log::warn!(error = e.to_string(); "offset commit failed"),
        }
    }
}
