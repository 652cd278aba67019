//! The load generator's plan: a reproducible stream of booking and cancellation records (some
//! duplicated, some cancellations early or unauthorized, some bad) and the exact end state the
//! worker must reach from it. Pure: producing the records is the binary's job.

use serde::Serialize;
use std::collections::BTreeMap;

/// What to generate.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Booking events (distinct booking ids).
    pub bookings: usize,
    /// Share of bookings that get a cancellation.
    pub cancel_ratio: f64,
    /// Share of those cancellations sent before their booking.
    pub early_cancel_ratio: f64,
    /// Share of those cancellations sent by someone other than the owner.
    pub unauthorized_ratio: f64,
    /// Share of booking events sent twice.
    pub duplicate_ratio: f64,
    /// Bad records added, as a share of booking events.
    pub bad_ratio: f64,
    /// Share of records that carry a `Baggage` header.
    pub baggage_ratio: f64,
    /// Identifiers of existing users (id, email or username).
    pub users: Vec<String>,
    /// Internal ids of existing rooms.
    pub rooms: Vec<String>,
    /// Prefix of every generated booking id, so runs do not collide.
    pub id_prefix: String,
    pub seed: u64,
}

/// Which topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    Bookings,
    Cancellations,
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Topic,
    pub key: String,
    pub payload: Vec<u8>,
    /// The raw `Baggage` header value, if any (bytes: some are deliberately not UTF-8).
    pub baggage: Option<Vec<u8>>,
}

/// A booking's expected final row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpectedBooking {
    pub user: String,
    pub room: String,
    pub status: &'static str,
}

/// The end state the worker must reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Expected {
    pub records: usize,
    pub bookings: BTreeMap<String, ExpectedBooking>,
    pub dead_letters: BTreeMap<&'static str, usize>,
    /// Dead letters whose booking id is known, by booking id and reason.
    pub dead_letter_ids: Vec<(String, &'static str)>,
}

/// The kinds of bad record, each with the dead-letter reason it must get.
const BAD_KINDS: [&str; 6] = [
    "malformed_json",
    "missing_field",
    "invalid_guests",
    "invalid_dates",
    "unknown_user",
    "unknown_room",
];

/// Builds the records in sending order and the expected end state.
pub fn plan(cfg: &PlanConfig) -> (Vec<Record>, Expected) {
    assert!(
        !cfg.users.is_empty() && !cfg.rooms.is_empty(),
        "users and rooms are needed"
    );
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let mut records = Vec::new();
    let mut late_cancels: Vec<(usize, Record)> = Vec::new();
    let mut expected = Expected::default();
    let mut bad_budget = 0.0;

    for n in 0..cfg.bookings {
        let id = format!("{}_{n}", cfg.id_prefix);
        let (booking, owner, room) = booking_record(cfg, &mut rng, &id);
        let (cancel, status) = cancellation(cfg, &mut rng, &id, &owner, &mut expected);
        expected.bookings.insert(
            id.clone(),
            ExpectedBooking {
                user: owner,
                room,
                status,
            },
        );
        match cancel {
            Some(c) if rng.f64() < cfg.early_cancel_ratio => {
                records.push(c);
                records.push(booking.clone());
            }
            Some(c) => {
                records.push(booking.clone());
                late_cancels.push((records.len() + rng.usize(1..=50), c));
            }
            None => records.push(booking.clone()),
        }
        if rng.f64() < cfg.duplicate_ratio {
            records.push(booking);
        }
        while let Some(pos) = late_cancels.iter().position(|(at, _)| *at <= records.len()) {
            records.push(late_cancels.swap_remove(pos).1);
        }
        bad_budget += cfg.bad_ratio;
        while bad_budget >= 1.0 {
            bad_budget -= 1.0;
            add_bad_record(cfg, &mut rng, &mut records, &mut expected);
        }
    }
    records.extend(late_cancels.into_iter().map(|(_, c)| c));
    expected.records = records.len();
    expected.dead_letter_ids.sort();
    (records, expected)
}

