//! `KAFKA_START_FROM=<time>`: in a rebalance's assignment, the partitions without a committed
//! offset are positioned at the first record at or after that time (the broker's
//! offsets-for-times) before the assignment is applied.

use super::WorkerContext;
use crate::config::StartFrom;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionListElem;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

/// How long a rebalance waits for the committed offsets and offsets-for-times of its partitions.
const OFFSET_LOOKUP: Duration = Duration::from_secs(10);

/// Under `KAFKA_START_FROM=<time>`: the partitions without a committed offset start at the first
/// record at or after that time, or at the partition's end (its high watermark now) when no record
/// is that recent. A partition whose look-up fails starts at its earliest record, so nothing after
/// the time is skipped.
pub(super) fn position_at_time(
    consumer: &BaseConsumer<WorkerContext>,
    start_from: StartFrom,
    tpl: &mut TopicPartitionList,
) {
    let StartFrom::Time(at) = start_from else {
        return;
    };
    let found = match offsets_at(consumer, tpl, at.timestamp_millis()) {
        Ok(found) => found,
        Err(e) => {
            log::warn!(error = e.to_string();
                "could not look up KAFKA_START_FROM; those partitions start from their earliest record");
            return;
        }
    };
    for e in found.elements() {
        let Some(offset) = start_offset(consumer, &e) else {
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

/// The broker's offsets-for-times at `at_ms`, for those of `tpl`'s partitions that have no
/// committed offset.
fn offsets_at(
    consumer: &BaseConsumer<WorkerContext>,
    tpl: &TopicPartitionList,
    at_ms: i64,
) -> KafkaResult<TopicPartitionList> {
    let committed = consumer.committed_offsets(tpl.clone(), OFFSET_LOOKUP)?;
    let mut query = TopicPartitionList::new();
    for e in committed.elements().iter().filter(|e| e.offset() == Offset::Invalid) {
        query.add_partition_offset(e.topic(), e.partition(), Offset::Offset(at_ms))?;
    }
    if query.count() == 0 {
        return Ok(query);
    }
    consumer.offsets_for_times(query, OFFSET_LOOKUP)
}

/// Where a looked-up partition starts: the offset found, or its end when no record is that
/// recent; `None` when the look-up failed.
fn start_offset(consumer: &BaseConsumer<WorkerContext>, e: &TopicPartitionListElem<'_>) -> Option<i64> {
    match (e.error(), e.offset()) {
        (Ok(()), Offset::Offset(o)) if o >= 0 => Some(o),
        (Ok(()), _) => consumer
            .fetch_watermarks(e.topic(), e.partition(), OFFSET_LOOKUP)
            .map(|(_, high)| high)
            .ok(),
        (Err(_), _) => None,
    }
}
