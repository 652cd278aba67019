//! The event contract: booking and cancellation events, their decoding and validation, and the
//! reasons a record can be dead-lettered.
//!
//! Decoding is pure (no I/O): it turns a raw payload into a valid event or a [`Rejection`] that
//! says why, so that every record reaches an end.
//!
//! # The contract
//!
//! `booking-events`, keyed by booking id:
//!
//! ```json
//! {"userId":"user_123","roomId":"room_ocean_001","guests":2,"startDate":"2025-01-15T15:00:00Z",
//!  "endDate":"2025-01-18T11:00:00Z","bookingId":"booking_456","paymentId":"pay_789"}
//! ```
//!
//! `booking-cancellations`, keyed by booking id:
//!
//! ```json
//! {"bookingId":"booking_456","userId":"user_123","timestamp":"2025-01-18T10:30:00Z"}
//! ```
//!
//! - `userId` is a numeric `users.id`, an `email` or a `username`. When more than one user could
//!   match, the id wins, then the email, then the username.
//! - `roomId` is `rooms.internal_id`.
//! - Dates are RFC 3339 timestamps or plain `YYYY-MM-DD`. The booking stores the calendar day as
//!   written (`2025-01-15T23:30:00-05:00` is the 15th). `endDate` must be after `startDate`, and
//!   `guests` at least 1.
//! - `bookingId`, `userId` and `roomId` are at most 255 characters. A `paymentId` of up to 1024
//!   characters passes the decoder, so that booking-management's `payment_id VARCHAR(255)` column
//!   judges it: a longer one is dead-lettered as `database_rejected` with SQLSTATE `22001`.
//! - The booking service's id (`booking_1736950000_AbC123`) is stored in `bookings.external_id`
//!   (unique). A cancellation whose `bookingId` is all digits and matches no external id falls back
//!   to `bookings.id`, so rows created by booking-management can be cancelled too.
//! - A record may carry a `Baggage` header (W3C baggage, name matched case-insensitively); see
//!   `crate::baggage`. It travels with the event and appears as `baggage` on every log line about
//!   it.
//!
//! # Dead-letter reasons
//!
//! | reason | meaning |
//! | --- | --- |
//! | `malformed_json` | the payload is not UTF-8, not JSON, or not a JSON object |
//! | `missing_field` | a required field is absent, null or empty |
//! | `invalid_field` | a field has the wrong type, an invalid date, control characters, or more than 255 characters (1024 for `paymentId`) |
//! | `invalid_guests` | `guests` is below 1 (or absurdly large) |
//! | `invalid_dates` | `endDate` is not after `startDate` |
//! | `payload_too_large` | the payload is larger than `MAX_PAYLOAD_BYTES` (it is still stored whole) |
//! | `unknown_user` | no user has that id, email or username |
//! | `unknown_room` | no room has that internal id |
//! | `unauthorized` | a cancellation by someone other than the booking's owner; the booking is unchanged |
//! | `not_cancellable` | the booking is neither Accepted nor Cancelled (e.g. Refused) |
//! | `cancellation_expired` | a parked cancellation whose booking never came within `PENDING_CANCELLATION_TTL_SECS` |
//! | `database_rejected` | PostgreSQL refused the record's own values (a record-class SQLSTATE, stored in `sqlstate`; see `crate::database`); not an outage: outages are retried forever |
//!
//! # A new event type
//!
//! It touches its model here (and a kind in `EventKind`), its handler in `crate::handlers`, and the
//! table of topics (`TopicTable` in `crate::kafka`), plus the setting that names its topic
//! (`crate::config::settings`, read into `KafkaConfig`).

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use std::fmt;

/// The longest booking, user or room identifier the worker accepts: the width of the worker's own
/// `external_id` column (user and room identifiers are only looked up, never stored).
pub const MAX_ID_LEN: usize = 255;

