//! What a scenario expects: the users and rooms it sets up, its planned stream with the ledger of
//! how every record must end, and the row-by-row comparison of the final database with that ledger.

use crate::common::TestDb;
use crate::publisher::PlannedRecord;
use booking_worker::loadgen::{plan, Expected, ExpectedBooking, PlanConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The users and rooms a scenario sets up, by the identifier the stream uses for them (a user by
/// id, email or username; a room by its internal id), with their database ids.
pub struct Fixtures {
    pub user_ids: HashMap<String, i32>,
    pub room_ids: HashMap<String, i32>,
}

impl Fixtures {
    /// Four users named in each of the three ways, and three rooms.
    pub fn create(db: &TestDb) -> Fixtures {
        let mut user_ids = HashMap::new();
        let alice = db.user("alice@reliability.example", "rel_alice");
        user_ids.insert("rel_alice".to_string(), alice);
        let bob = db.user("bob@reliability.example", "rel_bob");
        user_ids.insert("bob@reliability.example".to_string(), bob);
        let carol = db.user("carol@reliability.example", "rel_carol");
        user_ids.insert(carol.to_string(), carol);
        let dave = db.user("dave@reliability.example", "rel_dave");
        user_ids.insert("rel_dave".to_string(), dave);
        let mut room_ids = HashMap::new();
        for room in ["room_ocean_001", "room_garden_101", "room_city_201"] {
            room_ids.insert(room.to_string(), db.room(room));
        }
        Fixtures { user_ids, room_ids }
    }

    /// The users' identifiers, sorted.
    pub fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.user_ids.keys().cloned().collect();
        users.sort();
        users
    }

    /// The rooms' identifiers, sorted.
    pub fn rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self.room_ids.keys().cloned().collect();
        rooms.sort();
        rooms
    }
}

/// The planned stream for `bookings` bookings: 20% get a cancellation (10% of those before their
/// booking, 5% by someone else), 2% are sent twice, 1% bad records, 30% carry baggage.
pub fn planned(fixtures: &Fixtures, bookings: usize, prefix: &str, seed: u64) -> (Vec<PlannedRecord>, Expected) {
    let (records, expected) = plan(&PlanConfig {
        bookings,
        cancel_ratio: 0.2,
        early_cancel_ratio: 0.1,
        unauthorized_ratio: 0.05,
        duplicate_ratio: 0.02,
        bad_ratio: 0.01,
        baggage_ratio: 0.3,
        users: fixtures.users(),
        rooms: fixtures.rooms(),
        id_prefix: prefix.to_string(),
        seed,
    });
    let records = records
        .into_iter()
        .map(|r| PlannedRecord {
            topic: r.topic,
            key: r.key,
            payload: r.payload,
            headers: r.baggage.map(|b| vec![("Baggage".to_string(), b)]).unwrap_or_default(),
            raw_header: None,
        })
        .collect();
    (records, expected)
}

/// What the comparison of the database with the ledger found.
#[derive(Debug, Default)]
pub struct Tally {
    /// Records in the stream.
    pub events: usize,
    /// Booking events and cancellations applied as the ledger expects.
    pub applied: usize,
    /// Dead letters in the database.
    pub dead_lettered: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub mismatched: usize,
    /// Cancellations still parked at the end.
    pub parked_left: usize,
    /// What was lost, doubled or mismatched, one line each (the first 40).
    pub problems: Vec<String>,
}

impl Tally {
    fn lose(&mut self, n: usize, problem: String) {
        self.lost += n;
        self.problems.push(problem);
    }

    fn double(&mut self, n: usize, problem: String) {
        self.duplicated += n;
        self.problems.push(problem);
    }

    fn mismatch(&mut self, problem: String) {
        self.mismatched += 1;
        self.problems.push(problem);
    }
}

/// A row of `bookings`, the columns the ledger speaks of.
struct StoredBooking {
    id: i32,
    external_id: Option<String>,
    user_id: i32,
    room_id: i32,
    status: String,
}

/// A row of `booking_worker.dead_letters`, the columns the ledger speaks of and where it came from.
struct StoredLetter {
    id: i64,
    booking_id: Option<String>,
    record_key: Option<Vec<u8>>,
    reason: String,
    topic: String,
    kafka_offset: i64,
}

