//! The hostile records: a fixed catalogue (SQL metacharacters, wrong types, bad dates, deep
//! nesting, huge payloads, headers that are not UTF-8) and a seeded random flood, each with the
//! way it must end entered in the ledger.

use crate::common::TestDb;
use crate::ledger::Fixtures;
use crate::publisher::PlannedRecord;
use booking_worker::loadgen::{Expected, ExpectedBooking, Topic};
use booking_worker::models::{EventKind, Reason};
use serde_json::{json, Value};
use Topic::{Bookings as B, Cancellations as C};

/// SQL metacharacters, array-literal syntax and non-ASCII text, without NUL or control
/// characters, that must be stored exactly as written.
const META: &str = "q'uo\"te; DROP TABLE bookings;-- \\back\\slash %_ {1,2} NULL $1 ü日本🏨";

/// Start dates the decoder must reject; the flood picks from them too.
const BAD_DATES: [&str; 12] = [
    "2026-02-30",
    "2026-13-01",
    "2026-00-10",
    "15/01/2026",
    "2026-1-5",
    "",
    "tomorrow",
    "2026-01-15T25:00:00Z",
    "2026-01-15T10:00:00",
    "+12345-01-01",
    "2026-01-15T10:00:00+25:00",
    "２０２６-０１-１５",
];

/// Booking ids with start and end dates: backwards ones are dead letters with the reason given,
/// edge cases (`None`) are accepted bookings.
const DATE_PAIRS: [(&str, &str, &str, Option<&str>); 6] = [
    ("backwards_0", "2026-04-03", "2026-04-03", Some("invalid_dates")),
    ("backwards_1", "2026-04-03", "2026-04-01", Some("invalid_dates")),
    ("edge_date_0", "2024-02-29", "2024-03-01", None),
    ("edge_date_1", "0001-01-01", "0001-01-02", None),
    ("edge_date_2", "9999-12-30", "9999-12-31", None),
    (
        "edge_date_3",
        "2026-01-15T23:30:00-05:00",
        "2026-01-16T01:00:00+09:00",
        None,
    ),
];

/// Payloads that are JSON but not an object.
const NOT_OBJECTS: [&str; 7] = ["[1,2]", "\"text\"", "42", "null", "true", "", "\u{feff}{}"];

/// Booking ids that SQL or array syntax would misread, each applied as written.
const ODD_IDS: [&str; 8] = ["NULL", "{a,b}", "\\", "'", "%", "--", "\"", "ü"];

/// How deep the deeply nested payloads go.
const DEEP: usize = 100_000;

