//! The reliability harness: a known stream (the load generator's plan, and hostile records) flows
//! through the real broker and database while faults are injected, then the final database is
//! compared row by row with the exact expected ledger: nothing lost, nothing doubled.
//!
//! One test per scenario: SIGKILL ten times; PostgreSQL refusing connections and then having its
//! backends terminated; the broker stopped and restarted; three instances in one group rebalancing
//! (eager and cooperative); a flood of hostile records. `RELIABILITY_EVENTS` sets the bookings per
//! scenario (a few thousand by default; `scripts/reliability.sh` runs 50 000), and
//! `RELIABILITY_REPORT`, when set, is a file each scenario appends one JSON line of figures to.
//!
//! The modules: `scenario` runs a scenario and reports it, `publisher` sends its records,
//! `ledger` holds what it expects and compares the database with that, `hostile` makes the
//! hostile records, `processes` runs a broker of its own and keeps the workers' logs, and
//! `progress` reads committed offsets and the times of durable writes.

#[path = "../common/mod.rs"]
mod common;
mod hostile;
mod ledger;
mod processes;
mod progress;
mod publisher;
mod scenario;

use chrono::Utc;
use common::own::OwnBroker;
use common::{CuttableProxy, WAIT};
use scenario::Scenario;
use std::time::{Duration, Instant};

#[test]
fn sigkill_at_ten_random_moments_then_restart_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("sigkill", Duration::from_secs(30)) else {
        return;
    };
    // A killed member leaves the group only when its session times out, and the restarted worker
    // waits for that: a short session keeps ten kills within the stream.
    let session = [
        ("KAFKA_PROP_SESSION_TIMEOUT_MS", "2000"),
        ("KAFKA_PROP_HEARTBEAT_INTERVAL_MS", "250"),
    ];
    let mut moments: Vec<f64> = (0..10).map(|_| 0.05 + 0.85 * sc.rng.f64()).collect();
    moments.sort_by(f64::total_cmp);
    let mut worker = sc.spawn("sigkill-0", &session);
    let mut spawned = Utc::now();
    sc.publish();
    for (i, moment) in moments.iter().enumerate() {
        // At a random moment, but only once the worker is writing again, so that every kill
        // lands on a working worker and every restart's recovery is seen.
        sc.at(*moment);
        sc.wait_progress(spawned, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(sc.rng.u64(0..1000)));
        worker.signal("KILL");
        let code = worker.wait(WAIT);
        assert_eq!(code, -1, "killed by a signal");
        sc.note(&format!("SIGKILL {} of 10 (pid {})", i + 1, worker.pid()));
        worker = sc.spawn(&format!("sigkill-{}", i + 1), &session);
        spawned = Utc::now();
        sc.fault_ended(format!("restart after SIGKILL {}", i + 1));
    }
    sc.finish(vec![worker]);
}

#[test]
fn postgres_refusing_connections_then_terminating_backends_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("postgres", Duration::from_secs(30)) else {
        return;
    };
    let proxy = CuttableProxy::start(&sc.setup.services.db_host, sc.setup.services.db_port);
    let port = proxy.port.to_string();
    let worker = sc.spawn("postgres", &[("DB_HOST", "127.0.0.1"), ("DB_PORT", &port)]);
    sc.publish();
    let outage = Duration::from_secs(10);

    sc.at(0.12);
    sc.note("PostgreSQL refuses connections");
    proxy.refuse();
    std::thread::sleep(outage);
    proxy.restore();
    sc.fault_ended("connections accepted again");

    sc.at(0.55);
    sc.note("terminating the worker's backends for 10 s");
    let (terminated, in_transaction) = terminate_worker_backends(&sc, outage);
    sc.fault_ended(format!(
        "backends no longer terminated ({terminated} terminated, {in_transaction} of them busy)"
    ));
    assert!(terminated > 0, "the worker had connections to terminate");
    sc.finish(vec![worker]);
}

/// Terminates every backend the worker holds in the scenario's database, ten times a second for
/// `outage`. Returns how many were terminated, and how many of those were not idle.
fn terminate_worker_backends(sc: &Scenario, outage: Duration) -> (i64, i64) {
    let mut admin = sc.setup.db.conn();
    let until = Instant::now() + outage;
    let (mut terminated, mut in_transaction) = (0i64, 0i64);
    while Instant::now() < until {
        let k = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n_all,
                        count(*) FILTER (WHERE state <> 'idle') AS n_busy
                   FROM pg_stat_activity
                  WHERE datname = $1 AND application_name = 'booking-worker' AND pid <> pg_backend_pid()",
                &[&sc.setup.db.name],
            )
            .expect("terminate the worker's backends");
        terminated += k.get::<_, i64>(0);
        in_transaction += k.get::<_, i64>(1);
        std::thread::sleep(Duration::from_millis(100));
    }
    (terminated, in_transaction)
}