/// A booking of a random user and room, with its user and room.
fn booking_record(cfg: &PlanConfig, rng: &mut fastrand::Rng, id: &str) -> (Record, String, String) {
    let owner = cfg.users[rng.usize(..cfg.users.len())].clone();
    let room = cfg.rooms[rng.usize(..cfg.rooms.len())].clone();
    let start_day = rng.u32(1..=20);
    let nights = rng.u32(1..=7);
    let payload = serde_json::json!({
        "userId": owner, "roomId": room, "guests": rng.u32(1..=4),
        "startDate": format!("2026-03-{start_day:02}T15:00:00Z"),
        "endDate": format!("2026-03-{:02}", start_day + nights),
        "bookingId": id, "paymentId": format!("pay_{id}"),
    });
    let booking = Record {
        topic: Topic::Bookings,
        key: id.to_string(),
        payload: payload.to_string().into_bytes(),
        baggage: baggage(rng, cfg.baggage_ratio, id),
    };
    (booking, owner, room)
}

/// Perhaps a cancellation of the booking, by its owner or (refused) by another user, and the
/// status the booking ends with.
fn cancellation(
    cfg: &PlanConfig,
    rng: &mut fastrand::Rng,
    id: &str,
    owner: &str,
    expected: &mut Expected,
) -> (Option<Record>, &'static str) {
    if rng.f64() >= cfg.cancel_ratio {
        return (None, "Accepted");
    }
    let unauthorized = cfg.users.len() > 1 && rng.f64() < cfg.unauthorized_ratio;
    let (user, status) = if unauthorized {
        let others: Vec<&String> = cfg.users.iter().filter(|u| *u != owner).collect();
        *expected.dead_letters.entry("unauthorized").or_default() += 1;
        expected.dead_letter_ids.push((id.to_string(), "unauthorized"));
        (others[rng.usize(..others.len())].clone(), "Accepted")
    } else {
        (owner.to_string(), "Cancelled")
    };
    let payload = serde_json::json!({"bookingId": id, "userId": user, "timestamp": "2026-03-01T10:00:00Z"});
    let cancel = Record {
        topic: Topic::Cancellations,
        key: id.to_string(),
        payload: payload.to_string().into_bytes(),
        baggage: baggage(rng, cfg.baggage_ratio, id),
    };
    (Some(cancel), status)
}

/// Adds one bad record of a random kind, and the dead letter it becomes.
fn add_bad_record(cfg: &PlanConfig, rng: &mut fastrand::Rng, records: &mut Vec<Record>, expected: &mut Expected) {
    let kind = BAD_KINDS[rng.usize(..BAD_KINDS.len())];
    let bad_id = format!("{}_bad_{}", cfg.id_prefix, records.len());
    records.push(bad_record(kind, &bad_id, &cfg.users[0], &cfg.rooms[0]));
    *expected.dead_letters.entry(kind).or_default() += 1;
    if !matches!(kind, "malformed_json" | "missing_field") {
        expected.dead_letter_ids.push((bad_id, kind));
    }
}

fn baggage(rng: &mut fastrand::Rng, ratio: f64, id: &str) -> Option<Vec<u8>> {
    (rng.f64() < ratio).then(|| format!("trace-id={id},span-id={:016x}", rng.u64(..)).into_bytes())
}

