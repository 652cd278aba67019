//! JSON log lines on stdout, one object per line, like the Go worker's slog output.
//!
//! Each line has `time` (RFC 3339 UTC), `level`, `msg`, the structured fields given at the call
//! site (`info!(reason = "x"; "...")`), and, while a thread is handling an event, that event's
//! `topic`, `partition`, `offset`, `booking_id` and `baggage` from a thread-local scope.

use log::kv::{Key, Value as KvValue, VisitSource};
use serde_json::Value;
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
    /// Lines held back by [`in_one_write`].
    static HELD: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Where the lines go: stderr (true) or stdout, as chosen by [`init`].
static TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes at once the lines this thread holds back (see [`in_one_write`]), and logs directly from
/// now on: for a panic, whose line must not wait in a buffer that no one will flush.
pub fn release_held() {
    let lines = HELD.with(|h| h.try_borrow_mut().ok().and_then(|mut h| h.take()));
    if let Some(lines) = lines.filter(|l| !l.is_empty()) {
        write_now(&lines);
    }
}

fn write_now(lines: &[u8]) {
    let _ = if TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
        std::io::stderr().lock().write_all(lines)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(lines).and_then(|()| out.flush())
    };
}

/// Runs `f` with the lines this thread logs held back, then writes them all at once: a writer logs
/// one line per record of a committed batch, and one write per batch costs far less than one per
/// line. The lines are written even if `f` panics.
pub fn in_one_write<R>(f: impl FnOnce() -> R) -> R {
    if HELD.with(|h| h.borrow().is_some()) {
        return f();
    }
    HELD.with(|h| *h.borrow_mut() = Some(Vec::new()));
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            let lines = HELD.with(|h| h.borrow_mut().take()).unwrap_or_default();
            if !lines.is_empty() {
                write_now(&lines);
            }
        }
    }
    let _flush = Flush;
    f()
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
    TO_STDERR.store(to_stderr, std::sync::atomic::Ordering::Relaxed);
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
            let mut line = render(record);
            line.push('\n');
            let held = HELD.with(|h| match h.borrow_mut().as_mut() {
                Some(lines) => {
                    lines.extend_from_slice(line.as_bytes());
                    true
                }
                None => false,
            });
            if held {
                return Ok(());
            }
            buf.write_all(line.as_bytes())
        })
        .try_init()
        .ok();
}

/// One log record as its JSON line (without the newline): `time`, `level`, `msg`, `target` (for
/// warnings, errors and librdkafka), the event scope, then the call site's fields, which win over
/// any of the others with the same name.
pub fn render(record: &log::Record<'_>) -> String {
    let mut fields = KeyValues(Vec::new());
    let _ = record.key_values().visit(&mut fields);
    let mut line = Line {
        out: Vec::with_capacity(256),
        fields: &fields.0,
    };
    line.put(
        "time",
        &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    line.put("level", record.level().as_str());
    match record.args().as_str() {
        Some(msg) => line.put("msg", msg),
        None => line.put("msg", &record.args().to_string()),
    }
    if record.level() <= log::Level::Warn || record.target().starts_with("librdkafka") {
        line.put("target", record.target());
    }
    CURRENT.with(|c| {
        if let Some(scope) = c.borrow().as_ref() {
            line.put("topic", &scope.topic);
            line.put("partition", &scope.partition);
            line.put("offset", &scope.offset);
            if let Some(id) = &scope.booking_id {
                line.put("booking_id", id);
            }
            if let Some(baggage) = &scope.baggage {
                line.put("baggage", baggage);
            }
        }
    });
    for (key, value) in &fields.0 {
        line.write(key, value);
    }
    line.out.push(b'}');
    String::from_utf8(line.out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A JSON object being written, one field after another.
struct Line<'a> {
    out: Vec<u8>,
    /// The call site's fields: a standard or scope field of the same name is left out.
    fields: &'a [(String, Value)],
}

impl Line<'_> {
    fn put(&mut self, key: &str, value: &(impl serde::Serialize + ?Sized)) {
        if !self.fields.iter().any(|(k, _)| k == key) {
            self.write(key, value);
        }
    }

    fn write(&mut self, key: &str, value: &(impl serde::Serialize + ?Sized)) {
        self.out.push(if self.out.is_empty() { b'{' } else { b',' });
        // Strings, numbers and JSON values always serialize.
        let _ = serde_json::to_writer(&mut self.out, key);
        self.out.push(b':');
        let _ = serde_json::to_writer(&mut self.out, value);
    }
}

/// The call site's fields, each name once (the last value given wins).
struct KeyValues(Vec<(String, Value)>);

impl<'kvs> VisitSource<'kvs> for KeyValues {
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
        match self.0.iter_mut().find(|(k, _)| k == key.as_str()) {
            Some(slot) => slot.1 = json,
            None => self.0.push((key.as_str().to_string(), json)),
        }
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
    fn a_call_site_field_wins_over_a_standard_one_and_no_name_appears_twice() {
        let kvs: [(&str, KvValue<'_>); 3] = [
            ("topic", KvValue::from("given")),
            ("n", KvValue::from(1u64)),
            ("n", KvValue::from(2u64)),
        ];
        let record = log::Record::builder()
            .level(log::Level::Info)
            .target("booking_worker::kafka")
            .args(format_args!("m"))
            .key_values(&kvs)
            .build();
        let scope = EventScope {
            topic: "booking-events".into(),
            ..EventScope::default()
        };
        let text = with_event(scope, || render(&record));
        assert_eq!(text.matches("\"topic\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"n\"").count(), 1, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["topic"], "given");
        assert_eq!(v["n"], 2);
        assert!(text.starts_with("{\"time\":"), "{text}");
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
