//! The rules of cancellation: only the owner cancels, only Accepted becomes Cancelled, and a
//! reference is an external id or, when all digits, a row id. The same rules decide whether a
//! booking created in this batch is written as Cancelled at once.

use crate::models::{Reason, Rejection};
use crate::pipeline::End;
use crate::repository::{BookingRow, NewBooking};
use std::collections::{HashMap, HashSet};

/// A cancellation being decided: from this batch or released from the parking.
pub(super) struct CancelRequest<'a> {
    pub booking_ref: &'a str,
    pub user_ref: &'a str,
    pub at: CancelAt,
}

/// Where a cancellation being decided comes from: the batch's record at this index, or the
/// released parked cancellation at this index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CancelAt {
    Batch(usize),
    Released(usize),
}

pub(super) const ACCEPTED: &str = "Accepted";
const CANCELLED: &str = "Cancelled";

pub(super) fn dead(reason: Reason, error: impl Into<String>) -> End {
    End::DeadLettered(Rejection::new(reason, error))
}

/// The external ids of the new bookings that `requests`, decided in order, cancel: each is
/// decided against the booking as it is created (Accepted, owned by its user), by the same rules as
/// a booking that exists.
pub(super) fn cancelled_on_insert<'a>(
    new: &[NewBooking<'a>],
    requests: &[CancelRequest<'_>],
    users: &HashMap<String, i32>,
) -> HashSet<&'a str> {
    let mut rows = BookingsByReference::new(
        new.iter()
            .enumerate()
            .map(|(i, nb)| BookingRow {
                // Not a row id yet: negative, so no all-digit reference can name it.
                id: -1 - i as i32,
                external_id: Some(nb.external_id.to_string()),
                user_id: nb.user_id,
                status: ACCEPTED.to_string(),
            })
            .collect(),
    );
    let mut cancelled = Vec::new();
    for request in requests {
        if let Some(row) = rows.find(request.booking_ref) {
            decide_cancel(row, users.get(request.user_ref).copied(), request, &mut cancelled);
        }
    }
    cancelled
        .iter()
        .filter_map(|id| new.get((-1 - id) as usize))
        .map(|nb| nb.external_id)
        .collect()
}

/// The rules of cancellation, for a booking that exists.
pub(super) fn decide_cancel(
    row: &mut BookingRow,
    user_id: Option<i32>,
    request: &CancelRequest<'_>,
    to_cancel: &mut Vec<i32>,
) -> End {
    let Some(user_id) = user_id else {
        return dead(
            Reason::UnknownUser,
            format!("no user has id, email or username {:?}", request.user_ref),
        );
    };
    if user_id != row.user_id {
        return dead(
            Reason::Unauthorized,
            format!(
                "user {:?} does not own booking {:?}",
                request.user_ref, request.booking_ref
            ),
        );
    }
    match row.status.as_str() {
        ACCEPTED => {
            row.status = CANCELLED.to_string();
            to_cancel.push(row.id);
            End::Cancelled { id: row.id }
        }
        CANCELLED => End::AlreadyCancelled { id: row.id },
        other => dead(
            Reason::NotCancellable,
            format!(
                "booking {:?} is {other}; only Accepted bookings can be cancelled",
                request.booking_ref
            ),
        ),
    }
}

/// The bookings that cancellations refer to, found by external id first and then, for all-digit
/// references, by row id. Status changes made earlier in the batch are kept here.
pub(super) struct BookingsByReference {
    rows: Vec<BookingRow>,
    by_external: HashMap<String, usize>,
    by_id: HashMap<i32, usize>,
}

impl BookingsByReference {
    pub(super) fn new(rows: Vec<BookingRow>) -> BookingsByReference {
        let by_external = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.external_id.clone()?, i)))
            .collect();
        let by_id = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        BookingsByReference {
            rows,
            by_external,
            by_id,
        }
    }

    pub(super) fn find(&mut self, reference: &str) -> Option<&mut BookingRow> {
        let index = self.by_external.get(reference).copied().or_else(|| {
            if reference.bytes().all(|b| b.is_ascii_digit()) {
                self.by_id.get(&reference.parse::<i32>().ok()?).copied()
            } else {
                None
            }
        })?;
        self.rows.get_mut(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::tests::booking;

    fn request<'a>(booking_ref: &'a str, user_ref: &'a str) -> CancelRequest<'a> {
        CancelRequest {
            booking_ref,
            user_ref,
            at: CancelAt::Batch(0),
        }
    }

    fn users() -> HashMap<String, i32> {
        [("alice".to_string(), 1), ("bob".to_string(), 2)].into()
    }

    fn decided(new: &[NewBooking<'_>], requests: &[CancelRequest<'_>]) -> Vec<String> {
        let mut ids: Vec<String> = cancelled_on_insert(new, requests, &users())
            .into_iter()
            .map(str::to_string)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn only_a_booking_its_owner_cancels_is_written_as_cancelled() {
        let new = [booking("b-1", 1), booking("b-2", 2), booking("b-3", 1)];
        let requests = [
            request("b-1", "alice"),
            request("b-2", "alice"),  // not the owner
            request("b-3", "nobody"), // unknown user
            request("b-9", "alice"),  // not a booking of this batch
            request("b-1", "alice"),  // already cancelled
        ];
        assert_eq!(decided(&new, &requests), ["b-1"]);
    }

    #[test]
    fn a_refused_cancellation_does_not_stop_a_later_one_by_the_owner() {
        let new = [booking("b-1", 2)];
        assert_eq!(
            decided(&new, &[request("b-1", "alice"), request("b-1", "bob")]),
            ["b-1"]
        );
        assert!(decided(&new, &[]).is_empty());
    }

    #[test]
    fn an_all_digit_reference_never_names_a_booking_not_yet_written() {
        // The placeholder ids of unwritten rows are negative; "1" is a row id, not one of them.
        let new = [booking("b-1", 1)];
        assert!(decided(&new, &[request("1", "alice"), request("0", "alice")]).is_empty());
        let numeric = [booking("42", 1)];
        assert_eq!(decided(&numeric, &[request("42", "alice")]), ["42"]);
    }
}
