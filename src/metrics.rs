//! Prometheus metrics of the worker, and the one-line JSON stats summary for those without
//! Prometheus. One [`Metrics`] is created by `run` and shared by every thread. The ends of records
//! and the outcomes of parked cancellations are counted here only through [`crate::observe`],
//! which logs each of them too.

use crate::models::EventKind;
use crate::pipeline::{End, ParkedOutcome};
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Buckets of the latency histograms, in seconds.
const LATENCY_BUCKETS: [f64; 25] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Each metric's name and help.
type Describe = (&'static str, &'static str);

const EVENTS: &str = "booking_worker_events_total";
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
const OLDEST_PARKED_AGE: Describe = (
    "booking_worker_oldest_parked_age_seconds",
    "Seconds since the oldest parked cancellation was parked (0 when none is), as of the last expiry check.",
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
const PARKED_OUTCOMES: &str = "booking_worker_parked_outcomes_total";
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
    oldest_parked_age: Gauge,
    channel_depth: IntGauge,
    in_flight_bytes: IntGauge,
    assigned: IntGauge,
    parked_outcomes: IntCounterVec,
    halted: IntGauge,
    halts: IntCounter,
    breaker_trips: IntCounter,
    ready: IntGauge,
    kafka_brokers_up: IntGauge,
    kafka_contact_age: Gauge,
    /// Consumed records by end, for the stats line.
    totals: Totals,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registered once");
        Arc::new(Metrics {
            events: counter_vec(&r, (EVENTS, &events_help()), &["topic", "end", "reason"]),
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
            oldest_parked_age: registered(&r, Gauge::new(OLDEST_PARKED_AGE.0, OLDEST_PARKED_AGE.1)),
            channel_depth: gauge(&r, CHANNEL_DEPTH),
            in_flight_bytes: gauge(&r, IN_FLIGHT_BYTES),
            assigned: gauge(&r, ASSIGNED),
            parked_outcomes: counter_vec(&r, (PARKED_OUTCOMES, &parked_outcomes_help()), &["outcome", "reason"]),
            halted: gauge(&r, HALTED),
            halts: registered(&r, IntCounter::new(HALTS.0, HALTS.1)),
            breaker_trips: registered(&r, IntCounter::new(BREAKER_TRIPS.0, BREAKER_TRIPS.1)),
            ready: gauge(&r, READY),
            kafka_brokers_up: gauge(&r, KAFKA_BROKERS_UP),
            kafka_contact_age: registered(&r, Gauge::new(KAFKA_CONTACT_AGE.0, KAFKA_CONTACT_AGE.1)),
            totals: Totals::default(),
            registry: r,
        })
    }

    /// The end of one consumed record: `seconds` since it was consumed, `since_produced` since
    /// its Kafka timestamp.
    pub fn record_end(
        &self,
        topic: &str,
        kind: Option<EventKind>,
        end: &End,
        seconds: f64,
        since_produced: Option<f64>,
    ) {
        self.events
            .with_label_values(&[topic, end.as_str(), end.reason()])
            .inc();
        self.totals.count(end);
        self.dead_letter(end.reason(), 1);
        let event_type = kind.map_or("undecodable", EventKind::as_str);
        self.latency.with_label_values(&[event_type]).observe(seconds);
        if let Some(s) = since_produced {
            self.end_to_end.with_label_values(&[event_type]).observe(s);
        }
    }

    /// `n` parked cancellations that left the parking with `outcome`.
    pub fn record_parked_outcome(&self, outcome: &ParkedOutcome, n: usize) {
        let n = n as u64;
        self.parked_outcomes
            .with_label_values(&[outcome.as_str(), outcome.reason()])
            .inc_by(n);
        self.dead_letter(outcome.reason(), n);
    }

    /// `n` dead letters of `reason`; none when the reason is empty (the end is no dead letter).
    fn dead_letter(&self, reason: &str, n: u64) {
        if !reason.is_empty() {
            self.dead_letters.with_label_values(&[reason]).inc_by(n);
        }
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

    /// The parked cancellations now: how many, and the oldest one's age.
    pub fn set_parked(&self, n: i64, oldest_age_secs: f64) {
        self.parked.set(n);
        self.oldest_parked_age.set(oldest_age_secs);
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

    /// The one-line summary logged every `STATS_LOG_INTERVAL_SECS`, from the metrics' own handles.
    pub fn summary(&self) -> Summary {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let t = &self.totals;
        let (applied, noop, parked, dead) = (load(&t.applied), load(&t.noop), load(&t.parked), load(&t.dead_lettered));
        let lag = self.lag.collect();
        Summary {
            consumed: applied + noop + parked + dead,
            applied,
            noop,
            parked_events: parked,
            dead_lettered: dead,
            lag: lag
                .iter()
                .flat_map(|family| family.get_metric())
                .map(|m| m.get_gauge().get_value().max(0.0) as i64)
                .sum(),
            parked_now: self.parked.get(),
            channel_depth: self.channel_depth.get(),
            partitions: self.assigned.get(),
            rss_bytes: resident_bytes(),
        }
    }
}

/// Consumed records since the start, by what the stats line calls their end.
#[derive(Default)]
struct Totals {
    applied: AtomicU64,
    noop: AtomicU64,
    parked: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Totals {
    fn count(&self, end: &End) {
        let total = match end {
            End::Created { .. } | End::Adopted { .. } | End::Cancelled { .. } => &self.applied,
            End::Duplicate | End::AlreadyCancelled { .. } | End::AlreadyDeadLettered => &self.noop,
            End::Parked => &self.parked,
            End::DeadLettered(_) => &self.dead_lettered,
        };
        total.fetch_add(1, Ordering::Relaxed);
    }
}

/// The help of `booking_worker_events_total`, naming every end.
fn events_help() -> String {
    format!(
        "Consumed records by topic, end ({}) and reason (of a dead letter; empty otherwise).",
        End::NAMES.join(", ")
    )
}

/// The help of `booking_worker_parked_outcomes_total`, naming every outcome.
fn parked_outcomes_help() -> String {
    let names: Vec<&str> = ParkedOutcome::names().collect();
    format!(
        "Parked cancellations that left the parking, by outcome ({}) and reason (of a dead letter; empty otherwise).",
        names.join(", ")
    )
}

/// The process's resident memory in bytes (`VmRSS`), as `process_resident_memory_bytes` has it;
/// 0 where `/proc` does not say.
fn resident_bytes() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Registers a metric and returns it. The names and labels are fixed, so a failure is a defect.
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter_vec(registry: &Registry, (name, help): (&str, &str), labels: &[&str]) -> IntCounterVec {
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
    fn ends_are_counted_by_topic_end_and_reason() {
        let m = Metrics::new();
        m.record_end(
            "booking-events",
            Some(EventKind::Booking),
            &End::Created { id: 1 },
            0.004,
            Some(0.25),
        );
        m.record_end("booking-events", Some(EventKind::Booking), &End::Duplicate, 0.002, None);
        let dead = End::DeadLettered(Rejection::new(Reason::UnknownUser, "x"));
        m.record_end("booking-events", Some(EventKind::Booking), &dead, 0.003, None);
        m.record_end("booking-cancellations", None, &End::Parked, 0.003, None);
        m.record_end(
            "booking-events",
            Some(EventKind::Booking),
            &End::Adopted { id: 2 },
            0.003,
            Some(0.5),
        );
        m.record_parked_outcome(&ParkedOutcome::Expired, 2);
        m.record_parked_outcome(&ParkedOutcome::Released(End::Cancelled { id: 3 }), 1);
        let text = m.render();
        for line in [
            r#"booking_worker_events_total{end="created",reason="",topic="booking-events"} 1"#,
            r#"booking_worker_events_total{end="dead_lettered",reason="unknown_user",topic="booking-events"} 1"#,
            r#"booking_worker_events_total{end="adopted",reason="",topic="booking-events"} 1"#,
            r#"booking_worker_dead_letters_total{reason="cancellation_expired"} 2"#,
            r#"booking_worker_dead_letters_total{reason="unknown_user"} 1"#,
            r#"booking_worker_parked_outcomes_total{outcome="expired",reason="cancellation_expired"} 2"#,
            r#"booking_worker_parked_outcomes_total{outcome="cancelled",reason=""} 1"#,
            r#"booking_worker_processing_seconds_count{event_type="booking"} 4"#,
            r#"booking_worker_end_to_end_seconds_count{event_type="booking"} 2"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let s = m.summary();
        assert_eq!(
            (s.consumed, s.applied, s.noop, s.parked_events, s.dead_lettered),
            (5, 2, 1, 1, 1)
        );
        assert!(s.rss_bytes > 0, "{s:?}");
    }

    #[test]
    fn the_help_of_the_end_metrics_names_every_end_and_outcome() {
        let events = events_help();
        for name in End::NAMES {
            assert!(events.contains(name), "{name} in {events}");
        }
        let parked = parked_outcomes_help();
        for name in ParkedOutcome::names() {
            assert!(parked.contains(name), "{name} in {parked}");
        }
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