#[test]
fn kafka_broker_stopped_and_restarted_mid_stream_loses_and_doubles_nothing() {
    if common::services().is_none() {
        return;
    }
    let broker = OwnBroker::start();
    let Some(mut sc) = Scenario::on_broker("kafka", Duration::from_secs(24), &broker.brokers) else {
        return;
    };
    let mut worker = sc.spawn("kafka", &[]);
    sc.publish();
    sc.at(0.2);
    sc.note("stopping the broker (data kept)");
    broker.kafka("stop", true);
    sc.note("broker stopped; down for 10 s");
    std::thread::sleep(Duration::from_secs(10));
    assert!(worker.is_running(), "the worker rides out the broker's absence");
    broker.kafka("start", false);
    sc.fault_ended("broker started again");
    assert!(worker.is_running(), "the worker recovers without a restart of its own");
    let pid = worker.pid();
    sc.note(&format!("the same worker (pid {pid}) carries on"));
    sc.finish(vec![worker]);
    drop(broker);
}

/// Three instances of one group, each started, stopped (SIGTERM or SIGKILL) and replaced in
/// turn while the stream flows; `extra` is the environment that picks the group protocol.
fn three_instances_in_turns(name: &'static str, extra: &[(&str, &str)]) {
    let Some(mut sc) = Scenario::new(name, Duration::from_secs(30)) else {
        return;
    };
    let extra = extra.to_vec();
    let a1 = sc.spawn(&format!("{name}-a1"), &extra);
    sc.publish();
    sc.at(0.08);
    let b1 = sc.spawn(&format!("{name}-b1"), &extra);
    sc.fault_ended("b1 joined");
    sc.at(0.18);
    let c1 = sc.spawn(&format!("{name}-c1"), &extra);
    sc.fault_ended("c1 joined");
    sc.at(0.30);
    assert_eq!(a1.terminate(WAIT), 0, "a1 stops cleanly mid-stream");
    sc.fault_ended("a1 stopped (SIGTERM)");
    sc.at(0.42);
    let a2 = sc.spawn(&format!("{name}-a2"), &extra);
    sc.fault_ended("a2 joined");
    sc.at(0.54);
    let mut b1 = b1;
    b1.signal("KILL");
    assert_eq!(b1.wait(WAIT), -1);
    sc.fault_ended("b1 killed (SIGKILL)");
    sc.at(0.64);
    let b2 = sc.spawn(&format!("{name}-b2"), &extra);
    sc.fault_ended("b2 joined");
    sc.at(0.74);
    assert_eq!(c1.terminate(WAIT), 0, "c1 stops cleanly mid-stream");
    sc.fault_ended("c1 stopped (SIGTERM)");
    sc.at(0.84);
    let c2 = sc.spawn(&format!("{name}-c2"), &extra);
    sc.fault_ended("c2 joined");
    sc.finish(vec![a2, b2, c2]);
}

#[test]
fn three_instances_started_and_stopped_in_turns_eager_loses_and_doubles_nothing() {
    three_instances_in_turns("group-eager", &[]);
}

#[test]
fn three_instances_started_and_stopped_in_turns_cooperative_loses_and_doubles_nothing() {
    three_instances_in_turns(
        "group-coop",
        &[("KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY", "cooperative-sticky")],
    );
}

#[test]
fn three_instances_started_and_stopped_in_turns_kip_848_consumer_protocol_loses_and_doubles_nothing() {
    three_instances_in_turns("group-consumer", &[("KAFKA_GROUP_PROTOCOL", "consumer")]);
}

#[test]
fn a_flood_of_hostile_records_loses_and_doubles_nothing() {
    let Some(mut sc) = Scenario::new("hostile", Duration::from_secs(12)) else {
        return;
    };
    let flood = (sc.expected.bookings.len() / 10).max(200);
    let hostile = hostile::hostile_records(&sc.setup.db, &mut sc.fixtures, &mut sc.expected, flood, &mut sc.rng);
    let planned = std::mem::take(&mut sc.records);
    sc.records = hostile::scatter(planned, hostile, &mut sc.rng);
    sc.expected.records = sc.records.len();
    sc.expected.dead_letter_ids.sort();
    sc.note(&format!("{} records, {flood} of the flood hostile", sc.records.len()));

    let worker = sc.spawn("hostile", &[("MAX_PAYLOAD_BYTES", "1048576")]);
    sc.publish();
    sc.finish(vec![worker]);
}
