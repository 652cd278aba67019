//! JSON log lines on stdout, one object per line, like the Go worker's slog output.
//!
//! Each line has `time` (RFC 3339 UTC), `level`, `msg`, the structured fields given at the call
//! site (`info!(reason = "x"; "...")`), and, while a thread is handling an event, that event's
//! `topic`, `partition`, `offset`, `booking_id` and `baggage` from a thread-local scope.

use log::kv::{Key, Value as KvValue, VisitSource};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::io::Write;

/// What the log lines about one event carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventScope {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub booking_id: Option<String>,
    pub baggage: Option<String>,
}

thread_local! {
    static CURRENT: RefCell<Option<EventScope>> = const { RefCell::new(None) };
}

/// Runs `f` with `scope` as this thread's current event, so every line it logs carries it.
pub fn with_event<R>(scope: EventScope, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(scope)));
    struct Restore(Option<EventScope>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Installs the JSON logger, on stdout or (for commands whose stdout is data) stderr. `RUST_LOG`
/// wins when set; otherwise `default_level` applies to everything.
pub fn init(default_level: &str, to_stderr: bool) {
    let mut builder = env_logger::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(filters) if !filters.trim().is_empty() => builder.parse_filters(&filters),
        _ => builder.parse_filters(default_level),
    };
    builder
        .target(if to_stderr {
            env_logger::Target::Stderr
        } else {
            env_logger::Target::Stdout
        })
        .format(|buf, record| {
            let line = render(record);
            buf.write_all(line.as_bytes())?;
            buf.write_all(b"\n")
        })
        .try_init()
        .ok();
}

/// One log record as its JSON line (without the newline).
pub fn render(record: &log::Record<'_>) -> String {
    let mut object = Map::new();
    object.insert(
        "time".into(),
        Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    object.insert("level".into(), Value::String(record.level().as_str().to_string()));
    object.insert("msg".into(), Value::String(record.args().to_string()));
    if record.level() <= log::Level::Warn || record.target().starts_with("librdkafka") {
        object.insert("target".into(), Value::String(record.target().to_string()));
    }
    CURRENT.with(|c| {
        if let Some(scope) = c.borrow().as_ref() {
            object.insert("topic".into(), Value::String(scope.topic.clone()));
            object.insert("partition".into(), scope.partition.into());
            object.insert("offset".into(), scope.offset.into());
            if let Some(id) = &scope.booking_id {
                object.insert("booking_id".into(), Value::String(id.clone()));
            }
            if let Some(baggage) = &scope.baggage {
                object.insert("baggage".into(), Value::String(baggage.clone()));
            }
        }
    });
    let mut fields = Fields(&mut object);
    let _ = record.key_values().visit(&mut fields);
    Value::Object(object).to_string()
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: KvValue<'kvs>) -> Result<(), log::kv::Error> {
        let json = if let Some(b) = value.to_bool() {
            Value::Bool(b)
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(f) = value.to_f64() {
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        } else {
            Value::String(value.to_string())
        };
        self.0.insert(key.as_str().to_string(), json);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: log::Level, msg: std::fmt::Arguments<'_>) -> Value {
        let kvs: [(&str, KvValue<'_>); 2] = [
            ("reason", KvValue::from("unknown_user")),
            ("count", KvValue::from(3u64)),
        ];
        let record = log::Record::builder()
            .level(level)
            .target("booking_worker::writer")
            .args(msg)
            .key_values(&kvs)
            .build();
        serde_json::from_str(&render(&record)).unwrap()
    }

    #[test]
    fn a_line_is_one_json_object_with_the_standard_fields() {
        let v = line(log::Level::Info, format_args!("booking created"));
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["msg"], "booking created");
        assert_eq!(v["reason"], "unknown_user");
        assert_eq!(v["count"], 3);
        let time = v["time"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{time}"
        );
        assert!(v.get("baggage").is_none());
        assert!(v.get("target").is_none());
    }

    #[test]
    fn the_event_scope_adds_its_fields_and_is_restored() {
        let scope = EventScope {
            topic: "booking-events".into(),
            partition: 3,
            offset: 42,
            booking_id: Some("booking_1".into()),
            baggage: Some("trace-id=abc123".into()),
        };
        let inner = with_event(scope, || line(log::Level::Warn, format_args!("x \"quoted\"\n")));
        assert_eq!(inner["baggage"], "trace-id=abc123");
        assert_eq!(inner["topic"], "booking-events");
        assert_eq!(inner["partition"], 3);
        assert_eq!(inner["offset"], 42);
        assert_eq!(inner["booking_id"], "booking_1");
        assert_eq!(inner["msg"], "x \"quoted\"\n");
        assert_eq!(inner["target"], "booking_worker::writer");
        let after = line(log::Level::Info, format_args!("y"));
        assert!(after.get("baggage").is_none());
    }
}