/// Compares the bookings, dead letters and parked cancellations with the ledger, row by row.
///
/// - every expected booking exists once, with its user (the identifier resolved to `users.id`),
///   room and status; a missing one is lost, a wrong one mismatched, one not in the ledger doubled;
/// - every dead letter the ledger names by booking id (or record key) exists once with its reason;
///   the others are counted by reason; a shortfall is lost, an excess doubled;
/// - no cancellation is left parked (each was released by its booking): one left is lost.
pub fn compare(db: &TestDb, fixtures: &Fixtures, expected: &Expected, events: usize) -> Tally {
    let mut tally = Tally {
        events,
        ..Tally::default()
    };
    let mut conn = db.conn();
    compare_bookings(&mut tally, &read_bookings(&mut conn), fixtures, expected);
    compare_dead_letters(&mut tally, &read_dead_letters(&mut conn), expected);
    compare_parked(&mut tally, &db.parked());
    tally.problems.truncate(40);
    tally
}

fn read_bookings(conn: &mut postgres::Client) -> Vec<StoredBooking> {
    conn.query(
        "SELECT id, external_id::text, user_id, room_id, status::text FROM bookings ORDER BY id",
        &[],
    )
    .expect("read bookings")
    .iter()
    .map(|r| StoredBooking {
        id: r.get(0),
        external_id: r.get(1),
        user_id: r.get(2),
        room_id: r.get(3),
        status: r.get(4),
    })
    .collect()
}

fn read_dead_letters(conn: &mut postgres::Client) -> Vec<StoredLetter> {
    conn.query(
        "SELECT id, booking_id, record_key, reason, topic, kafka_offset
           FROM booking_worker.dead_letters ORDER BY id",
        &[],
    )
    .expect("read dead letters")
    .iter()
    .map(|r| StoredLetter {
        id: r.get(0),
        booking_id: r.get(1),
        record_key: r.get(2),
        reason: r.get(3),
        topic: r.get(4),
        kafka_offset: r.get(5),
    })
    .collect()
}

/// Every expected booking once and as expected; no booking the ledger does not know.
fn compare_bookings(tally: &mut Tally, rows: &[StoredBooking], fixtures: &Fixtures, expected: &Expected) {
    let mut by_external: HashMap<&str, Vec<&StoredBooking>> = HashMap::new();
    for row in rows {
        match &row.external_id {
            Some(x) => by_external.entry(x.as_str()).or_default().push(row),
            None => tally.double(1, format!("booking row {} has no external id", row.id)),
        }
    }
    for (id, want) in &expected.bookings {
        match by_external.get(id.as_str()) {
            Some(found) => compare_booking(tally, id, want, found, fixtures),
            None => tally.lose(1, format!("missing booking {id:?}")),
        }
    }
    for (id, found) in &by_external {
        if !expected.bookings.contains_key(*id) {
            tally.double(found.len(), format!("booking {id:?} is not in the ledger"));
        }
    }
}

/// The rows `found` of the expected booking `id`: one, with the expected user, room and status.
/// A cancelled booking counts as two applied events (its booking and its cancellation).
fn compare_booking(tally: &mut Tally, id: &str, want: &ExpectedBooking, found: &[&StoredBooking], fixtures: &Fixtures) {
    if found.len() > 1 {
        tally.double(found.len() - 1, format!("booking {id:?} has {} rows", found.len()));
    }
    let row = found[0];
    let user = fixtures.user_ids.get(&want.user).copied();
    let room = fixtures.room_ids.get(&want.room).copied();
    if Some(row.user_id) != user || Some(row.room_id) != room || row.status != want.status {
        tally.mismatch(format!(
            "booking {id:?}: user {} room {} status {}, expected user {user:?} room {room:?} status {}",
            row.user_id, row.room_id, row.status, want.status
        ));
    } else {
        tally.applied += 1;
        if row.status == "Cancelled" {
            tally.applied += 1;
        }
    }
}

