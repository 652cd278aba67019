//! The Kafka client's settings in one place: every librdkafka property the worker sets, and every
//! one that `KAFKA_PROP_*` may not set, each in one table with the reason beside it; and the
//! pass-through that merges the two into the consumer's properties.
//!
//! This lives in `config`, not in `kafka`: the pass-through is checked with the rest of the
//! configuration at start-up, and `config` stands above `kafka` in the layers of `src/lib.rs`.
//! The consumer applies [`super::KafkaConfig::properties`] as they are.

use super::{invalid, ConfigError, GroupProtocol, Settings};

/// Prefix of environment variables passed through to librdkafka: `KAFKA_PROP_SECURITY_PROTOCOL=ssl`
/// becomes `security.protocol=ssl`.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROP_";

/// A librdkafka property the worker sets: its name, its value from the settings, and why.
pub struct WorkerProperty {
    pub name: &'static str,
    pub value: fn(&Settings) -> String,
    pub why: &'static str,
}

/// Every librdkafka property the worker sets. `KAFKA_PROP_*` replaces any of them that
/// [`REFUSED_PROPERTIES`] does not hold.
pub const WORKER_PROPERTIES: &[WorkerProperty] = &[
    WorkerProperty {
        name: "bootstrap.servers",
        value: |s| s.kafka_brokers.clone(),
        why: "from KAFKA_BROKERS",
    },
    WorkerProperty {
        name: "group.id",
        value: |s| s.kafka_group_id.clone(),
        why: "from KAFKA_GROUP_ID",
    },
    WorkerProperty {
        name: "client.id",
        value: |_| "booking-worker".into(),
        why: "names the worker to the brokers (their logs, request metrics and quotas)",
    },
    WorkerProperty {
        name: "enable.auto.commit",
        value: |_| "true".into(),
        why: "librdkafka commits the stored offsets, and only the worker stores them",
    },
    WorkerProperty {
        name: "auto.commit.interval.ms",
        value: |_| "1000".into(),
        why: "the stored watermark is committed every second, so a crash consumes again about a second of \
              durable records at most",
    },
    WorkerProperty {
        name: "enable.auto.offset.store",
        value: |_| "false".into(),
        why: "an offset is stored only once its record is durable in PostgreSQL",
    },
    WorkerProperty {
        name: "auto.offset.reset",
        value: |s| s.kafka_start_from.offset_reset().into(),
        why: "from KAFKA_START_FROM",
    },
    WorkerProperty {
        name: "allow.auto.create.topics",
        value: |s| s.kafka_allow_auto_create_topics.to_string(),
        why: "from KAFKA_ALLOW_AUTO_CREATE_TOPICS",
    },
    WorkerProperty {
        name: "group.protocol",
        value: |s| s.kafka_group_protocol.as_str().into(),
        why: "from KAFKA_GROUP_PROTOCOL",
    },
    WorkerProperty {
        name: "enable.partition.eof",
        value: |_| "false".into(),
        why: "the partition threads read their queues without end-of-partition events",
    },
    WorkerProperty {
        name: "topic.metadata.refresh.interval.ms",
        value: |_| "10000".into(),
        why: "a topic created after the start is picked up within seconds",
    },
    WorkerProperty {
        name: "queued.max.messages.kbytes",
        value: |s| s.kafka_queued_max_kbytes.to_string(),
        why: "from KAFKA_QUEUED_MAX_KBYTES: librdkafka's own 64 MiB per partition is too much for a small VM",
    },
    WorkerProperty {
        name: "queued.min.messages",
        value: |_| QUEUED_MIN_MESSAGES.into(),
        why: "a partition is fetched again while its queue holds fewer records than this and less than \
              queued.max.messages.kbytes, so a steady stream's next records are on their way before the \
              queue runs dry, instead of waiting for a fetch in flight (up to fetch.wait.max.ms) that left \
              the partition out; the byte cap bounds what it holds",
    },
    WorkerProperty {
        name: "fetch.max.bytes",
        value: |s| s.kafka_fetch_max_bytes.to_string(),
        why: "from KAFKA_FETCH_MAX_BYTES",
    },
    WorkerProperty {
        name: "max.partition.fetch.bytes",
        value: |s| s.kafka_max_partition_fetch_bytes.to_string(),
        why: "from KAFKA_MAX_PARTITION_FETCH_BYTES",
    },
    WorkerProperty {
        name: "fetch.queue.backoff.ms",
        value: |s| s.kafka_fetch_queue_backoff_ms.to_string(),
        why: "from KAFKA_FETCH_QUEUE_BACKOFF_MS",
    },
    WorkerProperty {
        name: "fetch.wait.max.ms",
        value: |s| s.kafka_fetch_wait_max_ms.to_string(),
        why: "from KAFKA_FETCH_WAIT_MAX_MS: one fetch request per broker is in flight at a time, and the broker \
              holds it this long when none of its partitions has new records; with librdkafka's 500 ms, a \
              caught-up partition stalls the others at every refetch",
    },
    WorkerProperty {
        name: "receive.message.max.bytes",
        value: |s| receive_message_max_bytes(s.kafka_fetch_max_bytes, s.kafka_max_partition_fetch_bytes).to_string(),
        why: "above the largest fetch response, and never below MIN_RECEIVE_MESSAGE_MAX_BYTES",
    },
    WorkerProperty {
        name: "statistics.interval.ms",
        value: |s| s.kafka_stats_interval_ms.to_string(),
        why: "from KAFKA_STATS_INTERVAL_MS: the consumer-lag metric and the broker contact /readyz reads",
    },
];