/// How a hostile record must end.
enum Outcome {
    /// A booking with its final status.
    Booking {
        id: String,
        user: String,
        room: String,
        status: &'static str,
    },
    /// A dead letter with this reason, found by booking id or record key.
    DeadLetter { id: String, reason: &'static str },
    /// Nothing of its own (a cancellation folded into its booking's status).
    Folded,
}

/// A hostile record and how it must end.
type Case = (PlannedRecord, Outcome);

fn dead(id: &str, reason: &'static str) -> Outcome {
    Outcome::DeadLetter {
        id: id.to_string(),
        reason,
    }
}

fn booking(id: &str, user: &str, room: &str, status: &'static str) -> Outcome {
    Outcome::Booking {
        id: id.to_string(),
        user: user.to_string(),
        room: room.to_string(),
        status,
    }
}

fn booking_payload(id: &str, user: &str, room: &str) -> Value {
    json!({
        "userId": user, "roomId": room, "guests": 2, "startDate": "2026-04-01T15:00:00Z",
        "endDate": "2026-04-03", "bookingId": id, "paymentId": format!("pay_{id}"),
    })
}

/// `v` with `field` set to `value` (removed when `value` is null), as bytes.
fn with_field(mut v: Value, field: &str, value: Value) -> Vec<u8> {
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v.to_string().into_bytes()
}

/// The object `v` with one more member, `"extra"`, whose value is the JSON text `extra`.
fn with_extra(v: Value, extra: &str) -> String {
    let mut text = v.to_string();
    text.pop();
    format!("{text},\"extra\":{extra}}}")
}

fn cancel_payload(id: &str, user: &str) -> Vec<u8> {
    json!({"bookingId": id, "userId": user, "timestamp": "2026-03-01T10:00:00Z"})
        .to_string()
        .into_bytes()
}

/// Random bytes that the decoder must call malformed.
fn random_bytes(rng: &mut fastrand::Rng) -> Vec<u8> {
    loop {
        let len = rng.usize(1..2048);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if rng.bool() {
            // Mostly printable, sometimes JSON-looking.
            const ALPHABET: &[u8] = b" {}[]\":,0123456789abcdefnulltrue\\'";
            for b in bytes.iter_mut() {
                *b = ALPHABET[usize::from(*b) % ALPHABET.len()];
            }
        }
        let rejected = EventKind::Booking.decode(&bytes, 1 << 20).err();
        if rejected.is_some_and(|r| r.reason == Reason::MalformedJson) {
            return bytes;
        }
    }
}

/// The users and rooms the hostile records name.
struct Names {
    /// A user whose username and email are full of SQL metacharacters, with its id.
    meta_user: String,
    meta_email: String,
    meta_user_id: i32,
    /// A room whose internal id is full of SQL metacharacters, with its id.
    meta_room: String,
    meta_room_id: i32,
    /// The user who owns most hostile bookings, another user, and the room they book.
    owner: String,
    other: String,
    room: String,
    /// The user named by its numeric id.
    numeric_user: i64,
}

impl Names {
    /// Creates the user and the room with metacharacters; picks the others from `fixtures`.
    fn create(db: &TestDb, fixtures: &Fixtures) -> Names {
        let meta_user = format!("user {META}");
        let meta_email = format!("o'brien+\"{META}\"@例え.jp");
        let meta_user_id = db.user(&meta_email, &meta_user);
        // booking-management's rooms.internal_id is VARCHAR(50).
        let meta_room: String = format!("room {META}").chars().take(50).collect();
        let meta_room_id = db.room(&meta_room);
        let users = fixtures.users();
        let numeric_user: i64 = fixtures
            .user_ids
            .keys()
            .find_map(|k| k.parse().ok())
            .expect("one user is named by its id");
        Names {
            meta_user,
            meta_email,
            meta_user_id,
            meta_room,
            meta_room_id,
            owner: users[0].clone(),
            other: users[1].clone(),
            room: fixtures.rooms()[0].clone(),
            numeric_user,
        }
    }

    /// Lets the ledger resolve the user and the room with metacharacters too.
    fn register(self, fixtures: &mut Fixtures) {
        fixtures.user_ids.insert(self.meta_user, self.meta_user_id);
        fixtures.user_ids.insert(self.meta_email, self.meta_user_id);
        fixtures.room_ids.insert(self.meta_room, self.meta_room_id);
    }

    /// A valid booking event of the owner's.
    fn base(&self, id: &str) -> Value {
        booking_payload(id, &self.owner, &self.room)
    }

    /// The owner's booking `id`, accepted.
    fn accepted(&self, id: &str) -> Outcome {
        booking(id, &self.owner, &self.room, "Accepted")
    }

    /// A dead letter of `id` with `reason`, or (`None`) the owner's booking `id`, accepted.
    fn outcome(&self, id: &str, reason: Option<&'static str>) -> Outcome {
        match reason {
            Some(reason) => dead(id, reason),
            None => self.accepted(id),
        }
    }

