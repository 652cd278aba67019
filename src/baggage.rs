//! W3C baggage carried by a record's `Baggage` header: finding it among raw headers and parsing it.
//!
//! This is the Go worker's tracing middleware. It does no I/O and never fails on input: a header
//! key that is not UTF-8 is simply not `Baggage`, and a value that is not UTF-8 is kept lossily
//! (each invalid sequence becomes U+FFFD) and reported, so that the record is applied all the same
//! and the oddity is logged.

/// The most of a baggage value that is carried and logged (the W3C limit for the whole header).
pub const MAX_BAGGAGE_BYTES: usize = 8192;

/// What a record's headers say about baggage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderBaggage {
    Absent,
    Present(String),
    /// The header was there but its value is not UTF-8; the lossy text travels with the record.
    NotUtf8(String),
}

impl HeaderBaggage {
    /// The text to carry with the event, if any.
    pub fn text(&self) -> Option<&str> {
        match self {
            HeaderBaggage::Absent => None,
            HeaderBaggage::Present(s) | HeaderBaggage::NotUtf8(s) => Some(s),
        }
    }
}

/// Finds the `Baggage` header (name matched case-insensitively, first one wins) among raw
/// `(name, value)` pairs.
pub fn find(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> HeaderBaggage {
    let Some((_, value)) = headers.iter().find(|(name, _)| name.eq_ignore_ascii_case(b"baggage")) else {
        return HeaderBaggage::Absent;
    };
    let Some(value) = value else {
        return HeaderBaggage::Absent;
    };
    let cut = &value[..value.len().min(MAX_BAGGAGE_BYTES)];
    match std::str::from_utf8(value) {
        Ok(text) => HeaderBaggage::Present(truncate(text).trim().to_string()),
        Err(_) => HeaderBaggage::NotUtf8(truncate(&String::from_utf8_lossy(cut)).trim().to_string()),
    }
}

fn truncate(text: &str) -> &str {
    if text.len() <= MAX_BAGGAGE_BYTES {
        return text;
    }
    let mut end = MAX_BAGGAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One `key=value` list member of a baggage header; properties after `;` are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: String,
    pub value: String,
}

/// Parses a baggage header leniently: members without a key or `=` are skipped, values are
/// percent-decoded when that yields UTF-8 and kept as written otherwise.
pub fn parse(header: &str) -> Vec<Member> {
    header
        .split(',')
        .filter_map(|member| {
            let member = member.split(';').next().unwrap_or("");
            let (key, value) = member.split_once('=')?;
            let key = key.trim();
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return None;
            }
            let value = value.trim();
            Some(Member {
                key: key.to_string(),
                value: percent_decode(value).unwrap_or_else(|| value.to_string()),
            })
        })
        .collect()
}

/// The value of the first member named `key`.
pub fn get(header: &str, key: &str) -> Option<String> {
    parse(header).into_iter().find(|m| m.key == key).map(|m| m.value)
}

fn percent_decode(value: &str) -> Option<String> {
    if !value.contains('%') {
        return Some(value.to_string());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], value: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        (name.to_vec(), Some(value.to_vec()))
    }

    #[test]
    fn the_header_name_matches_in_any_case() {
        for name in [&b"Baggage"[..], b"baggage", b"BAGGAGE", b"bAgGaGe"] {
            let found = find(&[header(b"other", b"x"), header(name, b"trace-id=abc123")]);
            assert_eq!(found, HeaderBaggage::Present("trace-id=abc123".into()));
        }
    }

    #[test]
    fn absent_or_null_header_is_absent() {
        assert_eq!(find(&[]), HeaderBaggage::Absent);
        assert_eq!(find(&[(b"baggage".to_vec(), None)]), HeaderBaggage::Absent);
        assert_eq!(find(&[header(b"baggages", b"a=b")]), HeaderBaggage::Absent);
    }

    #[test]
    fn a_non_utf8_key_is_not_baggage_and_does_not_fail() {
        let found = find(&[header(&[0xff, 0xfe], b"x"), header(b"Baggage", b"k=v")]);
        assert_eq!(found, HeaderBaggage::Present("k=v".into()));
    }

    #[test]
    fn a_non_utf8_value_is_reported_lossily() {
        let found = find(&[header(b"baggage", &[b't', b'=', 0xff])]);
        assert_eq!(found, HeaderBaggage::NotUtf8("t=\u{fffd}".into()));
        assert_eq!(found.text(), Some("t=\u{fffd}"));
    }

    #[test]
    fn a_huge_value_is_cut_on_a_char_boundary() {
        let value = "é".repeat(MAX_BAGGAGE_BYTES);
        let HeaderBaggage::Present(text) = find(&[header(b"baggage", value.as_bytes())]) else {
            panic!("expected baggage");
        };
        assert!(text.len() <= MAX_BAGGAGE_BYTES && text.len() >= MAX_BAGGAGE_BYTES - 1);
    }

    #[test]
    fn a_huge_non_utf8_value_stays_within_the_limit_once_decoded_lossily() {
        let value = vec![0xffu8; MAX_BAGGAGE_BYTES * 2];
        let HeaderBaggage::NotUtf8(text) = find(&[header(b"baggage", &value)]) else {
            panic!("expected lossy baggage");
        };
        assert!(text.len() <= MAX_BAGGAGE_BYTES, "{} bytes", text.len());
        assert!(text.starts_with('\u{fffd}'));
    }

    #[test]
    fn parses_members_and_skips_garbage() {
        let members = parse(" trace-id=abc123 , span-id = def456;prop=1,broken,=novalue,user=J%C3%BCrgen");
        let pairs: Vec<(&str, &str)> = members.iter().map(|m| (m.key.as_str(), m.value.as_str())).collect();
        assert_eq!(
            pairs,
            [("trace-id", "abc123"), ("span-id", "def456"), ("user", "Jürgen")]
        );
        assert_eq!(
            get("trace-id=abc123,span-id=def456", "span-id").as_deref(),
            Some("def456")
        );
        assert_eq!(get("trace-id=abc123", "span-id"), None);
    }

    #[test]
    fn bad_percent_encoding_is_kept_as_written() {
        assert_eq!(get("k=100%", "k").as_deref(), Some("100%"));
        assert_eq!(get("k=%zz", "k").as_deref(), Some("%zz"));
    }
}
