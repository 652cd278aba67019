//! The Kafka side: a synchronous rdkafka `BaseConsumer` in a consumer group, one named thread per
//! assigned topic-partition reading that partition's split queue, and the rebalance handling that
//! starts and stops those threads and commits durable offsets.
//!
//! How the consumer works with librdkafka:
//! - a partition's queue is split in `pre_rebalance`, before `assign()`, or messages race onto the
//!   main queue;
//! - the main queue is still polled on its own thread: rebalances, commit results, statistics and
//!   errors arrive only there, and any message that arrives there is processed all the same;
//! - a split queue needs a new thread on every assignment;
//! - on revocation the partition threads are joined, in-flight records drained, and the durable
//!   watermark committed synchronously unless the assignment was lost.

use crate::align::{self, BookingSlot, CancellationGate, Horizon, Passage};
use crate::baggage::{self, HeaderBaggage};
use crate::config::{KafkaConfig, StartFrom};
use crate::health::{Assignment, Health};
use crate::metrics::Metrics;
use crate::models::EventKind;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::pipeline::{RecordMeta, Work};
use crate::readiness::BrokerLink;
use crate::shutdown::Shutdown;
use crate::writer::Dispatcher;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, Statistics, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a poll blocks before loops look at their stop flags again: it bounds how long a
/// revocation or a shutdown waits for a partition thread, and each idle thread wakes this often.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Which contract each subscribed topic carries: the table of topics.
#[derive(Debug, Clone)]
pub struct TopicTable {
    entries: Vec<(String, EventKind)>,
}

impl TopicTable {
    pub fn from_config(config: &KafkaConfig) -> TopicTable {
        TopicTable {
            entries: vec![
                (config.booking_topic.clone(), EventKind::Booking),
                (config.cancellation_topic.clone(), EventKind::Cancellation),
            ],
        }
    }

    pub fn kind(&self, topic: &str) -> Option<EventKind> {
        self.entries.iter().find(|(t, _)| t == topic).map(|(_, k)| *k)
    }

    pub fn topics(&self) -> Vec<&str> {
        self.entries.iter().map(|(t, _)| t.as_str()).collect()
    }
}

/// The librdkafka properties of the worker's consumer, as `config` built and checked them
/// ([`crate::config::kafka_properties`]): the worker's own, then the configured ones.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (key, value) in &config.properties {
        cc.set(key, value);
    }
    cc
}

/// Reads a message's headers as raw bytes. rdkafka's `Headers::get` panics on a header name that is
/// not UTF-8, so the names and values are read through librdkafka directly.
pub fn raw_headers(message: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    // SAFETY: `message.ptr()` is a live rd_kafka_message_t for the lifetime of `message`. The
    // headers it returns are owned by the message, and each name/value pointer returned by
    // rd_kafka_header_get_all stays valid while the message lives; both are copied out at once.
    unsafe {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(message.ptr(), &mut headers)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return out;
        }
        let count = rd::rd_kafka_header_cnt(headers);
        for idx in 0..count {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut size = 0usize;
            let err = rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
            out.push((name, value));
        }
    }
    out
}

