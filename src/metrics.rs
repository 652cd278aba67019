//! Prometheus metrics of the worker, and the one-line JSON stats summary for those without
//! Prometheus. One [`Metrics`] is created by `run` and shared by every thread.

use crate::models::EventKind;
use crate::pipeline::Outcome;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;

/// Buckets of the latency histograms, in seconds.
const LATENCY_BUCKETS: [f64; 25] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Each metric's name and help.
type Describe = (&'static str, &'static str);

const EVENTS: Describe = (
    "booking_worker_events_total",
    "Consumed records by topic and end: applied, duplicate, noop, parked, dead_lettered (with reason).",
);
const DEAD_LETTERS: Describe = ("booking_worker_dead_letters_total", "Dead letters written, by reason.");
const PROCESSING: Describe = (
    "booking_worker_processing_seconds",
    "From consuming a record to its end being durable in PostgreSQL, by event type.",
);
const END_TO_END: Describe = (
    "booking_worker_end_to_end_seconds",
    "From the record's Kafka timestamp (when it was produced) to its end being durable in PostgreSQL, by event type.",
);
const TRANSACTIONS: Describe = (
    "booking_worker_db_transactions_total",
    "Batch transactions by result: committed, transient_error, systemic_error, record_error.",
);
const BATCH_SIZE: Describe = ("booking_worker_batch_size", "Records per committed batch transaction.");
const BATCH_SIZE_BUCKETS: [f64; 11] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0];
const LAG: Describe = (
    "booking_worker_consumer_lag",
    "Records between the stored offset and the partition's high watermark (librdkafka consumer_lag_stored).",
);
const PARKED: Describe = (
    "booking_worker_parked_cancellations",
    "Cancellations waiting for their booking.",
);
const CHANNEL_DEPTH: Describe = (
    "booking_worker_channel_depth",
    "Records queued between partition threads and writers.",
);
const IN_FLIGHT_BYTES: Describe = (
    "booking_worker_in_flight_bytes",
    "Payload bytes of records between partition threads and writers (capped by MAX_IN_FLIGHT_BYTES).",
);
const ASSIGNED: Describe = ("booking_worker_assigned_partitions", "Partitions this instance holds.");
const RELEASED: Describe = (
    "booking_worker_released_cancellations_total",
    "Parked cancellations applied or dead-lettered when their booking arrived.",
);
const HALTED: Describe = (
    "booking_worker_halted",
    "1 while the worker is halted because the database cannot take its writes (see /readyz for the SQLSTATE).",
);
const HALTS: Describe = (
    "booking_worker_halts_total",
    "Times the worker halted on a systemic database error or a tripped circuit breaker.",
);
const BREAKER_TRIPS: Describe = (
    "booking_worker_circuit_breaker_trips_total",
    "Times the circuit breaker tripped: more than DB_REJECT_HALT_AFTER records in a row refused by the database.",
);

const READY: Describe = (
    "booking_worker_ready",
    "1 while /readyz would answer 200: the database answers, the worker is not halted, a broker answers and the group has assigned partitions.",
);
const KAFKA_BROKERS_UP: Describe = (
    "booking_worker_kafka_brokers_up",
    "Brokers the Kafka client holds an open, usable connection to, as its last statistics said (0 after an all-brokers-down error).",
);
const KAFKA_CONTACT_AGE: Describe = (
    "booking_worker_kafka_last_contact_age_seconds",
    "Seconds since any broker last answered the Kafka client (fetches, heartbeats, metadata), as of this scrape.",
);

