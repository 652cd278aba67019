//! The partition threads: one named thread per assigned topic-partition, reading that partition's
//! split queue and handing its records to the writers until it is told to stop, then joined.
//!
//! A partition thread with nothing to read parks until librdkafka tells it that its queue has a
//! record (the queue's non-empty callback unparks it) or it is told to stop, instead of waking on
//! a timer: an idle worker's partition threads cost nothing, and a stop takes effect at once.

use super::record::to_work;
use super::WorkerContext;
use crate::models::EventKind;
use crate::offsets::TopicPartition;
use crate::writer::Dispatcher;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long an idle partition thread stays parked before it looks at its queue unbidden.
/// librdkafka calls the queue's non-empty callback each time the queue goes from empty to not
/// empty, so this only bounds the wait of a record that ever came without one.
const IDLE_RECHECK: Duration = Duration::from_secs(2);

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
pub(super) struct PartitionThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl PartitionThread {
    /// Starts the thread that reads `reader`'s queue, named after its role and partition.
    pub(super) fn spawn(reader: PartitionReader) -> std::io::Result<PartitionThread> {
        let stop = Arc::clone(&reader.stop);
        let handle = std::thread::Builder::new()
            .name(partition_thread_name(reader.kind, reader.tp.partition))
            .spawn(move || reader.run())?;
        Ok(PartitionThread { stop, handle })
    }
}

/// Tells every thread to stop and unparks it, then joins them all.
pub(super) fn stop_threads(threads: Vec<PartitionThread>) {
    for t in &threads {
        t.stop.store(true, Ordering::SeqCst);
        t.handle.thread().unpark();
    }
    for t in threads {
        let name = t.handle.thread().name().unwrap_or("partition").to_string();
        if t.handle.join().is_err() {
            log::error!(thread = name; "partition thread panicked");
        }
    }
}

/// Reads one partition's split queue and hands its records to the writers.
pub(super) struct PartitionReader {
    pub(super) queue: PartitionQueue<WorkerContext>,
    pub(super) tp: TopicPartition,
    pub(super) kind: EventKind,
    pub(super) dispatcher: Dispatcher,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) max_payload_bytes: usize,
}

impl PartitionReader {
    /// Reads the queue until it is empty, then parks until the queue's non-empty callback or
    /// [`stop_threads`] unparks the thread. The callback runs on a librdkafka thread with the
    /// queue locked; an unpark never blocks, and one that comes while the thread is awake makes its
    /// next park return at once, so no record is missed (it costs one look at an empty queue).
    fn run(mut self) {
        let me = std::thread::current();
        self.queue.set_nonempty_callback(move || me.unpark());
        let stop = Arc::clone(&self.stop);
        let stopped = || stop.load(Ordering::SeqCst);
        while !stopped() {
            fail::fail_point!("partition-thread");
            match self.queue.poll(Duration::ZERO) {
                None => std::thread::park_timeout(IDLE_RECHECK),
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
                    if !self.dispatcher.dispatch(work, &stopped) {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
