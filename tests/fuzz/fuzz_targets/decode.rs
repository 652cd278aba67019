//! Fuzz target for the decoder: `EventKind::decode` of both kinds, and the baggage header
//! (`baggage::find` over raw headers, `baggage::parse`/`get` over text), on arbitrary bytes. None
//! may panic, and what they accept must keep the contract's invariants.
#![no_main]

/// The crate's own decoding modules, compiled as they are (they depend on nothing else in it).
#[allow(dead_code)]
#[path = "../../../src/baggage.rs"]
mod baggage;
#[allow(dead_code)]
#[path = "../../../src/models.rs"]
mod models;

use baggage::{HeaderBaggage, MAX_BAGGAGE_BYTES};
use libfuzzer_sys::fuzz_target;
use models::{Event, EventKind, MAX_ID_LEN};

fn check_id(id: &str) {
    assert!(!id.is_empty(), "an id is never empty");
    assert!(
        id.chars().count() <= MAX_ID_LEN,
        "an id is at most {MAX_ID_LEN} characters"
    );
    assert!(!id.chars().any(char::is_control), "an id has no control characters");
    assert_eq!(id, id.trim(), "an id is trimmed");
}

fuzz_target!(|data: &[u8]| {
    for (kind, limit) in [
        (EventKind::Booking, 65_536),
        (EventKind::Cancellation, 65_536),
        (EventKind::Booking, 64),
    ] {
        match kind.decode(data, limit) {
            Ok(event) => {
                assert!(data.len() <= limit);
                assert_eq!(event.kind(), kind);
                match &event {
                    Event::Booking(b) => {
                        for id in [&b.booking_id, &b.user_id, &b.room_id, &b.payment_id] {
                            check_id(id);
                        }
                        assert!(b.guests >= 1);
                        assert!(b.end_date > b.start_date);
                    }
                    Event::Cancellation(c) => {
                        check_id(&c.booking_id);
                        check_id(&c.user_id);
                    }
                }
            }
            Err(rejection) => assert!(!rejection.error.is_empty(), "every rejection says why"),
        }
    }

    // The input as headers: NUL-separated name, value, name, value...; a missing last value is a
    // header without a value.
    let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = parts
        .chunks(2)
        .map(|pair| (pair[0].to_vec(), pair.get(1).map(|v| v.to_vec())))
        .collect();
    match baggage::find(&headers) {
        HeaderBaggage::Present(text) => {
            assert!(text.len() <= MAX_BAGGAGE_BYTES);
            for member in baggage::parse(&text) {
                assert!(!member.key.is_empty());
            }
        }
        HeaderBaggage::NotUtf8(_) | HeaderBaggage::Absent => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for member in baggage::parse(text) {
            assert!(!member.key.is_empty());
            assert!(!member.key.chars().any(|c| c.is_whitespace() || c.is_control()));
        }
        let _ = baggage::get(text, "trace-id");
    }
});