/// The longest payment id the decoder lets through. The payment id is stored in
/// booking-management's `payment_id` column, whose width that service owns, so the database
/// judges it (a refusal is dead-lettered with its SQLSTATE); this bound only keeps a record small.
pub const MAX_PAYMENT_ID_LEN: usize = 1024;

/// Which contract a topic carries. This is the table of topics: a new event type adds a variant
/// here, its model below and its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Booking,
    Cancellation,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Booking => "booking",
            EventKind::Cancellation => "cancellation",
        }
    }

    /// Decodes and validates a payload of this kind.
    pub fn decode(self, payload: &[u8], max_payload_bytes: usize) -> Result<Event, Rejection> {
        if payload.len() > max_payload_bytes {
            return Err(Rejection::new(
                Reason::PayloadTooLarge,
                format!("payload is {} bytes, the limit is {max_payload_bytes}", payload.len()),
            ));
        }
        let object = parse_object(payload)?;
        let fields = JsonObject(&object);
        match self {
            EventKind::Booking => BookingEvent::from_object(&fields).map(Event::Booking),
            EventKind::Cancellation => CancellationEvent::from_object(&fields).map(Event::Cancellation),
        }
    }
}

/// A decoded, valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Booking(BookingEvent),
    Cancellation(CancellationEvent),
}

impl Event {
    pub fn booking_id(&self) -> &str {
        match self {
            Event::Booking(e) => &e.booking_id,
            Event::Cancellation(e) => &e.booking_id,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::Booking(_) => EventKind::Booking,
            Event::Cancellation(_) => EventKind::Cancellation,
        }
    }
}

/// `booking-events`: a guest booked a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingEvent {
    pub booking_id: String,
    pub user_id: String,
    pub room_id: String,
    pub guests: i32,
    /// Check-in day, as written in the event.
    pub start_date: NaiveDate,
    /// Check-out day, as written in the event; always after `start_date`.
    pub end_date: NaiveDate,
    /// The instants, when the dates were written as RFC 3339 timestamps. The Go worker stored
    /// the instant in a `DATE` column, so the server's time zone picked its day; adopting its rows
    /// needs that day too.
    pub start_instant: Option<DateTime<Utc>>,
    pub end_instant: Option<DateTime<Utc>>,
    pub payment_id: String,
}

impl BookingEvent {
    fn from_object(f: &JsonObject) -> Result<BookingEvent, Rejection> {
        let booking_id = f.id("bookingId")?;
        let user_id = f.id("userId")?;
        let room_id = f.id("roomId")?;
        let payment_id = f.id_within("paymentId", MAX_PAYMENT_ID_LEN)?;
        let guests = f.guests("guests")?;
        let (start_date, start_instant) = f.date("startDate")?;
        let (end_date, end_instant) = f.date("endDate")?;
        if end_date <= start_date {
            return Err(Rejection::new(
                Reason::InvalidDates,
                format!("endDate {end_date} is not after startDate {start_date}"),
            ));
        }
        Ok(BookingEvent {
            booking_id,
            user_id,
            room_id,
            guests,
            start_date,
            end_date,
            start_instant,
            end_instant,
            payment_id,
        })
    }
}

/// `booking-cancellations`: a user asked to cancel a booking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancellationEvent {
    pub booking_id: String,
    pub user_id: String,
    /// When the user asked, as written (validated as RFC 3339 when present).
    pub timestamp: Option<String>,
}

impl CancellationEvent {
    fn from_object(f: &JsonObject) -> Result<CancellationEvent, Rejection> {
        let booking_id = f.id("bookingId")?;
        let user_id = f.id("userId")?;
        let timestamp = match f.0.get("timestamp") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if DateTime::parse_from_rfc3339(s).is_ok() => Some(s.clone()),
            Some(other) => {
                return Err(Rejection::new(
                    Reason::InvalidField,
                    format!("timestamp must be an RFC 3339 timestamp, got {}", describe(other)),
                ))
            }
        };
        Ok(CancellationEvent {
            booking_id,
            user_id,
            timestamp,
        })
    }
}