/// The dead letters the ledger expects: those it names by (booking id or record key, reason),
/// and how many more of each reason.
struct ExpectedLetters<'a> {
    named: BTreeMap<(String, &'a str), usize>,
    by_reason: BTreeMap<&'a str, usize>,
}

impl ExpectedLetters<'static> {
    fn from_ledger(expected: &Expected) -> ExpectedLetters<'static> {
        let mut named: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        for (id, reason) in &expected.dead_letter_ids {
            *named.entry((id.clone(), reason)).or_default() += 1;
        }
        let mut by_reason: BTreeMap<&'static str, usize> = expected.dead_letters.clone();
        for ((_, reason), n) in &named {
            let left = by_reason.entry(*reason).or_default();
            *left = left
                .checked_sub(*n)
                .expect("the ledger's keyed dead letters fit its counts");
        }
        ExpectedLetters { named, by_reason }
    }
}

/// The dead letters found: how many match each named one the ledger expects, and the others by
/// reason.
struct FoundLetters<'a> {
    named: BTreeMap<(String, &'a str), usize>,
    by_reason: BTreeMap<&'a str, Vec<&'a StoredLetter>>,
}

impl<'a> FoundLetters<'a> {
    /// Matches each letter by its booking id, else its record key, to a named one in `wanted`.
    fn sort(letters: &'a [StoredLetter], wanted: &ExpectedLetters<'a>) -> FoundLetters<'a> {
        let mut found = FoundLetters {
            named: BTreeMap::new(),
            by_reason: BTreeMap::new(),
        };
        for l in letters {
            let key = l.record_key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned());
            let matched = [l.booking_id.clone(), key].into_iter().flatten().find_map(|id| {
                wanted
                    .named
                    .get_key_value(&(id, l.reason.as_str()))
                    .map(|(k, _)| k.clone())
            });
            match matched {
                Some(k) => *found.named.entry(k).or_default() += 1,
                None => found.by_reason.entry(l.reason.as_str()).or_default().push(l),
            }
        }
        found
    }
}

/// Every named dead letter once; of each reason, as many others as the ledger counts.
fn compare_dead_letters(tally: &mut Tally, letters: &[StoredLetter], expected: &Expected) {
    tally.dead_lettered = letters.len();
    let wanted = ExpectedLetters::from_ledger(expected);
    let found = FoundLetters::sort(letters, &wanted);
    for (k, want) in &wanted.named {
        let got = found.named.get(k).copied().unwrap_or(0);
        if got < *want {
            tally.lose(want - got, format!("missing dead letter {k:?}"));
        } else if got > *want {
            tally.double(got - want, format!("dead letter {k:?} {got} times"));
        }
    }
    let reasons: BTreeSet<&str> = wanted.by_reason.keys().chain(found.by_reason.keys()).copied().collect();
    for reason in reasons {
        let want = wanted.by_reason.get(reason).copied().unwrap_or(0);
        let extra = found.by_reason.get(reason).map_or(&[][..], Vec::as_slice);
        compare_reason(tally, reason, want, extra);
    }
}

/// The dead letters of `reason` not named by the ledger: `want` of them, `found` in the database.
fn compare_reason(tally: &mut Tally, reason: &str, want: usize, found: &[&StoredLetter]) {
    let got = found.len();
    if got < want {
        tally.lose(
            want - got,
            format!("{} dead letters of reason {reason} missing", want - got),
        );
    } else if got > want {
        let examples: Vec<String> = found
            .iter()
            .take(5)
            .map(|l| format!("#{} {}@{} {:?}", l.id, l.topic, l.kafka_offset, l.booking_id))
            .collect();
        tally.double(
            got - want,
            format!(
                "{} dead letters of reason {reason} beyond the ledger, e.g. {}",
                got - want,
                examples.join(", ")
            ),
        );
    }
}

/// No cancellation left parked: each was released by its booking.
fn compare_parked(tally: &mut Tally, parked: &[String]) {
    tally.parked_left = parked.len();
    if !parked.is_empty() {
        tally.lose(
            parked.len(),
            format!(
                "{} cancellations still parked, e.g. {:?}",
                parked.len(),
                &parked[..parked.len().min(5)]
            ),
        );
    }
}
