//! Reading a consumed record: its headers as raw bytes (without rdkafka's panicking accessors) and
//! the work it becomes for a writer.

use crate::baggage::{self, HeaderBaggage};
use crate::models::EventKind;
use crate::offsets::TopicPartition;
use crate::pipeline::{RecordMeta, Work};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use std::ffi::CStr;
use std::time::Instant;

/// Reads a message's headers as raw bytes. rdkafka's `Headers::get` panics on a header name that is
/// not UTF-8, so the names and values are read through librdkafka directly.
pub fn raw_headers(message: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    // SAFETY: `message.ptr()` is a live rd_kafka_message_t for the lifetime of `message`. The
    // headers it returns are owned by the message, and each name/value pointer returned by
    // rd_kafka_header_get_all stays valid while the message lives; both are copied out at once.
    unsafe {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(message.ptr(), &mut headers)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return out;
        }
        let count = rd::rd_kafka_header_cnt(headers);
        for idx in 0..count {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut size = 0usize;
            let err = rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
            out.push((name, value));
        }
    }
    out
}

/// Turns a consumed message into the work for a writer. Never fails: a record that cannot be
/// decoded becomes a dead letter with its reason.
pub fn to_work(message: &BorrowedMessage<'_>, kind: EventKind, tp: &TopicPartition, max_payload_bytes: usize) -> Work {
    let baggage = baggage::find(&raw_headers(message));
    let meta = RecordMeta {
        tp: tp.clone(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        baggage: baggage.text().map(str::to_string),
        received_at: Instant::now(),
        produced_at_ms: message.timestamp().to_millis(),
    };
    if let HeaderBaggage::NotUtf8(_) = baggage {
        // A trace header never costs a booking: the record is applied, and its lossy baggage
        // text is what its log lines and any dead letter carry.
        log::warn!(topic = tp.topic.as_ref(), partition = tp.partition, offset = meta.offset;
            "the Baggage header value is not UTF-8; kept with replacement characters");
    }
    match kind.decode(&meta.payload, max_payload_bytes) {
        Ok(event) => Work::Apply { meta, event },
        Err(rejection) => Work::Reject { meta, rejection },
    }
}