/// Why a record was dead-lettered. The codes are stable: operators filter on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MalformedJson,
    MissingField,
    InvalidField,
    InvalidGuests,
    InvalidDates,
    PayloadTooLarge,
    UnknownUser,
    UnknownRoom,
    Unauthorized,
    NotCancellable,
    CancellationExpired,
    DatabaseRejected,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::MalformedJson,
        Reason::MissingField,
        Reason::InvalidField,
        Reason::InvalidGuests,
        Reason::InvalidDates,
        Reason::PayloadTooLarge,
        Reason::UnknownUser,
        Reason::UnknownRoom,
        Reason::Unauthorized,
        Reason::NotCancellable,
        Reason::CancellationExpired,
        Reason::DatabaseRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::MissingField => "missing_field",
            Reason::InvalidField => "invalid_field",
            Reason::InvalidGuests => "invalid_guests",
            Reason::InvalidDates => "invalid_dates",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::UnknownUser => "unknown_user",
            Reason::UnknownRoom => "unknown_room",
            Reason::Unauthorized => "unauthorized",
            Reason::NotCancellable => "not_cancellable",
            Reason::CancellationExpired => "cancellation_expired",
            Reason::DatabaseRejected => "database_rejected",
        }
    }

    pub fn parse(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that cannot be applied: its reason code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub error: String,
    /// The server's SQLSTATE, when the database refused the record.
    pub sqlstate: Option<String>,
}

impl Rejection {
    pub fn new(reason: Reason, error: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            error: error.into(),
            sqlstate: None,
        }
    }

    /// A record the database refused, with the server's SQLSTATE.
    pub fn refused(sqlstate: Option<&str>, error: impl Into<String>) -> Rejection {
        Rejection {
            reason: Reason::DatabaseRejected,
            error: error.into(),
            sqlstate: sqlstate.map(str::to_string),
        }
    }
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| Rejection::new(Reason::MalformedJson, format!("payload is not UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Rejection::new(
            Reason::MalformedJson,
            format!("payload must be a JSON object, got {}", describe(&other)),
        )),
        Err(e) => Err(Rejection::new(
            Reason::MalformedJson,
            format!("payload is not JSON: {e}"),
        )),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct JsonObject<'a>(&'a Map<String, Value>);

impl JsonObject<'_> {
    fn present(&self, name: &str) -> Result<&Value, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(Rejection::new(Reason::MissingField, format!("{name} is missing"))),
            Some(v) => Ok(v),
        }
    }

    /// A non-empty identifier of printable characters, at most [`MAX_ID_LEN`] long.
    fn id(&self, name: &str) -> Result<String, Rejection> {
        self.id_within(name, MAX_ID_LEN)
    }

    /// A non-empty identifier of printable characters, at most `max_len` characters. Numbers are
    /// accepted for ids (a numeric user id is common) and kept in their decimal form.
    fn id_within(&self, name: &str, max_len: usize) -> Result<String, Rejection> {
        let text = match self.present(name)? {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) if n.is_u64() => n.to_string(),
            other => {
                return Err(Rejection::new(
                    Reason::InvalidField,
                    format!("{name} must be a string, got {}", describe(other)),
                ))
            }
        };
        if text.is_empty() {
            return Err(Rejection::new(Reason::MissingField, format!("{name} is empty")));
        }
        if text.chars().count() > max_len {
            return Err(Rejection::new(
                Reason::InvalidField,
                format!("{name} is longer than {max_len} characters"),
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(Rejection::new(
                Reason::InvalidField,
                format!("{name} contains control characters"),
            ));
        }
        Ok(text)
    }

    fn guests(&self, name: &str) -> Result<i32, Rejection> {
        let value = self.present(name)?;
        let Some(n) = value.as_i64().or_else(|| value.as_u64().map(|_| i64::MAX)) else {
            return Err(Rejection::new(
                Reason::InvalidField,
                format!("{name} must be a whole number, got {}", describe(value)),
            ));
        };
        if n < 1 {
            return Err(Rejection::new(
                Reason::InvalidGuests,
                format!("{name} is {n}, it must be at least 1"),
            ));
        }
        i32::try_from(n).map_err(|_| Rejection::new(Reason::InvalidGuests, format!("{name} is {n}, too many")))
    }

    /// The day as written, and the instant when it is a timestamp.
    fn date(&self, name: &str) -> Result<(NaiveDate, Option<DateTime<Utc>>), Rejection> {
        let value = self.present(name)?;
        let Value::String(text) = value else {
            return Err(Rejection::new(
                Reason::InvalidField,
                format!("{name} must be a date string, got {}", describe(value)),
            ));
        };
        let day = parse_date(text.trim()).ok_or_else(|| {
            Rejection::new(
                Reason::InvalidField,
                format!("{name} {text:?} is neither an RFC 3339 timestamp nor YYYY-MM-DD"),
            )
        })?;
        let instant = DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|t| t.with_timezone(&Utc));
        Ok((day, instant))
    }
}