/// The librdkafka properties that `KAFKA_PROP_*` may not set, because the worker's correctness
/// relies on them (or a setting of its own sets them), with what to do instead.
pub const REFUSED_PROPERTIES: &[(&str, &str)] = &[
    ("group.id", "KAFKA_GROUP_ID sets it"),
    ("bootstrap.servers", "KAFKA_BROKERS sets it"),
    ("metadata.broker.list", "KAFKA_BROKERS sets it"),
    (
        "enable.auto.commit",
        "the worker commits only offsets whose records are durable, through enable.auto.commit=true \
         with enable.auto.offset.store=false",
    ),
    (
        "enable.auto.offset.store",
        "the worker stores an offset only once its record is durable in PostgreSQL",
    ),
    ("auto.offset.reset", "KAFKA_START_FROM sets it"),
    ("allow.auto.create.topics", "KAFKA_ALLOW_AUTO_CREATE_TOPICS sets it"),
    ("group.protocol", "KAFKA_GROUP_PROTOCOL sets it"),
    (
        "enable.partition.eof",
        "the partition threads read their queues without end-of-partition events",
    ),
    (
        "isolation.level",
        "the worker reads committed records only (read_committed): an aborted booking must not apply",
    ),
    (
        "offset.store.method",
        "offsets are stored in the group, through the broker",
    ),
];

/// Properties of the classic group protocol that librdkafka refuses under KIP-848's, so
/// `KAFKA_PROP_*` may not set them with `KAFKA_GROUP_PROTOCOL=consumer`: the broker's
/// `group.consumer.*` settings apply instead.
const CLASSIC_ONLY_PROPERTIES: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
];

/// librdkafka's `queued.min.messages` for the consumer (see [`WORKER_PROPERTIES`]).
const QUEUED_MIN_MESSAGES: &str = "1000";