fn bad_record(kind: &str, id: &str, user: &str, room: &str) -> Record {
    let valid = |guests: i64, start: &str, end: &str, user: &str, room: &str| {
        serde_json::json!({
            "userId": user, "roomId": room, "guests": guests, "startDate": start, "endDate": end,
            "bookingId": id, "paymentId": "pay_bad",
        })
        .to_string()
        .into_bytes()
    };
    let (payload, baggage) = match kind {
        "malformed_json" => (format!("{{\"bookingId\":\"{id}\",").into_bytes(), None),
        "missing_field" => (
            serde_json::json!({"bookingId": id, "userId": user})
                .to_string()
                .into_bytes(),
            None,
        ),
        "invalid_guests" => (valid(0, "2026-03-01", "2026-03-02", user, room), None),
        "invalid_dates" => (valid(1, "2026-03-05", "2026-03-02", user, room), None),
        // Its Baggage value is not UTF-8 too: kept lossily, it does not change the end.
        "unknown_user" => (
            valid(1, "2026-03-01", "2026-03-02", "nobody_at_all", room),
            Some(vec![b't', b'=', 0xff, 0xfe]),
        ),
        _ => (valid(1, "2026-03-01", "2026-03-02", user, "no_such_room"), None),
    };
    Record {
        topic: Topic::Bookings,
        key: id.to_string(),
        payload,
        baggage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Event, EventKind};

    fn config() -> PlanConfig {
        PlanConfig {
            bookings: 2000,
            cancel_ratio: 0.3,
            early_cancel_ratio: 0.2,
            unauthorized_ratio: 0.1,
            duplicate_ratio: 0.05,
            bad_ratio: 0.02,
            baggage_ratio: 0.5,
            users: vec!["u1".into(), "u2".into(), "u3".into()],
            rooms: vec!["r1".into(), "r2".into()],
            id_prefix: "t".into(),
            seed: 7,
        }
    }

    #[test]
    fn the_plan_is_reproducible_and_its_ledger_adds_up() {
        let (records, expected) = plan(&config());
        assert_eq!(plan(&config()).0, records, "same seed, same stream");
        assert_eq!(expected.records, records.len());
        assert_eq!(expected.bookings.len(), 2000);
        let cancels = records.iter().filter(|r| r.topic == Topic::Cancellations).count();
        let cancelled = expected.bookings.values().filter(|b| b.status == "Cancelled").count();
        let unauthorized = expected.dead_letters.get("unauthorized").copied().unwrap_or(0);
        assert_eq!(cancels, cancelled + unauthorized);
        assert!(unauthorized > 0 && cancelled > 0);
        let bad: usize = expected
            .dead_letters
            .iter()
            .filter(|(k, _)| **k != "unauthorized")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(bad, 40);
        let bookings = records.iter().filter(|r| r.topic == Topic::Bookings).count();
        assert!(bookings > 2000 + 40, "duplicates were added");
    }

    #[test]
    fn every_good_record_decodes_and_every_bad_one_is_rejected_as_planned() {
        let (records, expected) = plan(&config());
        let mut rejected: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &records {
            let kind = match r.topic {
                Topic::Bookings => EventKind::Booking,
                Topic::Cancellations => EventKind::Cancellation,
            };
            match kind.decode(&r.payload, 65_536) {
                Ok(Event::Booking(b)) if b.user_id == "nobody_at_all" => {
                    *rejected.entry("unknown_user").or_default() += 1
                }
                Ok(Event::Booking(b)) if b.room_id == "no_such_room" => {
                    *rejected.entry("unknown_room").or_default() += 1
                }
                Ok(_) => {}
                Err(e) => *rejected.entry(e.reason.as_str()).or_default() += 1,
            }
        }
        let mut planned = expected.dead_letters.clone();
        planned.remove("unauthorized");
        assert_eq!(rejected, planned);
    }

    #[test]
    fn early_cancellations_come_before_their_booking() {
        let mut cfg = config();
        cfg.early_cancel_ratio = 1.0;
        cfg.duplicate_ratio = 0.0;
        let (records, _) = plan(&cfg);
        let first_cancel = records.iter().position(|r| r.topic == Topic::Cancellations).unwrap();
        let key = &records[first_cancel].key;
        let booking = records
            .iter()
            .position(|r| r.topic == Topic::Bookings && &r.key == key)
            .unwrap();
        assert!(first_cancel < booking);
    }
}
