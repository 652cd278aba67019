//! A consumed record as the worker's own tables store it, with a dead letter or a parked
//! cancellation: where it came from in Kafka, its key, payload and baggage.

use super::{get, Param};
use crate::database::DbError;
use postgres::types::Type;
use postgres::Row;

/// Where a record came from, as stored with a dead letter or a parked cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub baggage: Option<&'a str>,
}

/// A record that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter<'a> {
    pub source: Source<'a>,
    pub booking_id: Option<&'a str>,
    pub reason: &'static str,
    pub error: &'a str,
    /// The server's SQLSTATE, when the database refused the record.
    pub sqlstate: Option<&'a str>,
}

/// Text columns cannot hold NUL; header-derived text may.
pub(super) fn text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// The columns every stored record has, as arrays: topic, partition, offset, key, payload,
/// baggage.
#[derive(Default)]
pub(super) struct SourceColumns<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<Option<&'a [u8]>>,
    baggage: Vec<Option<String>>,
}

impl<'a> SourceColumns<'a> {
    /// The records' columns; one paired with `false` goes without its bytes (key, payload and
    /// baggage are NULL).
    pub(super) fn new<'s: 'a>(sources: impl Iterator<Item = (&'a Source<'s>, bool)>) -> SourceColumns<'a> {
        let mut c = SourceColumns::default();
        for (s, bytes) in sources {
            c.topics.push(s.topic);
            c.partitions.push(s.partition);
            c.offsets.push(s.offset);
            c.keys.push(s.key.filter(|_| bytes));
            c.payloads.push(Some(s.payload).filter(|_| bytes));
            c.baggage.push(s.baggage.filter(|_| bytes).map(text));
        }
        c
    }

    /// The six arrays as parameters, in column order.
    pub(super) fn params(&self) -> [Param<'_>; 6] {
        [
            (&self.topics, Type::TEXT_ARRAY),
            (&self.partitions, Type::INT4_ARRAY),
            (&self.offsets, Type::INT8_ARRAY),
            (&self.keys, Type::BYTEA_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
            (&self.baggage, Type::TEXT_ARRAY),
        ]
    }
}

/// A consumed record as stored with a dead letter or a parked cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub record_key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub baggage: Option<String>,
}

impl StoredRecord {
    pub(super) fn from_row(row: &Row) -> Result<StoredRecord, DbError> {
        Ok(StoredRecord {
            topic: get(row, "topic")?,
            kafka_partition: get(row, "kafka_partition")?,
            kafka_offset: get(row, "kafka_offset")?,
            record_key: get(row, "record_key")?,
            payload: get(row, "payload")?,
            baggage: get(row, "baggage")?,
        })
    }

    pub fn source(&self) -> Source<'_> {
        Source {
            topic: &self.topic,
            partition: self.kafka_partition,
            offset: self.kafka_offset,
            key: self.record_key.as_deref(),
            payload: &self.payload,
            baggage: self.baggage.as_deref(),
        }
    }
}