/// The least `receive.message.max.bytes` the consumer gets: 32 MiB.
///
/// librdkafka also uses this property as the cap on a record batch's size once decompressed. When
/// a zstd frame does not state its size, the output buffer grows in steps of about 4x and gives up
/// at the first step above the cap, so a batch that decompresses to more than about a quarter of
/// the cap fails with "Invalid compressed data" on every fetch, and its partition never moves
/// again: one large (still valid) record would stop the worker. 32 MiB lets batches of several
/// MiB through whatever their compression; the memory is taken only while such a batch is being
/// decompressed (how much is fetched and queued is bounded by the fetch settings, not by this).
pub const MIN_RECEIVE_MESSAGE_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// `receive.message.max.bytes`: above the largest fetch response (librdkafka requires it), and
/// never below [`MIN_RECEIVE_MESSAGE_MAX_BYTES`].
pub fn receive_message_max_bytes(fetch_max_bytes: u64, partition_fetch_bytes: u64) -> u64 {
    (fetch_max_bytes.max(partition_fetch_bytes) + 1024 * 1024).max(MIN_RECEIVE_MESSAGE_MAX_BYTES)
}

/// The consumer's librdkafka properties: the worker's own first, then the `KAFKA_PROP_*`
/// pass-through, which replaces them but may not set what the worker relies on.
pub fn consumer_properties(
    s: &Settings,
    passthrough: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut properties: Vec<(String, String)> = WORKER_PROPERTIES
        .iter()
        .map(|p| (p.name.to_string(), (p.value)(s)))
        .collect();
    let mut given: Vec<(String, &str, &str)> = passthrough
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(KAFKA_PROPERTY_PREFIX)?;
            Some((name.to_ascii_lowercase().replace('_', "."), v.as_str(), k.as_str()))
        })
        .collect();
    given.sort();
    for (name, value, variable) in given {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
            return Err(invalid(
                variable,
                value,
                "a librdkafka property name after the prefix, such as KAFKA_PROP_SECURITY_PROTOCOL",
            ));
        }
        if let Some((_, instead)) = REFUSED_PROPERTIES.iter().find(|(p, _)| *p == name) {
            return Err(invalid(variable, value, &format!("not to be set: {instead}")));
        }
        properties.retain(|(k, _)| *k != name);
        properties.push((name, value.to_string()));
    }
    Ok(properties)
}

/// Under `KAFKA_GROUP_PROTOCOL=consumer`, refuses a pass-through of [`CLASSIC_ONLY_PROPERTIES`].
pub(super) fn check_group_protocol(
    protocol: GroupProtocol,
    properties: &[(String, String)],
) -> Result<(), ConfigError> {
    if protocol != GroupProtocol::Consumer {
        return Ok(());
    }
    match properties
        .iter()
        .find(|(n, _)| CLASSIC_ONLY_PROPERTIES.contains(&n.as_str()))
    {
        Some((name, value)) => {
            let variable = format!("{KAFKA_PROPERTY_PREFIX}{}", name.to_ascii_uppercase().replace('.', "_"));
            Err(invalid(
                &variable,
                value,
                "not to be set with KAFKA_GROUP_PROTOCOL=consumer: the broker's group.consumer.* settings apply",
            ))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn properties(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(&vars).unwrap().kafka.properties
    }

    #[test]
    fn the_worker_sets_each_of_its_properties_once() {
        let properties = properties(&[]);
        for (name, value) in [
            ("bootstrap.servers", "localhost:9092"),
            ("group.id", "booking-worker"),
            ("client.id", "booking-worker"),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("allow.auto.create.topics", "true"),
            ("group.protocol", "classic"),
            ("enable.partition.eof", "false"),
            ("topic.metadata.refresh.interval.ms", "10000"),
            ("statistics.interval.ms", "5000"),
        ] {
            let set: Vec<&str> = properties
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(set, [value], "{name}");
        }
        assert_eq!(properties.len(), super::WORKER_PROPERTIES.len());
    }

    #[test]
    fn a_property_the_worker_does_not_rely_on_is_replaced_by_the_pass_through() {
        let properties = properties(&[("KAFKA_PROP_CLIENT_ID", "worker-7")]);
        let client_ids: Vec<&str> = properties
            .iter()
            .filter(|(k, _)| k == "client.id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(client_ids, ["worker-7"]);
    }
}
