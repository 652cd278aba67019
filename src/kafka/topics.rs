//! The table of topics (which contract each subscribed topic carries), and waiting at the start
//! until every topic has partitions with leaders.

use super::{StartError, WorkerContext};
use crate::config::KafkaConfig;
use crate::models::EventKind;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

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

/// Asks the broker for each topic's metadata, which makes a broker with automatic topic creation
/// create a missing one (with `allow.auto.create.topics`). librdkafka's own subscription metadata
/// requests do not ask for creation while it knows no topic yet, so this is done here, once, before
/// subscribing.
pub(super) fn ensure_topics(consumer: &BaseConsumer<WorkerContext>, topics: &[&str]) {
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
pub(super) fn wait_for_topics(
    consumer: &BaseConsumer<WorkerContext>,
    topics: &[&str],
    wait: Duration,
) -> Result<(), StartError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_table_of_topics_maps_each_topic_to_its_contract() {
        let config = Config::from_vars(&[]).unwrap();
        let table = TopicTable::from_config(&config.kafka);
        assert_eq!(table.kind("booking-events"), Some(EventKind::Booking));
        assert_eq!(table.kind("booking-cancellations"), Some(EventKind::Cancellation));
        assert_eq!(table.kind("other"), None);
    }
}