    /// A record keyed `id` that ends as [`Names::outcome`] says.
    fn case(&self, topic: Topic, id: &str, payload: Vec<u8>, reason: Option<&'static str>) -> Case {
        (PlannedRecord::new(topic, id, payload), self.outcome(id, reason))
    }
}

/// The sections of the fixed catalogue, in the order they are sent.
const CATALOGUE: [fn(&Names) -> Vec<Case>; 9] = [
    metacharacters_applied,
    metacharacters_rejected,
    wrong_types,
    ids_of_other_types,
    not_objects,
    dates,
    nesting,
    sizes,
    headers,
];

/// The hostile records (the fixed catalogue and `flood` random ones), with the ledger extended by
/// how each must end. Creates the user and the room whose names are full of SQL metacharacters.
pub fn hostile_records(
    db: &TestDb,
    fixtures: &mut Fixtures,
    expected: &mut Expected,
    flood: usize,
    rng: &mut fastrand::Rng,
) -> Vec<PlannedRecord> {
    let names = Names::create(db, fixtures);
    let mut cases: Vec<Case> = CATALOGUE.iter().flat_map(|section| section(&names)).collect();
    cases.extend((0..flood).map(|n| flood_case(n, &names, rng)));
    let records = enter_in_ledger(expected, cases);
    names.register(fixtures);
    records
}

/// The records of `cases`, each case's outcome entered in `expected`.
fn enter_in_ledger(expected: &mut Expected, cases: Vec<Case>) -> Vec<PlannedRecord> {
    let mut records = Vec::with_capacity(cases.len());
    for (record, outcome) in cases {
        match outcome {
            Outcome::Booking { id, user, room, status } => {
                assert!(
                    expected
                        .bookings
                        .insert(id.clone(), ExpectedBooking { user, room, status })
                        .is_none(),
                    "hostile booking id {id:?} is used twice"
                );
            }
            Outcome::DeadLetter { id, reason } => {
                *expected.dead_letters.entry(reason).or_default() += 1;
                expected.dead_letter_ids.push((id, reason));
            }
            Outcome::Folded => {}
        }
        records.push(record);
    }
    records
}

/// `hostile` records at random places among `planned`, each kept in its own order.
pub fn scatter(
    planned: Vec<PlannedRecord>,
    hostile: Vec<PlannedRecord>,
    rng: &mut fastrand::Rng,
) -> Vec<PlannedRecord> {
    let mut places: Vec<usize> = (0..hostile.len()).map(|_| rng.usize(..=planned.len())).collect();
    places.sort_unstable();
    let mut merged = Vec::with_capacity(planned.len() + hostile.len());
    let mut hostile = hostile.into_iter().peekable();
    let mut places = places.into_iter().peekable();
    for (i, r) in planned.into_iter().enumerate() {
        while places.peek() == Some(&i) {
            places.next();
            merged.push(hostile.next().expect("one record per place"));
        }
        merged.push(r);
    }
    merged.extend(hostile);
    merged
}

/// SQL metacharacters in every field of valid events, applied exactly as written; a parked
/// cancellation with a NUL in its baggage; an unauthorized cancellation; odd booking ids.
fn metacharacters_applied(names: &Names) -> Vec<Case> {
    let m1 = format!("bk1 {META}");
    let m1_payload = json!({
        "userId": names.meta_user, "roomId": names.meta_room, "guests": 3, "startDate": "2026-05-01",
        "endDate": "2026-05-04", "bookingId": m1, "paymentId": format!("pay {META}"),
    });
    let m2 = format!("bk2 {META}");
    let m2_payload = booking_payload(&m2, &names.meta_user, &names.meta_room);
    let mut cases = vec![
        (
            PlannedRecord::new(B, &m1, m1_payload.to_string()).header("Baggage", format!("k={META}").as_bytes()),
            booking(&m1, &names.meta_user, &names.meta_room, "Accepted"),
        ),
        // Its cancellation first (parked, with a NUL in its baggage), by the owner named by email.
        (
            PlannedRecord::new(C, &m2, cancel_payload(&m2, &names.meta_email)).header("baggage", b"t=nul\0inside"),
            Outcome::Folded,
        ),
        (
            PlannedRecord::new(B, &m2, m2_payload.to_string()),
            booking(&m2, &names.meta_user, &names.meta_room, "Cancelled"),
        ),
        (
            PlannedRecord::new(C, &m1, cancel_payload(&m1, &names.other)),
            dead(&m1, "unauthorized"),
        ),
    ];
    for id in ODD_IDS {
        cases.push(names.case(B, id, names.base(id).to_string().into_bytes(), None));
    }
    cases
}

/// SQL metacharacters where they make an event invalid: each a dead letter.
fn metacharacters_rejected(names: &Names) -> Vec<Case> {
    let id = |n: u8| format!("bk{n} {META}");
    let (m3, m4, m5, m6, m7) = (id(3), id(4), id(5), id(6), id(7));
    let bad_user = format!("x'); DROP TABLE users; -- {META}");
    let bad_room = format!("'; TRUNCATE rooms; -- {META}");
    let all_meta = json!({"userId": META, "roomId": META, "guests": META, "startDate": META,
                          "endDate": META, "bookingId": m5, "paymentId": META});
    let bad_start = json!("2026-01-01'; DROP TABLE bookings; --");
    let bad_timestamp = json!({"bookingId": m7, "userId": names.owner, "timestamp": META});
    let cases: Vec<(Topic, &str, Vec<u8>, &'static str)> = vec![
        (
            B,
            &m3,
            booking_payload(&m3, &bad_user, &names.room).to_string().into_bytes(),
            "unknown_user",
        ),
        (
            B,
            &m4,
            booking_payload(&m4, &names.owner, &bad_room).to_string().into_bytes(),
            "unknown_room",
        ),
        (B, &m5, all_meta.to_string().into_bytes(), "invalid_field"),
        (
            B,
            &m6,
            with_field(names.base(&m6), "startDate", bad_start),
            "invalid_field",
        ),
        (C, &m7, bad_timestamp.to_string().into_bytes(), "invalid_field"),
    ];
    cases
        .into_iter()
        .map(|(topic, id, payload, reason)| names.case(topic, id, payload, Some(reason)))
        .collect()
}

/// Fields of the wrong type or out of range, each a dead letter keyed `wrong_{n}_{field}`.
fn wrong_types(names: &Names) -> Vec<Case> {
    let table: Vec<(&str, Value, &'static str)> = vec![
        ("guests", json!("2"), "invalid_field"),
        ("guests", json!(2.5), "invalid_field"),
        ("guests", json!(true), "invalid_field"),
        ("guests", json!([2]), "invalid_field"),
        ("guests", json!({"n": 2}), "invalid_field"),
        ("guests", json!(1e300), "invalid_field"),
        ("guests", json!(0), "invalid_guests"),
        ("guests", json!(-5), "invalid_guests"),
        ("guests", json!(2_147_483_648u64), "invalid_guests"),
        ("guests", json!(u64::MAX), "invalid_guests"),
        ("userId", json!(null), "missing_field"),
        ("userId", json!(""), "missing_field"),
        ("userId", json!("   "), "missing_field"),
        ("userId", json!(["a"]), "invalid_field"),
        ("userId", json!(-1), "invalid_field"),
        ("userId", json!(1.5), "invalid_field"),
        ("userId", json!("bell\u{7}"), "invalid_field"),
        ("userId", json!("x".repeat(256)), "invalid_field"),
        ("roomId", json!({"internal": names.room}), "invalid_field"),
        ("paymentId", json!(false), "invalid_field"),
        ("paymentId", json!("tab\there"), "invalid_field"),
        ("startDate", json!(20_260_401), "invalid_field"),
        ("endDate", json!(null), "missing_field"),
    ];
    let case = |(n, (field, value, reason)): (usize, (&str, Value, &'static str))| {
        let id = format!("wrong_{n}_{field}");
        names.case(B, &id, with_field(names.base(&id), field, value), Some(reason))
    };
    table.into_iter().enumerate().map(case).collect()
}

/// Booking ids that are not strings (dead letters, found by record key), and the numeric booking
/// id and numeric user id that are fine.
fn ids_of_other_types(names: &Names) -> Vec<Case> {
    let wrong_ids = [json!({"id": 1}), json!([1]), json!(true), json!(-7), json!(0.5)];
    let mut cases: Vec<Case> = wrong_ids
        .into_iter()
        .enumerate()
        .map(|(n, value)| {
            let key = format!("wrong_booking_id_{n}");
            names.case(
                B,
                &key,
                with_field(names.base("x"), "bookingId", value),
                Some("invalid_field"),
            )
        })
        .collect();
    let number = "9876543210123";
    let number_payload = with_field(names.base("x"), "bookingId", json!(9_876_543_210_123u64));
    cases.push(names.case(B, number, number_payload, None));
    let by_number = "numeric_user_booking";
    let by_number_payload = with_field(names.base(by_number), "userId", json!(names.numeric_user));
    cases.push((
        PlannedRecord::new(B, by_number, by_number_payload),
        booking(by_number, &names.numeric_user.to_string(), &names.room, "Accepted"),
    ));
    cases
}

/// JSON that is not an object, each a dead letter keyed `not_object_{n}`.
fn not_objects(names: &Names) -> Vec<Case> {
    NOT_OBJECTS
        .iter()
        .enumerate()
        .map(|(n, payload)| {
            let key = format!("not_object_{n}");
            names.case(B, &key, payload.as_bytes().to_vec(), Some("malformed_json"))
        })
        .collect()
}

/// Invalid start dates, backwards stays, and edge-case dates that are fine.
fn dates(names: &Names) -> Vec<Case> {
    let mut cases: Vec<Case> = BAD_DATES
        .iter()
        .enumerate()
        .map(|(n, date)| {
            let id = format!("bad_date_{n}");
            names.case(
                B,
                &id,
                with_field(names.base(&id), "startDate", json!(date)),
                Some("invalid_field"),
            )
        })
        .collect();
    for (id, start, end, reason) in DATE_PAIRS {
        let mut v = names.base(id);
        v["startDate"] = json!(start);
        v["endDate"] = json!(end);
        cases.push(names.case(B, id, v.to_string().into_bytes(), reason));
    }
    cases
}

/// Nesting deeper than the decoder follows (dead letters), and shallow nesting that is fine.
fn nesting(names: &Names) -> Vec<Case> {
    let deep_arrays = format!("{}{}", "[".repeat(DEEP), "]".repeat(DEEP));
    let cases: Vec<(&str, String, Option<&'static str>)> = vec![
        ("deep_arrays", deep_arrays.clone(), Some("malformed_json")),
        (
            "deep_objects",
            format!("{}1{}", "{\"a\":".repeat(DEEP), "}".repeat(DEEP)),
            Some("malformed_json"),
        ),
        ("deep_unclosed", "[".repeat(DEEP), Some("malformed_json")),
        (
            "deep_in_event",
            with_extra(names.base("deep_in_event"), &deep_arrays),
            Some("malformed_json"),
        ),
        (
            "shallow_nesting",
            with_extra(
                names.base("shallow_nesting"),
                &format!("{}{}", "[".repeat(100), "]".repeat(100)),
            ),
            None,
        ),
    ];
    cases
        .into_iter()
        .map(|(key, payload, reason)| names.case(B, key, payload.into_bytes(), reason))
        .collect()
}

/// Payloads beyond the worker's MAX_PAYLOAD_BYTES of 1 MiB, and long fields within and beyond
/// their limits.
fn sizes(names: &Names) -> Vec<Case> {
    let big = 3 << 20;
    let longest = "é".repeat(255);
    let too_long = "é".repeat(256);
    let cases: Vec<(Topic, &str, Vec<u8>, Option<&'static str>)> = vec![
        (
            B,
            "huge_payment",
            with_field(names.base("huge_payment"), "paymentId", json!("x".repeat(big))),
            Some("payload_too_large"),
        ),
        (
            C,
            "huge_cancel",
            format!("\"{}\"", "y".repeat(big)).into_bytes(),
            Some("payload_too_large"),
        ),
        (
            B,
            "notes_60k",
            with_field(names.base("notes_60k"), "notes", json!("n'; --".repeat(10_240))),
            None,
        ),
        (
            B,
            "user_60k",
            with_field(names.base("user_60k"), "userId", json!("u".repeat(60 * 1024))),
            Some("invalid_field"),
        ),
        (
            B,
            &longest,
            with_field(names.base(&longest), "paymentId", json!("🏨".repeat(255))),
            None,
        ),
        (
            B,
            &too_long,
            names.base(&too_long).to_string().into_bytes(),
            Some("invalid_field"),
        ),
    ];
    cases
        .into_iter()
        .map(|(topic, id, payload, reason)| names.case(topic, id, payload, reason))
        .collect()
}

/// Headers whose names or values are not UTF-8, huge, empty or repeated; each record is keyed by
/// its booking id.
fn headers(names: &Names) -> Vec<Case> {
    let record = |id: &str| PlannedRecord::new(B, id, names.base(id).to_string());
    let nobody = "header_nul_baggage_dead";
    let nobody_payload = booking_payload(nobody, "nobody_here", &names.room).to_string();
    let cancel = "header_cancel_not_utf8";
    let records: Vec<(PlannedRecord, Option<&'static str>)> = vec![
        (
            record("header_raw_name").raw_header(vec![0xff, 0xfe, b'k'], b"v".to_vec()),
            None,
        ),
        (
            record("header_raw_name_and_value").raw_header(vec![0xc3, 0x28, b'B'], vec![0xff, 0x00, 0xfe]),
            None,
        ),
        (
            record("header_baggage_not_utf8").header("Baggage", &[b't', b'=', 0xff, 0xfe]),
            None,
        ),
        (
            record("header_baggage_upper").header("BAGGAGE", format!("k={META}").as_bytes()),
            None,
        ),
        (
            record("header_baggage_first_wins")
                .header("baggage", b"first=1")
                .header("Baggage", &[0xff]),
            None,
        ),
        (
            record("header_baggage_huge").header("Baggage", "k=v,".repeat(25_000).as_bytes()),
            None,
        ),
        (
            record("header_empty_name").header("", b"").header("x", &[0xff; 64]),
            None,
        ),
        (
            PlannedRecord::new(B, nobody, nobody_payload).header("Baggage", b"a=\0\0b"),
            Some("unknown_user"),
        ),
    ];
    let case = |(record, reason): (PlannedRecord, Option<&'static str>)| {
        let outcome = names.outcome(&record.key, reason);
        (record, outcome)
    };
    let mut cases: Vec<Case> = records.into_iter().map(case).collect();
    // A cancellation whose Baggage value is not UTF-8 cancels its booking all the same.
    cases.push((
        PlannedRecord::new(C, cancel, cancel_payload(cancel, &names.owner)).header("Baggage", &[0xc0, 0x80]),
        Outcome::Folded,
    ));
    cases.push((record(cancel), booking(cancel, &names.owner, &names.room, "Cancelled")));
    cases
}

/// The flood's record `n`: a random one of the catalogue's kinds, drawn from `rng`.
fn flood_case(n: usize, names: &Names, rng: &mut fastrand::Rng) -> Case {
    let id = format!("flood_{n}");
    match rng.u8(..6) {
        0 | 1 => {
            let topic = if rng.bool() { B } else { C };
            names.case(topic, &id, random_bytes(rng), Some("malformed_json"))
        }
        2 => {
            let (field, value) = match rng.u8(..4) {
                0 => ("guests", json!(format!("{}", rng.u8(..)))),
                1 => ("startDate", json!(BAD_DATES[rng.usize(..BAD_DATES.len())])),
                2 => ("userId", json!(rng.f64() * 1e9)),
                _ => ("roomId", json!([META])),
            };
            names.case(B, &id, with_field(names.base(&id), field, value), Some("invalid_field"))
        }
        3 => {
            let payload = booking_payload(&id, &format!("{META} {n}"), &names.room);
            names.case(B, &id, payload.to_string().into_bytes(), Some("unknown_user"))
        }
        4 => {
            let mut value: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
            value.push(0xff);
            let record = PlannedRecord::new(B, &id, names.base(&id).to_string()).header("Baggage", &value);
            (record, names.accepted(&id))
        }
        _ => {
            let mut name: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(1..)).collect();
            name.push(0xfe);
            let value: Vec<u8> = (0..rng.usize(..32)).map(|_| rng.u8(..)).collect();
            let record = PlannedRecord::new(B, &id, names.base(&id).to_string()).raw_header(name, value);
            (record, names.accepted(&id))
        }
    }
}
