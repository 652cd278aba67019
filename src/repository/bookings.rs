//! The bookings: users and rooms resolved in bulk, the Go worker's rows matched and adopted, new
//! rows inserted, and cancellations found and applied, all on booking-management's tables.

use super::{execute, get, query, Param};
use crate::database::DbError;
use chrono::{DateTime, NaiveDate, Utc};
use postgres::types::Type;
use postgres::{GenericClient, Row};
use std::collections::HashMap;

/// `(reference, id)` rows as a map; a NULL id (nothing matched) is left out.
fn resolved(rows: &[Row]) -> Result<HashMap<String, i32>, DbError> {
    let mut map = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Some(id) = get::<Option<i32>>(row, "id")? {
            map.insert(get(row, "reference")?, id);
        }
    }
    Ok(map)
}

/// Resolves user identifiers to `users.id`. An identifier is tried as a numeric id first, then as
/// an email, then as a username; unknown identifiers are absent from the map.
pub fn resolve_user_ids<C: GenericClient>(conn: &mut C, identifiers: &[&str]) -> Result<HashMap<String, i32>, DbError> {
    if identifiers.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = query(
        conn,
        "SELECT i.ref AS reference,
                COALESCE(
                    (SELECT u.id FROM users u
                      WHERE u.id = CASE WHEN i.ref ~ '^0*[0-9]{1,10}$' THEN
                                     CASE WHEN i.ref::int8 <= 2147483647 THEN i.ref::integer END END),
                    (SELECT u.id FROM users u WHERE u.email = i.ref),
                    (SELECT u.id FROM users u WHERE u.username = i.ref)) AS id
           FROM (SELECT DISTINCT ref FROM unnest($1::text[]) AS ref) AS i",
        &[(&identifiers, Type::TEXT_ARRAY)],
    )?;
    resolved(&rows)
}

/// Resolves room internal ids to `rooms.id`; unknown rooms are absent from the map.
pub fn resolve_room_ids<C: GenericClient>(
    conn: &mut C,
    internal_ids: &[&str],
) -> Result<HashMap<String, i32>, DbError> {
    if internal_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = query(
        conn,
        "SELECT internal_id::text AS reference, id FROM rooms WHERE internal_id = ANY($1::text[])",
        &[(&internal_ids, Type::TEXT_ARRAY)],
    )?;
    resolved(&rows)
}

/// A booking to create, with its user and room already resolved.
#[derive(Debug, Clone)]
pub struct NewBooking<'a> {
    pub external_id: &'a str,
    pub user_id: i32,
    pub room_id: i32,
    pub guests: i32,
    pub start_date: NaiveDate,
    pub end_date: NaiveDate,
    /// The event's instants, when its dates were timestamps (for adopting the Go worker's rows).
    pub start_instant: Option<DateTime<Utc>>,
    pub end_instant: Option<DateTime<Utc>>,
    pub payment_id: &'a str,
    /// Written as Cancelled rather than Accepted: a cancellation in the same transaction, decided
    /// by the cancellation rules, cancels it.
    pub cancelled: bool,
}

/// The fields of new bookings as one array per column, to bind as parameters.
struct BookingColumns<'a> {
    users: Vec<i32>,
    rooms: Vec<i32>,
    guests: Vec<i32>,
    starts: Vec<NaiveDate>,
    start_instants: Vec<Option<DateTime<Utc>>>,
    ends: Vec<NaiveDate>,
    end_instants: Vec<Option<DateTime<Utc>>>,
    payments: Vec<&'a str>,
    externals: Vec<&'a str>,
    cancelled: Vec<bool>,
}