/// Every metric the worker exports.
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    dead_letters: IntCounterVec,
    latency: HistogramVec,
    end_to_end: HistogramVec,
    transactions: IntCounterVec,
    batch_size: Histogram,
    lag: IntGaugeVec,
    parked: IntGauge,
    channel_depth: IntGauge,
    in_flight_bytes: IntGauge,
    assigned: IntGauge,
    released: IntCounter,
    halted: IntGauge,
    halts: IntCounter,
    breaker_trips: IntCounter,
    ready: IntGauge,
    kafka_brokers_up: IntGauge,
    kafka_contact_age: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registered once");
        Arc::new(Metrics {
            events: counter_vec(&r, EVENTS, &["topic", "outcome", "reason"]),
            dead_letters: counter_vec(&r, DEAD_LETTERS, &["reason"]),
            latency: latency_histogram(&r, PROCESSING),
            end_to_end: latency_histogram(&r, END_TO_END),
            transactions: counter_vec(&r, TRANSACTIONS, &["result"]),
            batch_size: registered(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(BATCH_SIZE.0, BATCH_SIZE.1).buckets(BATCH_SIZE_BUCKETS.to_vec()),
                ),
            ),
            lag: registered(&r, IntGaugeVec::new(Opts::new(LAG.0, LAG.1), &["topic", "partition"])),
            parked: gauge(&r, PARKED),
            channel_depth: gauge(&r, CHANNEL_DEPTH),
            in_flight_bytes: gauge(&r, IN_FLIGHT_BYTES),
            assigned: gauge(&r, ASSIGNED),
            released: registered(&r, IntCounter::new(RELEASED.0, RELEASED.1)),
            halted: gauge(&r, HALTED),
            halts: registered(&r, IntCounter::new(HALTS.0, HALTS.1)),
            breaker_trips: registered(&r, IntCounter::new(BREAKER_TRIPS.0, BREAKER_TRIPS.1)),
            ready: gauge(&r, READY),
            kafka_brokers_up: gauge(&r, KAFKA_BROKERS_UP),
            kafka_contact_age: registered(&r, Gauge::new(KAFKA_CONTACT_AGE.0, KAFKA_CONTACT_AGE.1)),
            registry: r,
        })
    }

    /// The end of one consumed record: `seconds` since it was consumed, `since_produced` since
    /// its Kafka timestamp.
    pub fn record_end(
        &self,
        topic: &str,
        kind: Option<EventKind>,
        outcome: &Outcome,
        seconds: f64,
        since_produced: Option<f64>,
    ) {
        let (name, reason) = outcome_labels(outcome);
        self.events.with_label_values(&[topic, name, reason]).inc();
        if let Outcome::DeadLettered(r) = outcome {
            self.dead_letters.with_label_values(&[r.reason.as_str()]).inc();
        }
        let event_type = kind.map_or("undecodable", EventKind::as_str);
        self.latency.with_label_values(&[event_type]).observe(seconds);
        if let Some(s) = since_produced {
            self.end_to_end.with_label_values(&[event_type]).observe(s);
        }
    }

    /// The end of a parked cancellation released by its booking (its record ended earlier).
    pub fn record_released(&self, outcome: &Outcome) {
        self.released.inc();
        if let Outcome::DeadLettered(r) = outcome {
            self.dead_letters.with_label_values(&[r.reason.as_str()]).inc();
        }
    }

    /// Parked cancellations that expired into dead letters.
    pub fn record_expired(&self, n: usize) {
        self.dead_letters
            .with_label_values(&["cancellation_expired"])
            .inc_by(n as u64);
    }

    pub fn transaction(&self, result: &str, records: usize) {
        self.transactions.with_label_values(&[result]).inc();
        if result == "committed" {
            self.batch_size.observe(records as f64);
        }
    }

    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag.with_label_values(&[topic, &partition.to_string()]).set(lag);
    }

    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let _ = self.lag.remove_label_values(&[topic, &partition.to_string()]);
    }

    pub fn set_parked(&self, n: i64) {
        self.parked.set(n);
    }

    pub fn set_channel_depth(&self, n: usize) {
        self.channel_depth.set(n as i64);
    }

    /// The worker halted: one more halt.
    pub fn count_halt(&self) {
        self.halts.inc();
    }

    /// The circuit breaker tripped (it halts the worker, which [`Metrics::count_halt`] counts too).
    pub fn count_breaker_trip(&self) {
        self.breaker_trips.inc();
    }

    /// Whether the worker is halted now.
    pub fn set_halted(&self, halted: bool) {
        self.halted.set(i64::from(halted));
    }

    pub fn set_in_flight_bytes(&self, n: usize) {
        self.in_flight_bytes.set(n as i64);
    }

    pub fn set_assigned(&self, n: usize) {
        self.assigned.set(n as i64);
    }

    /// Partitions this instance holds now.
    pub fn assigned(&self) -> i64 {
        self.assigned.get()
    }

    /// What readiness saw at this scrape: ready or not, the brokers up, and the seconds since a
    /// broker last answered.
    pub fn set_readiness(&self, ready: bool, brokers_up: i64, contact_age_secs: f64) {
        self.ready.set(i64::from(ready));
        self.kafka_brokers_up.set(brokers_up);
        self.kafka_contact_age.set(contact_age_secs);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::warn!(error = e.to_string(); "could not encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The one-line summary logged every `STATS_LOG_INTERVAL_SECS`.
    pub fn summary(&self) -> Summary {
        let families = self.registry.gather();
        let mut s = Summary::default();
        for family in &families {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                match family.name() {
                    "booking_worker_events_total" => {
                        let n = m.get_counter().get_value() as u64;
                        s.consumed += n;
                        match label("outcome").as_str() {
                            "applied" | "adopted" => s.applied += n,
                            "duplicate" | "noop" => s.noop += n,
                            "parked" => s.parked_events += n,
                            _ => s.dead_lettered += n,
                        }
                    }
                    "booking_worker_consumer_lag" => s.lag += m.get_gauge().get_value().max(0.0) as i64,
                    "booking_worker_parked_cancellations" => s.parked_now = m.get_gauge().get_value() as i64,
                    "booking_worker_channel_depth" => s.channel_depth = m.get_gauge().get_value() as i64,
                    "booking_worker_assigned_partitions" => s.partitions = m.get_gauge().get_value() as i64,
                    "process_resident_memory_bytes" => s.rss_bytes = m.get_gauge().get_value() as i64,
                    _ => {}
                }
            }
        }
        s
    }
}

