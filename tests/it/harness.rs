//! Proves the test harness end to end against the real services: a record with a `Baggage` header
//! goes through the real broker and comes back through a split partition queue, and a query
//! round-trips through the r2d2 pool against the schema in `sql/`.

use crate::common;

use booking_worker::baggage::{self, HeaderBaggage};
use booking_worker::config::Config;
use booking_worker::{database, kafka, repository};
use common::{services, services_from, unique, TestDb, TestProducer};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientConfig, ClientContext, Message};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Splits every assigned partition's queue in `pre_rebalance`, before `assign()`.
#[derive(Default)]
struct SplitContext {
    consumer: OnceLock<Weak<BaseConsumer<SplitContext>>>,
    queues: Mutex<Vec<PartitionQueue<SplitContext>>>,
}

impl ClientContext for SplitContext {}

impl ConsumerContext for SplitContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let consumer = self.consumer.get().and_then(Weak::upgrade).expect("consumer is set");
            for e in tpl.elements() {
                let queue = consumer.split_partition_queue(e.topic(), e.partition()).expect("split");
                self.queues.lock().unwrap().push(queue);
            }
        }
    }
}

#[test]
fn a_baggage_header_survives_the_real_broker_through_a_split_partition_queue() {
    let Some(services) = services() else { return };
    let topic = unique("harness-events");
    let producer = TestProducer::new(&services);
    producer.send(
        &topic,
        "booking_456",
        br#"{"bookingId":"booking_456"}"#,
        &[("Baggage", b"trace-id=abc123,span-id=def456")],
    );
    producer.flush();

    let consumer: BaseConsumer<SplitContext> = ClientConfig::new()
        .set("bootstrap.servers", &services.brokers)
        .set("group.id", unique("harness-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create_with_context(SplitContext::default())
        .expect("create consumer");
    let consumer = Arc::new(consumer);
    consumer.context().consumer.set(Arc::downgrade(&consumer)).ok();
    consumer.subscribe(&[&topic]).expect("subscribe");

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            panic!("a message reached the main queue: {:?}", message.map(|m| m.offset()));
        }
        for queue in consumer.context().queues.lock().unwrap().iter() {
            if let Some(Ok(message)) = queue.poll(Duration::from_millis(50)) {
                let headers = kafka::raw_headers(&message);
                found = Some((
                    message.key().map(<[u8]>::to_vec),
                    baggage::find(&headers),
                    message.payload().map(<[u8]>::to_vec),
                ));
            }
        }
    }
    let (key, found_baggage, payload) = found.expect("the record came back through a partition queue");
    assert_eq!(key.as_deref(), Some(&b"booking_456"[..]));
    assert_eq!(payload.as_deref(), Some(&br#"{"bookingId":"booking_456"}"#[..]));
    assert_eq!(
        found_baggage,
        HeaderBaggage::Present("trace-id=abc123,span-id=def456".into())
    );
    assert_eq!(
        baggage::get(found_baggage.text().unwrap(), "trace-id").as_deref(),
        Some("abc123")
    );
}

#[test]
fn a_query_round_trips_through_the_r2d2_pool_against_the_schema() {
    let Some(services) = services() else { return };
    let db = TestDb::create(&services, "pool");
    let id = db.user("pool@example.com", "pool_user");
    let vars: Vec<(String, String)> = db.worker_env();
    let config = Config::from_vars(&vars).expect("config");
    let pool = database::Pool::new(&config.database).expect("pool");
    let mut conn = pool.get().expect("a pooled connection");
    repository::ping(conn.client()).expect("ping");
    let row = conn
        .query_one(
            "SELECT u.id, u.username::text,
                    (SELECT data_type::text FROM information_schema.columns
                      WHERE table_name = 'bookings' AND column_name = 'external_id') AS external_id_type
               FROM users u WHERE u.id = $1",
            &[&id],
        )
        .expect("round trip");
    assert_eq!(row.get::<_, i32>(0), id);
    assert_eq!(row.get::<_, String>(1), "pool_user");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("character varying"));
    let resolved: i64 = conn
        .query_one(
            "SELECT count(booking_worker.resolve_user_id(r)) FROM unnest($1::text[]) AS r",
            &[&vec!["pool_user", "pool@example.com", &id.to_string(), "nobody"]],
        )
        .expect("resolve")
        .get(0);
    assert_eq!(resolved, 3, "by username, email and id; \"nobody\" is no user");
}

#[test]
fn migrations_are_idempotent_and_refuse_a_database_without_the_schema() {
    let Some(services) = services() else { return };
    let db = TestDb::create(&services, "migrate");
    let mut conn = db.conn();
    let lock_timeout = Duration::from_secs(2);
    assert!(repository::migrate(&mut conn, lock_timeout)
        .expect("second run")
        .is_empty());
    assert!(repository::pending(&mut conn).unwrap().is_empty());
    db.exec("DELETE FROM booking_worker.schema_migrations WHERE version = 2");
    assert_eq!(repository::pending(&mut conn).unwrap(), ["0002_dead_letter_sqlstate"]);
    assert_eq!(
        repository::migrate(&mut conn, lock_timeout).expect("a statement runs twice"),
        ["0002_dead_letter_sqlstate"]
    );
    db.exec("DROP TABLE bookings CASCADE");
    db.exec("DELETE FROM booking_worker.schema_migrations");
    let err = repository::migrate(&mut conn, lock_timeout).expect_err("bookings is missing");
    let repository::MigrateError::Database(err) = err else {
        panic!("not a database error: {err:?}")
    };
    assert!(err.message.contains("bookings"), "{err}");
    assert_eq!(err.class, booking_worker::database::ErrorClass::Systemic);
}

#[test]
#[should_panic(expected = "required service missing")]
fn a_missing_broker_fails_the_run_when_services_are_required() {
    let vars = |name: &str| match name {
        "KAFKA_BROKERS" => Some("127.0.0.1:1".to_string()),
        "BOOKING_WORKER_REQUIRE_SERVICES" => Some("1".to_string()),
        _ => std::env::var(name).ok(),
    };
    services_from(&vars);
}

#[test]
#[should_panic(expected = "required service missing")]
fn a_missing_database_fails_the_run_when_services_are_required() {
    let vars = |name: &str| match name {
        "DB_HOST" => Some("127.0.0.1".to_string()),
        "DB_PORT" => Some("1".to_string()),
        "BOOKING_WORKER_REQUIRE_SERVICES" => Some("1".to_string()),
        _ => std::env::var(name).ok(),
    };
    services_from(&vars);
}