/// The calendar day as written: `2025-01-15T23:30:00-05:00` is the 15th, whatever the offset.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    if text.len() == 10 {
        return NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
    }
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.date_naive())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKING: &str = r#"{"userId":"user_123","roomId":"room_ocean_001","guests":2,"startDate":"2025-01-15T15:00:00Z","endDate":"2025-01-18T11:00:00Z","bookingId":"booking_456","paymentId":"pay_789"}"#;
    const CANCELLATION: &str = r#"{"bookingId":"booking_456","userId":"user_123","timestamp":"2025-01-18T10:30:00Z"}"#;

    fn booking(payload: &str) -> Result<Event, Rejection> {
        EventKind::Booking.decode(payload.as_bytes(), 65_536)
    }

    fn with(field: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(BOOKING).unwrap();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value;
        }
        v.to_string()
    }

    #[test]
    fn decodes_the_contract_example() {
        let Event::Booking(b) = booking(BOOKING).unwrap() else {
            panic!()
        };
        assert_eq!(b.booking_id, "booking_456");
        assert_eq!(b.user_id, "user_123");
        assert_eq!(b.room_id, "room_ocean_001");
        assert_eq!(b.guests, 2);
        assert_eq!(b.start_date, NaiveDate::from_ymd_opt(2025, 1, 15).unwrap());
        assert_eq!(b.end_date, NaiveDate::from_ymd_opt(2025, 1, 18).unwrap());
        assert_eq!(b.payment_id, "pay_789");

        let Event::Cancellation(c) = EventKind::Cancellation.decode(CANCELLATION.as_bytes(), 1024).unwrap() else {
            panic!()
        };
        assert_eq!(c.booking_id, "booking_456");
        assert_eq!(c.user_id, "user_123");
        assert_eq!(c.timestamp.as_deref(), Some("2025-01-18T10:30:00Z"));
    }

    #[test]
    fn dates_keep_the_day_as_written() {
        assert_eq!(parse_date("2025-01-15"), NaiveDate::from_ymd_opt(2025, 1, 15));
        assert_eq!(
            parse_date("2025-01-15T23:30:00-05:00"),
            NaiveDate::from_ymd_opt(2025, 1, 15)
        );
        assert_eq!(
            parse_date("2025-01-15T00:30:00+09:00"),
            NaiveDate::from_ymd_opt(2025, 1, 15)
        );
        assert_eq!(
            parse_date("2025-01-15t10:00:00.123z"),
            NaiveDate::from_ymd_opt(2025, 1, 15)
        );
        for bad in [
            "2025-02-30",
            "15/01/2025",
            "2025-01-15T25:00:00Z",
            "",
            "2025-1-5",
            "tomorrow",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        let cases: Vec<(String, Reason)> = vec![
            ("{not json".into(), Reason::MalformedJson),
            ("[1,2]".into(), Reason::MalformedJson),
            ("\"text\"".into(), Reason::MalformedJson),
            ("".into(), Reason::MalformedJson),
            (
                format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
                Reason::MalformedJson,
            ),
            (with("userId", Value::Null), Reason::MissingField),
            (with("bookingId", Value::String("  ".into())), Reason::MissingField),
            (with("roomId", serde_json::json!({"a": 1})), Reason::InvalidField),
            (with("guests", Value::String("2".into())), Reason::InvalidField),
            (with("guests", serde_json::json!(2.5)), Reason::InvalidField),
            (with("guests", serde_json::json!(0)), Reason::InvalidGuests),
            (with("guests", serde_json::json!(-3)), Reason::InvalidGuests),
            (with("guests", serde_json::json!(u64::MAX)), Reason::InvalidGuests),
            (
                with("startDate", Value::String("2025-13-01".into())),
                Reason::InvalidField,
            ),
            (with("startDate", serde_json::json!(20250115)), Reason::InvalidField),
            (
                with("endDate", Value::String("2025-01-10".into())),
                Reason::InvalidDates,
            ),
            (
                with("endDate", Value::String("2025-01-15T20:00:00Z".into())),
                Reason::InvalidDates,
            ),
            (
                with("bookingId", Value::String("x".repeat(MAX_ID_LEN + 1))),
                Reason::InvalidField,
            ),
            (with("paymentId", Value::String("a\u{0}b".into())), Reason::InvalidField),
            (
                with("paymentId", Value::String("p".repeat(MAX_PAYMENT_ID_LEN + 1))),
                Reason::InvalidField,
            ),
        ];
        for (payload, reason) in cases {
            let err = booking(&payload).unwrap_err();
            assert_eq!(err.reason, reason, "{payload:.80}: {}", err.error);
            assert!(!err.error.is_empty());
        }
    }

    #[test]
    fn non_utf8_payload_is_malformed() {
        let err = EventKind::Booking.decode(&[0xff, b'{', b'}'], 1024).unwrap_err();
        assert_eq!(err.reason, Reason::MalformedJson);
    }

    #[test]
    fn oversized_payload_is_refused_before_parsing() {
        let err = EventKind::Booking.decode(&vec![b' '; 2048], 1024).unwrap_err();
        assert_eq!(err.reason, Reason::PayloadTooLarge);
    }

    #[test]
    fn numeric_ids_are_accepted_as_text() {
        let Event::Booking(b) = booking(&with("userId", serde_json::json!(42))).unwrap() else {
            panic!()
        };
        assert_eq!(b.user_id, "42");
    }

    #[test]
    fn sql_metacharacters_are_just_text() {
        let id = "x'); DROP TABLE bookings; --";
        let Event::Booking(b) = booking(&with("bookingId", Value::String(id.into()))).unwrap() else {
            panic!()
        };
        assert_eq!(b.booking_id, id);
    }

    #[test]
    fn cancellation_timestamp_is_optional_but_checked() {
        let ok = EventKind::Cancellation.decode(br#"{"bookingId":"b","userId":"u"}"#, 1024);
        assert!(matches!(
            ok,
            Ok(Event::Cancellation(CancellationEvent { timestamp: None, .. }))
        ));
        let bad = EventKind::Cancellation.decode(br#"{"bookingId":"b","userId":"u","timestamp":"soon"}"#, 1024);
        assert_eq!(bad.unwrap_err().reason, Reason::InvalidField);
        let missing = EventKind::Cancellation.decode(br#"{"userId":"u"}"#, 1024);
        assert_eq!(missing.unwrap_err().reason, Reason::MissingField);
    }

    #[test]
    fn reason_codes_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("nope"), None);
    }
}