/// The `outcome` and `reason` labels of an end.
fn outcome_labels(outcome: &Outcome) -> (&'static str, &'static str) {
    match outcome {
        Outcome::Created { .. } | Outcome::Cancelled { .. } => ("applied", ""),
        Outcome::Adopted { .. } => ("adopted", ""),
        Outcome::Duplicate => ("duplicate", ""),
        Outcome::AlreadyCancelled { .. } | Outcome::AlreadyDeadLettered => ("noop", ""),
        Outcome::Parked => ("parked", ""),
        Outcome::DeadLettered(r) => ("dead_lettered", r.reason.as_str()),
    }
}

/// Registers a metric and returns it. The names and labels are fixed, so a failure is a defect.
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter_vec(registry: &Registry, (name, help): Describe, labels: &[&str]) -> IntCounterVec {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, (name, help): Describe) -> IntGauge {
    registered(registry, IntGauge::new(name, help))
}

/// A latency histogram in seconds, by event type.
fn latency_histogram(registry: &Registry, (name, help): Describe) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    registered(registry, HistogramVec::new(opts, &["event_type"]))
}

/// Totals since start, for the periodic stats line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub consumed: u64,
    pub applied: u64,
    pub noop: u64,
    pub parked_events: u64,
    pub dead_lettered: u64,
    pub lag: i64,
    pub parked_now: i64,
    pub channel_depth: i64,
    pub partitions: i64,
    pub rss_bytes: i64,
}

impl Summary {
    pub fn log(&self) {
        log::info!(
            consumed = self.consumed, applied = self.applied, noop = self.noop,
            parked = self.parked_events, dead_lettered = self.dead_lettered, lag = self.lag,
            parked_now = self.parked_now, channel_depth = self.channel_depth,
            partitions = self.partitions, rss_bytes = self.rss_bytes;
            "stats"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Reason, Rejection};

    #[test]
    fn ends_are_counted_by_topic_outcome_and_reason() {
        let m = Metrics::new();
        m.record_end(
            "booking-events",
            Some(EventKind::Booking),
            &Outcome::Created { id: 1 },
            0.004,
            Some(0.25),
        );
        m.record_end(
            "booking-events",
            Some(EventKind::Booking),
            &Outcome::Duplicate,
            0.002,
            None,
        );
        let dead = Outcome::DeadLettered(Rejection::new(Reason::UnknownUser, "x"));
        m.record_end("booking-events", Some(EventKind::Booking), &dead, 0.003, None);
        m.record_end("booking-cancellations", None, &Outcome::Parked, 0.003, None);
        m.record_end(
            "booking-events",
            Some(EventKind::Booking),
            &Outcome::Adopted { id: 2 },
            0.003,
            Some(0.5),
        );
        m.record_expired(2);
        let text = m.render();
        assert!(
            text.contains(r#"booking_worker_events_total{outcome="applied",reason="",topic="booking-events"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"booking_worker_events_total{outcome="dead_lettered",reason="unknown_user",topic="booking-events"} 1"#
        ));
        assert!(text.contains(r#"booking_worker_dead_letters_total{reason="cancellation_expired"} 2"#));
        assert!(text.contains(r#"booking_worker_processing_seconds_count{event_type="booking"} 4"#));
        assert!(text.contains(r#"booking_worker_end_to_end_seconds_count{event_type="booking"} 2"#));
        assert!(text.contains(r#"booking_worker_events_total{outcome="adopted",reason="",topic="booking-events"} 1"#));
        let s = m.summary();
        assert_eq!(
            (s.consumed, s.applied, s.noop, s.parked_events, s.dead_lettered),
            (5, 2, 1, 1, 1)
        );
    }

    #[test]
    fn breaker_trips_are_exported_from_zero() {
        let m = Metrics::new();
        assert!(m.render().contains("\nbooking_worker_circuit_breaker_trips_total 0\n"));
        m.count_breaker_trip();
        m.count_breaker_trip();
        assert!(m.render().contains("\nbooking_worker_circuit_breaker_trips_total 2\n"));
    }

    /// The alert on restarts and the dashboard's memory and CPU panels read these.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_metrics_are_exported() {
        let text = Metrics::new().render();
        for name in [
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
                .parse()
                .unwrap();
            assert!(value >= 0.0, "{name} {value}");
        }
        let started = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(started > 1.5e9 && started <= now, "started at {started}");
    }

    #[test]
    fn lag_gauges_come_and_go_with_partitions() {
        let m = Metrics::new();
        m.set_lag("t", 3, 42);
        assert!(m
            .render()
            .contains(r#"booking_worker_consumer_lag{partition="3",topic="t"} 42"#));
        assert_eq!(m.summary().lag, 42);
        m.forget_partition("t", 3);
        assert!(!m.render().contains("booking_worker_consumer_lag{"));
    }
}