impl<'a> BookingColumns<'a> {
    fn new(bookings: &[NewBooking<'a>]) -> BookingColumns<'a> {
        BookingColumns {
            users: bookings.iter().map(|b| b.user_id).collect(),
            rooms: bookings.iter().map(|b| b.room_id).collect(),
            guests: bookings.iter().map(|b| b.guests).collect(),
            starts: bookings.iter().map(|b| b.start_date).collect(),
            start_instants: bookings.iter().map(|b| b.start_instant).collect(),
            ends: bookings.iter().map(|b| b.end_date).collect(),
            end_instants: bookings.iter().map(|b| b.end_instant).collect(),
            payments: bookings.iter().map(|b| b.payment_id).collect(),
            externals: bookings.iter().map(|b| b.external_id).collect(),
            cancelled: bookings.iter().map(|b| b.cancelled).collect(),
        }
    }

    /// The columns as parameters $1 to $10, in the order of [`BOOKING_COLUMNS`].
    fn params(&self) -> [Param<'_>; 10] {
        [
            (&self.users, Type::INT4_ARRAY),
            (&self.rooms, Type::INT4_ARRAY),
            (&self.guests, Type::INT4_ARRAY),
            (&self.starts, Type::DATE_ARRAY),
            (&self.start_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.ends, Type::DATE_ARRAY),
            (&self.end_instants, Type::TIMESTAMPTZ_ARRAY),
            (&self.payments, Type::TEXT_ARRAY),
            (&self.externals, Type::TEXT_ARRAY),
            (&self.cancelled, Type::BOOL_ARRAY),
        ]
    }
}

/// [`BookingColumns::params`] as a table `t`: user, room, guests, start date and instant, end date
/// and instant, payment id, external id, cancelled, and the 1-based row number `n`.
const BOOKING_COLUMNS: &str = "unnest($1::integer[], $2::integer[], $3::integer[], $4::date[], $5::timestamptz[],
                    $6::date[], $7::timestamptz[], $8::text[], $9::text[], $10::boolean[])
             WITH ORDINALITY AS t(u, r, g, s, si, e, ei, p, x, c, n)";

/// For each booking (by index), the ids of the rows the Go worker wrote that it matches, lowest
/// first: no external id; the same user, room, guests and payment id; each date either as written
/// or as the day the server's time zone gives the event's instant (the Go worker bound the
/// instant to a `DATE` column). Bookings whose external id already has a row get none.
pub fn find_legacy_matches<C: GenericClient>(
    conn: &mut C,
    bookings: &[NewBooking<'_>],
) -> Result<HashMap<usize, Vec<i32>>, DbError> {
    if bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let c = BookingColumns::new(bookings);
    let rows = query(
        conn,
        &format!(
            "SELECT (t.n - 1)::integer AS i, array_agg(b.id ORDER BY b.id) AS ids
           FROM {BOOKING_COLUMNS}
           JOIN bookings b
             ON b.external_id IS NULL AND b.room_id = t.r AND b.user_id = t.u
            AND b.number_of_guests = t.g AND b.payment_id = t.p
            AND (b.start_date = t.s OR b.start_date = t.si::date)
            AND (b.end_date = t.e OR b.end_date = t.ei::date)
          WHERE NOT EXISTS (SELECT 1 FROM bookings x WHERE x.external_id = t.x)
          GROUP BY t.n"
        ),
        &c.params(),
    )?;
    rows.iter()
        .map(|r| Ok((get::<i32>(r, "i")? as usize, get(r, "ids")?)))
        .collect()
}

/// Sets the external id of rows the Go worker wrote, and nothing else. A row another transaction
/// adopted meanwhile is left alone. Returns the row id of each external id adopted.
pub fn adopt_bookings<C: GenericClient>(
    conn: &mut C,
    adoptions: &[(i32, &str)],
) -> Result<HashMap<String, i32>, DbError> {
    if adoptions.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i32> = adoptions.iter().map(|(id, _)| *id).collect();
    let externals: Vec<&str> = adoptions.iter().map(|(_, x)| *x).collect();
    let rows = query(
        conn,
        "UPDATE bookings b SET external_id = t.x
           FROM unnest($1::integer[], $2::text[]) AS t(id, x)
          WHERE b.id = t.id AND b.external_id IS NULL
         RETURNING b.id, b.external_id::text AS external_id",
        &[(&ids, Type::INT4_ARRAY), (&externals, Type::TEXT_ARRAY)],
    )?;
    rows.iter()
        .map(|r| Ok((get(r, "external_id")?, get(r, "id")?)))
        .collect()
}

/// Creates bookings with status Accepted, or Cancelled for those marked so. A booking whose external
/// id already exists is left as it is. Returns the `bookings.id` of each booking actually created, by
/// external id.
pub fn create_bookings<C: GenericClient>(
    conn: &mut C,
    bookings: &[NewBooking<'_>],
) -> Result<HashMap<String, i32>, DbError> {
    if bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let c = BookingColumns::new(bookings);
    let rows = query(
        conn,
        &format!(
            "INSERT INTO bookings
             (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status,
              external_id, created_at, updated_at)
         SELECT u, r, g, s, e, p, CASE WHEN c THEN 'Cancelled' ELSE 'Accepted' END, x, now(), now()
           FROM {BOOKING_COLUMNS}
         ON CONFLICT (external_id) DO NOTHING
         RETURNING external_id::text AS external_id, id"
        ),
        &c.params(),
    )?;
    rows.iter()
        .map(|r| Ok((get(r, "external_id")?, get(r, "id")?)))
        .collect()
}

/// A booking as a cancellation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingRow {
    pub id: i32,
    pub external_id: Option<String>,
    pub user_id: i32,
    pub status: String,
}

/// Finds and row-locks the bookings that cancellations refer to: by external id, and, for
/// references made only of digits, by `bookings.id` too (rows created by booking-management have no
/// external id). The caller prefers the external-id match.
pub fn find_bookings_for_cancel<C: GenericClient>(
    conn: &mut C,
    references: &[&str],
) -> Result<Vec<BookingRow>, DbError> {
    if references.is_empty() {
        return Ok(Vec::new());
    }
    let rows = query(
        conn,
        "SELECT id, external_id::text AS external_id, user_id, status::text AS status FROM bookings
          WHERE external_id = ANY($1::text[])
             OR id = ANY(ARRAY(SELECT CASE WHEN r ~ '^0*[0-9]{1,10}$' THEN
                                        CASE WHEN r::int8 <= 2147483647 THEN r::integer END END
                                 FROM unnest($1::text[]) AS r))
          ORDER BY id
          FOR UPDATE",
        &[(&references, Type::TEXT_ARRAY)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(BookingRow {
                id: get(r, "id")?,
                external_id: get(r, "external_id")?,
                user_id: get(r, "user_id")?,
                status: get(r, "status")?,
            })
        })
        .collect()
}

/// Cancels bookings that are still Accepted; returns how many changed.
pub fn cancel_bookings<C: GenericClient>(conn: &mut C, ids: &[i32]) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    execute(
        conn,
        "UPDATE bookings SET status = 'Cancelled', updated_at = now()
          WHERE id = ANY($1::integer[]) AND status = 'Accepted'",
        &[(&ids, Type::INT4_ARRAY)],
    )
}
