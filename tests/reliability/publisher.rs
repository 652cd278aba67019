//! The records a scenario publishes, and the thread that publishes them at an even pace.

use crate::common::{Services, TestProducer};
use booking_worker::loadgen::Topic;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One record to publish: its topic, key, payload and headers.
#[derive(Debug, Clone)]
pub struct PlannedRecord {
    pub topic: Topic,
    pub key: String,
    pub payload: Vec<u8>,
    /// Headers with UTF-8 names (values are raw bytes).
    pub headers: Vec<(String, Vec<u8>)>,
    /// One header whose name is raw bytes (not UTF-8), sent through librdkafka directly.
    pub raw_header: Option<(Vec<u8>, Vec<u8>)>,
}

impl PlannedRecord {
    pub fn new(topic: Topic, key: &str, payload: impl Into<Vec<u8>>) -> PlannedRecord {
        PlannedRecord {
            topic,
            key: key.to_string(),
            payload: payload.into(),
            headers: Vec::new(),
            raw_header: None,
        }
    }

    /// Adds a header with a UTF-8 name.
    pub fn header(mut self, name: &str, value: &[u8]) -> PlannedRecord {
        self.headers.push((name.to_string(), value.to_vec()));
        self
    }

    /// Sets the one header whose name is raw bytes.
    pub fn raw_header(mut self, name: Vec<u8>, value: Vec<u8>) -> PlannedRecord {
        self.raw_header = Some((name, value));
        self
    }
}

/// The names of a scenario's two topics.
pub struct Topics {
    pub bookings: String,
    pub cancellations: String,
}

impl Topics {
    fn name(&self, topic: Topic) -> &str {
        match topic {
            Topic::Bookings => &self.bookings,
            Topic::Cancellations => &self.cancellations,
        }
    }
}

/// Publishes records at an even pace over `duration` on a thread of its own, through an
/// idempotent producer (so a broker restart cannot write a record twice). Returns how many
/// deliveries failed.
pub fn publish(
    services: &Services,
    topics: Topics,
    records: Arc<Vec<PlannedRecord>>,
    duration: Duration,
) -> JoinHandle<usize> {
    let services = services.clone();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let producer = TestProducer::with_config(
                &services,
                &[
                    ("enable.idempotence", "true"),
                    ("message.timeout.ms", "300000"),
                    ("queue.buffering.max.messages", "1000000"),
                    ("queue.buffering.max.kbytes", "1048576"),
                ],
            );
            let start = Instant::now();
            let step = duration.div_f64(records.len().max(1) as f64);
            for (i, record) in records.iter().enumerate() {
                let due = start + step.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                send(&producer, topics.name(record.topic), record);
            }
            producer.flush_within(Duration::from_secs(300));
            producer.failed()
        })
        .expect("start the publisher")
}

/// Hands one record to the producer, its raw-named header through librdkafka directly.
fn send(producer: &TestProducer, topic: &str, record: &PlannedRecord) {
    match &record.raw_header {
        Some((name, value)) => producer.send_raw_header_name(topic, &record.key, &record.payload, name, value),
        None => {
            let headers: Vec<(&str, &[u8])> = record.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            producer.send(topic, &record.key, &record.payload, &headers);
        }
    }
}
