//! How far the worker got: the group's committed offsets against the ends of the topics, and the
//! times of its durable writes (how soon it wrote after a fault, how long it stood still).

use crate::common::TestDb;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::Duration;

/// Whether the group of `consumer` has committed the end offset of every partition of `topics`
/// (None: the broker could not say).
pub fn caught_up(consumer: &BaseConsumer, topics: &[&str]) -> Option<bool> {
    let timeout = Duration::from_secs(5);
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == *topic)?
            .partitions()
            .len();
        if partitions == 0 {
            return None;
        }
        for p in 0..partitions as i32 {
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
            ends.insert((topic.to_string(), p), high);
            tpl.add_partition(topic, p);
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    Some(committed.elements().iter().all(|e| {
        let end = ends[&(e.topic().to_string(), e.partition())];
        match e.offset() {
            Offset::Offset(o) => o >= end,
            _ => end == 0,
        }
    }))
}

/// Seconds from `after` to the first durable write the worker made after it: a booking created
/// or cancelled, a dead letter, a parked cancellation. None when nothing was written after it.
pub fn first_write_after(db: &TestDb, after: DateTime<Utc>) -> Option<f64> {
    // booking-management's columns are TIMESTAMP without time zone, in the server's zone.
    db.conn()
        .query_one(
            "SELECT extract(epoch FROM least(
                    (SELECT min(created_at::timestamptz) FROM bookings WHERE created_at::timestamptz > $1),
                    (SELECT min(updated_at::timestamptz) FROM bookings WHERE updated_at::timestamptz > $1),
                    (SELECT min(created_at) FROM booking_worker.dead_letters WHERE created_at > $1),
                    (SELECT min(parked_at) FROM booking_worker.pending_cancellations WHERE parked_at > $1))
                - $1)::float8 AS s",
            &[&after],
        )
        .expect("time of the first write after a fault")
        .get(0)
}

/// The longest pause between durable writes from `from` to the last write: how long the worker
/// stood still at worst (a fault's outage plus its recovery).
pub fn longest_write_pause(db: &TestDb, from: DateTime<Utc>) -> f64 {
    let times: Vec<f64> = db
        .conn()
        .query(
            "SELECT DISTINCT extract(epoch FROM t)::float8 AS t FROM (
                SELECT created_at::timestamptz AS t FROM bookings
                UNION ALL SELECT updated_at::timestamptz FROM bookings WHERE updated_at > created_at
                UNION ALL SELECT created_at FROM booking_worker.dead_letters
                UNION ALL SELECT parked_at FROM booking_worker.pending_cancellations) AS w
          WHERE t >= $1 ORDER BY 1",
            &[&from],
        )
        .expect("times of the writes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let start = from.timestamp_micros() as f64 / 1e6;
    let mut last = start;
    let mut longest: f64 = 0.0;
    for t in times {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}