/// Turns a consumed message into the work for a writer. Never fails: a record that cannot be
/// decoded becomes a dead letter with its reason.
pub fn to_work(message: &BorrowedMessage<'_>, kind: EventKind, tp: &TopicPartition, max_payload_bytes: usize) -> Work {
    let baggage = baggage::find(&raw_headers(message));
    let meta = RecordMeta {
        tp: tp.clone(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        baggage: baggage.text().map(str::to_string),
        received_at: Instant::now(),
        produced_at_ms: message.timestamp().to_millis(),
    };
    if let HeaderBaggage::NotUtf8(_) = baggage {
        // A trace header never costs a booking: the record is applied, and its lossy baggage
        // text is what its log lines and any dead letter carry.
        log::warn!(topic = tp.topic.as_ref(), partition = tp.partition, offset = meta.offset;
            "the Baggage header value is not UTF-8; kept with replacement characters");
    }
    match kind.decode(&meta.payload, max_payload_bytes) {
        Ok(event) => Work::Apply { meta, event },
        Err(rejection) => Work::Reject { meta, rejection },
    }
}

/// Linux keeps this many bytes of a thread's name; every thread dump shows no more.
pub const THREAD_NAME_MAX: usize = 15;

/// A partition thread's name: its topic's role and its partition, as `bk-events/3` or
/// `cancels/3`. The role, not the configured topic name, so that it fits in [`THREAD_NAME_MAX`]
/// bytes whatever the topics are called; a partition number too long for that gets a shorter role.
pub fn partition_thread_name(kind: EventKind, partition: i32) -> String {
    let (role, short) = match kind {
        EventKind::Booking => ("bk-events", "bk"),
        EventKind::Cancellation => ("cancels", "cx"),
    };
    let name = format!("{role}/{partition}");
    if name.len() <= THREAD_NAME_MAX {
        name
    } else {
        format!("{short}/{partition}")
    }
}

/// A running partition thread and its stop flag.
struct PartitionThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

struct State {
    dispatcher: Option<Dispatcher>,
    partitions: HashMap<TopicPartition, PartitionThread>,
}

/// The consumer's context: it owns the partition threads and reacts to rebalances.
pub struct WorkerContext {
    consumer: OnceLock<Weak<BaseConsumer<WorkerContext>>>,
    topics: TopicTable,
    start_from: StartFrom,
    state: Mutex<State>,
    wiring: ConsumerWiring,
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
    /// The booking partitions' horizon, when cancellations wait for it (`ALIGN_CANCELLATIONS`).
    pub horizon: Option<Arc<Horizon>>,
}

impl WorkerContext {
    fn lock(&self) -> MutexGuard<'_, State> {
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
        // The booking partitions first, so that their horizon is in place when a cancellation
        // partition thread starts looking at it.
        let mut elements = tpl.elements();
        elements.sort_by_key(|e| self.topics.kind(e.topic()) != Some(EventKind::Booking));
        for elem in elements {
            let tp = TopicPartition::new(elem.topic(), elem.partition());
            let Some(kind) = self.topics.kind(elem.topic()) else {
                log::error!(topic = elem.topic(); "assigned a topic that is not in the table of topics");
                continue;
            };
            self.wiring.tracker.assign(&tp);
            let Some(queue) = consumer.split_partition_queue(elem.topic(), elem.partition()) else {
                log::error!(topic = elem.topic(), partition = elem.partition();
                    "could not split the partition queue; its records arrive on the main queue");
                continue;
            };
            let stop = Arc::new(AtomicBool::new(false));
            let reader = PartitionReader {
                queue,
                tp: tp.clone(),
                kind,
                dispatcher: dispatcher.clone(),
                stop: Arc::clone(&stop),
                max_payload_bytes: self.wiring.max_payload_bytes,
                pacing: Pacing::of(kind, self.wiring.horizon.as_ref()),
            };
            let spawned = std::thread::Builder::new()
                .name(partition_thread_name(kind, tp.partition))
                .spawn(move || reader.run());
            match spawned {
                Ok(handle) => {
                    if let Some(old) = state.partitions.insert(tp.clone(), PartitionThread { stop, handle }) {
                        stop_threads(vec![old]);
                    }
                    log::info!(topic = elem.topic(), partition = elem.partition(); "partition assigned");
                }
                Err(e) => log::error!(error = e.to_string(); "could not start a partition thread"),
            }
        }
        self.note_assignment(&state.partitions);
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
        let threads: Vec<PartitionThread> = {
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
        };
        stop_threads(threads);
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

    /// Stops every partition thread (shutdown).
    fn stop_all(&self) {
        let threads: Vec<PartitionThread> = self.lock().partitions.drain().map(|(_, t)| t).collect();
        stop_threads(threads);
    }
}

fn stop_threads(threads: Vec<PartitionThread>) {
    for t in &threads {
        t.stop.store(true, Ordering::SeqCst);
    }
    for t in threads {
        let name = t.handle.thread().name().unwrap_or("partition").to_string();
        if t.handle.join().is_err() {
            log::error!(thread = name; "partition thread panicked");
        }
    }
}

/// Stores and commits explicit offsets synchronously, logging the result.
fn commit(consumer: &BaseConsumer<WorkerContext>, offsets: &[(TopicPartition, i64)]) {
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

/// How long a rebalance waits for the committed offsets and offsets-for-times of its partitions.
const OFFSET_LOOKUP: Duration = Duration::from_secs(10);

impl WorkerContext {
    /// Under `KAFKA_START_FROM=<time>`: the partitions without a committed offset start at the
    /// first record at or after that time, or at the partition's end (its high watermark now)
    /// when no record is that recent. A partition whose look-up fails starts at its earliest
    /// record, so nothing after the time is skipped.
    fn position_at_time(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let StartFrom::Time(at) = self.start_from else {
            return;
        };
        let positioned = consumer
            .committed_offsets(tpl.clone(), OFFSET_LOOKUP)
            .and_then(|committed| {
                let mut query = TopicPartitionList::new();
                for e in committed.elements().iter().filter(|e| e.offset() == Offset::Invalid) {
                    query.add_partition_offset(e.topic(), e.partition(), Offset::Offset(at.timestamp_millis()))?;
                }
                if query.count() == 0 {
                    return Ok(query);
                }
                consumer.offsets_for_times(query, OFFSET_LOOKUP)
            });
        let found = match positioned {
            Ok(found) => found,
            Err(e) => {
                log::warn!(error = e.to_string();
                    "could not look up KAFKA_START_FROM; those partitions start from their earliest record");
                return;
            }
        };
        for e in found.elements() {
            let offset = match (e.error(), e.offset()) {
                (Ok(()), Offset::Offset(o)) if o >= 0 => Some(o),
                (Ok(()), _) => consumer
                    .fetch_watermarks(e.topic(), e.partition(), OFFSET_LOOKUP)
                    .map(|(_, high)| high)
                    .ok(),
                (Err(_), _) => None,
            };
            let Some(offset) = offset else {
                log::warn!(topic = e.topic(), partition = e.partition();
                    "could not look up KAFKA_START_FROM; the partition starts from its earliest record");
                continue;
            };
            if tpl
                .set_partition_offset(e.topic(), e.partition(), Offset::Offset(offset))
                .is_ok()
            {
                log::info!(topic = e.topic(), partition = e.partition(), offset,
                    start_from = at.to_rfc3339(); "no committed offset; starting from KAFKA_START_FROM");
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// rdkafka's own rebalance handling (pre-rebalance, assign or unassign, post-rebalance), with
    /// the start positions of `KAFKA_START_FROM` set in the assignment before it is applied.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.position_at_time(consumer, tpl);
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

/// A partition thread's part in keeping cancellations behind a booking backlog ([`crate::align`]).
enum Pacing {
    /// Alignment is off.
    Free,
    /// A booking partition: publishes how far it has handed records on.
    Booking(BookingSlot),
    /// A cancellation partition: waits for the booking partitions' horizon.
    Cancellation(CancellationGate),
}

impl Pacing {
    fn of(kind: EventKind, horizon: Option<&Arc<Horizon>>) -> Pacing {
        match (kind, horizon) {
            (_, None) => Pacing::Free,
            (EventKind::Booking, Some(h)) => Pacing::Booking(h.join()),
            (EventKind::Cancellation, Some(h)) => Pacing::Cancellation(CancellationGate::new(h)),
        }
    }

    /// Before a record is handed on: false when the thread was told to stop meanwhile.
    fn before(&mut self, work: &Work, stop: &dyn Fn() -> bool) -> bool {
        let Pacing::Cancellation(gate) = self else {
            return true;
        };
        if work.event().is_none() {
            return true;
        }
        match gate.wait(work.meta().produced_at_ms, stop) {
            Passage::Reached => true,
            Passage::GaveUp => {
                log::debug!(topic = work.meta().tp.topic.as_ref(), partition = work.meta().tp.partition;
                    "the booking partitions' horizon stalled; a cancellation goes on without it");
                true
            }
            Passage::Stopped => false,
        }
    }

    /// After a record was handed on (`Some`), or a poll found nothing (`None`).
    fn after(&self, produced_at_ms: Option<Option<i64>>) {
        if let Pacing::Booking(slot) = self {
            match produced_at_ms {
                Some(at) => slot.handed_on(at, align::now_ms()),
                None => slot.idle(),
            }
        }
    }
}

/// Reads one partition's split queue and hands its records to the writers.
struct PartitionReader {
    queue: PartitionQueue<WorkerContext>,
    tp: TopicPartition,
    kind: EventKind,
    dispatcher: Dispatcher,
    stop: Arc<AtomicBool>,
    max_payload_bytes: usize,
    pacing: Pacing,
}

impl PartitionReader {
    fn run(mut self) {
        let stop = Arc::clone(&self.stop);
        let stopped = || stop.load(Ordering::SeqCst);
        while !stopped() {
            fail::fail_point!("partition-thread");
            match self.queue.poll(POLL_INTERVAL) {
                None => self.pacing.after(None),
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::BadCompression))) => {
                    log::error!(topic = self.tp.topic.as_ref(), partition = self.tp.partition,
                        error = "BadCompression";
                        "a record batch cannot be decompressed within receive.message.max.bytes; \
                         the partition is stuck until KAFKA_PROP_RECEIVE_MESSAGE_MAX_BYTES is raised")
                }
                Some(Err(e)) => log::warn!(topic = self.tp.topic.as_ref(), partition = self.tp.partition,
                    error = e.to_string(); "partition consume error"),
                Some(Ok(message)) => {
                    let work = to_work(&message, self.kind, &self.tp, self.max_payload_bytes);
                    // The message pins its whole decompressed record batch inside librdkafka;
                    // release it before waiting for room in a writer's channel.
                    drop(message);
                    let produced_at_ms = work.meta().produced_at_ms;
                    if !self.pacing.before(&work, &stopped) || !self.dispatcher.dispatch(work, &stopped) {
                        break;
                    }
                    self.pacing.after(Some(produced_at_ms));
                }
            }
        }
    }
}

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
        let context = WorkerContext {
            consumer: OnceLock::new(),
            topics: topics.clone(),
            start_from: config.start_from,
            state: Mutex::new(State {
                dispatcher: Some(dispatcher),
                partitions: HashMap::new(),
            }),
            wiring,
        };
        let consumer: BaseConsumer<WorkerContext> = consumer_config(config).create_with_context(context)?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        ensure_topics(&consumer, &topics.topics());
        wait_for_topics(&consumer, &topics.topics(), config.topic_wait)?;
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
        let _alive = wiring.health.register("consumer-poll");
        while !shutdown.is_triggered() {
            fail::fail_point!("consumer-poll");
            wiring.health.beat();
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
                Some(Ok(message)) => self.stray_message(&message, shutdown),
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
    /// any other, never dropped.
    fn stray_message(&self, message: &BorrowedMessage<'_>, shutdown: &Shutdown) {
        let Some(kind) = self.topics.kind(message.topic()) else {
            log::error!(topic = message.topic(); "message from a topic that is not in the table of topics");
            return;
        };
        let tp = TopicPartition::new(message.topic(), message.partition());
        let Some(dispatcher) = self.context().lock().dispatcher.clone() else {
            return;
        };
        let work = to_work(message, kind, &tp, self.context().wiring.max_payload_bytes);
        dispatcher.dispatch(work, &|| shutdown.is_triggered());
    }

    fn store_progress(&self) {
        store(&self.consumer, &self.context().wiring.tracker.take_to_store());
    }
}

/// Asks the broker for each topic's metadata, which makes a broker with automatic topic creation
/// create a missing one (with `allow.auto.create.topics`). librdkafka's own subscription metadata
/// requests do not ask for creation while it knows no topic yet, so this is done here, once, before
/// subscribing.
fn ensure_topics(consumer: &BaseConsumer<WorkerContext>, topics: &[&str]) {
    for topic in topics {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(metadata) => {
                let missing = metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == *topic && (t.error().is_some() || t.partitions().is_empty()));
                if missing {
                    log::info!(topic = *topic; "topic did not exist; the broker creates it if it allows");
                }
            }
            Err(e) => log::warn!(topic = *topic, error = e.to_string(); "could not fetch topic metadata"),
        }
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

/// The topics whose partitions are not all known with a leader yet.
fn topics_not_ready(consumer: &BaseConsumer<WorkerContext>, topics: &[&str]) -> Vec<String> {
    topics
        .iter()
        .filter(|topic| {
            let ready = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .map(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == **topic
                            && t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            !ready
        })
        .map(|t| t.to_string())
        .collect()
}

/// Waits, up to `wait`, until every topic has partitions with leaders. Subscribing before that
/// makes librdkafka report the topic unavailable and assign it in a second rebalance later.
fn wait_for_topics(consumer: &BaseConsumer<WorkerContext>, topics: &[&str], wait: Duration) -> Result<(), StartError> {
    let started = Instant::now();
    let mut logged = false;
    loop {
        let missing = topics_not_ready(consumer, topics);
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(StartError::TopicsMissing {
                missing,
                waited_secs: wait.as_secs(),
            });
        }
        if !logged {
            logged = true;
            log::info!(topics = missing.join(","), wait_secs = wait.as_secs(); "waiting for the topics' partitions");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

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
    commit(consumer, &tracker.committable(&assignment));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn tls_and_sasl_properties_pass_through_to_a_client_that_accepts_them() {
        let vars: Vec<(String, String)> = [
            ("KAFKA_PROP_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_PROP_SASL_MECHANISMS", "SCRAM-SHA-512"),
            ("KAFKA_PROP_SASL_USERNAME", "worker"),
            ("KAFKA_PROP_SASL_PASSWORD", "secret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::from_vars(&vars).unwrap();
        let cc = consumer_config(&config.kafka);
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        let client: Result<BaseConsumer, _> = cc.create();
        assert!(client.is_ok(), "TLS and SCRAM are compiled in: {:?}", client.err());
    }

    #[test]
    fn an_unknown_property_is_refused_by_the_client() {
        let vars = vec![("KAFKA_PROP_NO_SUCH_THING".to_string(), "1".to_string())];
        let config = Config::from_vars(&vars).unwrap();
        let client: Result<BaseConsumer, _> = consumer_config(&config.kafka).create();
        assert!(client.is_err());
    }

    #[test]
    fn a_partition_thread_name_fits_a_thread_dump_and_tells_role_and_partition() {
        assert_eq!(partition_thread_name(EventKind::Booking, 3), "bk-events/3");
        assert_eq!(partition_thread_name(EventKind::Cancellation, 3), "cancels/3");
        assert_eq!(partition_thread_name(EventKind::Booking, 99_999), "bk-events/99999");
        assert_eq!(partition_thread_name(EventKind::Booking, i32::MAX), "bk/2147483647");
        for kind in [EventKind::Booking, EventKind::Cancellation] {
            for partition in [0, 7, 12_345, 999_999, i32::MAX] {
                assert!(partition_thread_name(kind, partition).len() <= THREAD_NAME_MAX);
            }
        }
        assert_ne!(
            partition_thread_name(EventKind::Booking, 1),
            partition_thread_name(EventKind::Cancellation, 1)
        );
    }

    #[test]
    fn the_table_of_topics_maps_each_topic_to_its_contract() {
        let config = Config::from_vars(&[]).unwrap();
        let table = TopicTable::from_config(&config.kafka);
        assert_eq!(table.kind("booking-events"), Some(EventKind::Booking));
        assert_eq!(table.kind("booking-cancellations"), Some(EventKind::Cancellation));
        assert_eq!(table.kind("other"), None);
    }
}
