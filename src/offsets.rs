//! The per-partition offset watermark: which offset may be stored for commit.
//!
//! Writers finish records out of order, so a partition's committable position is the smallest
//! offset still in flight, or one past the last record dispatched when nothing is in flight.
//! Only that contiguous watermark is ever stored.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: Arc::from(topic),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// One partition's progress: offsets dispatched but not yet durable, and the next offset after
/// the last one dispatched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Watermark {
    in_flight: BTreeSet<i64>,
    next: Option<i64>,
    stored: Option<i64>,
}

impl Watermark {
    /// A record at `offset` was handed to a writer.
    pub fn dispatched(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// The record at `offset` reached a durable end. Unknown offsets are ignored: they belong to
    /// an earlier assignment and were made durable all the same.
    pub fn completed(&mut self, offset: i64) {
        self.in_flight.remove(&offset);
    }

    /// The last dispatched record was not handed over after all (shutdown while waiting).
    pub fn withdrawn(&mut self, offset: i64) {
        if self.in_flight.remove(&offset) && self.next == Some(offset + 1) {
            self.next = Some(offset);
        }
    }

    /// The offset to store for commit: everything before it is durable.
    pub fn committable(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Watermarks of every assigned partition, shared by the partition threads, the writers and the
/// thread that stores offsets.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<TopicPartition, Watermark>>,
    changed: Condvar,
}

impl OffsetTracker {
    pub fn new() -> Arc<OffsetTracker> {
        Arc::new(OffsetTracker::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, Watermark>> {
        self.partitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts tracking a newly assigned partition, forgetting any earlier assignment of it.
    pub fn assign(&self, tp: &TopicPartition) {
        self.lock().insert(tp.clone(), Watermark::default());
    }

    /// Stops tracking a revoked partition and returns its final watermark.
    pub fn revoke(&self, tp: &TopicPartition) -> Option<Watermark> {
        self.lock().remove(tp)
    }

    pub fn dispatched(&self, tp: &TopicPartition, offset: i64) {
        if let Some(w) = self.lock().get_mut(tp) {
            w.dispatched(offset);
        }
    }

    pub fn withdrawn(&self, tp: &TopicPartition, offset: i64) {
        if let Some(w) = self.lock().get_mut(tp) {
            w.withdrawn(offset);
        }
        self.changed.notify_all();
    }

    /// Marks records durable, for any partitions.
    pub fn completed<'a>(&self, done: impl IntoIterator<Item = (&'a TopicPartition, i64)>) {
        let mut partitions = self.lock();
        for (tp, offset) in done {
            if let Some(w) = partitions.get_mut(tp) {
                w.completed(offset);
            }
        }
        drop(partitions);
        self.changed.notify_all();
    }

    /// The watermarks that moved since the last call, for the consumer to store; each is
    /// reported once.
    pub fn take_to_store(&self) -> Vec<(TopicPartition, i64)> {
        let mut partitions = self.lock();
        let mut out = Vec::new();
        for (tp, w) in partitions.iter_mut() {
            if let Some(c) = w.committable() {
                if w.stored != Some(c) {
                    w.stored = Some(c);
                    out.push((tp.clone(), c));
                }
            }
        }
        out.sort();
        out
    }

    /// The committable watermark of each given partition that has one.
    pub fn committable(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let partitions = self.lock();
        tps.iter()
            .filter_map(|tp| Some((tp.clone(), partitions.get(tp)?.committable()?)))
            .collect()
    }

    /// Records in flight across the given partitions.
    pub fn in_flight(&self, tps: &[TopicPartition]) -> usize {
        let partitions = self.lock();
        tps.iter()
            .filter_map(|tp| partitions.get(tp))
            .map(Watermark::in_flight)
            .sum()
    }

    /// Waits until no record of the given partitions is in flight, or the timeout passes.
    /// Returns how many are still in flight.
    pub fn wait_drained(&self, tps: &[TopicPartition], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut partitions = self.lock();
        loop {
            let left: usize = tps
                .iter()
                .filter_map(|tp| partitions.get(tp))
                .map(Watermark::in_flight)
                .sum();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            partitions = self
                .changed
                .wait_timeout(partitions, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_dispatched_means_nothing_to_commit() {
        assert_eq!(Watermark::default().committable(), None);
    }

    #[test]
    fn out_of_order_completion_stores_only_the_contiguous_prefix() {
        let mut w = Watermark::default();
        for o in 10..15 {
            w.dispatched(o);
        }
        assert_eq!(w.committable(), Some(10));
        w.completed(12);
        w.completed(11);
        assert_eq!(w.committable(), Some(10), "10 is still in flight");
        w.completed(10);
        assert_eq!(w.committable(), Some(13));
        w.completed(14);
        assert_eq!(w.committable(), Some(13));
        w.completed(13);
        assert_eq!(w.committable(), Some(15));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_watermark() {
        let mut w = Watermark::default();
        w.dispatched(3);
        w.dispatched(7);
        w.completed(7);
        assert_eq!(w.committable(), Some(3));
        w.completed(3);
        assert_eq!(w.committable(), Some(8));
    }

    #[test]
    fn a_withdrawn_record_is_not_committed() {
        let mut w = Watermark::default();
        w.dispatched(5);
        w.completed(5);
        w.dispatched(6);
        w.withdrawn(6);
        assert_eq!(w.committable(), Some(6));
    }

    #[test]
    fn unknown_completions_are_ignored() {
        let mut w = Watermark::default();
        w.dispatched(5);
        w.completed(99);
        assert_eq!(w.committable(), Some(5));
    }

    #[test]
    fn tracker_reports_changes_once_and_drains() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        t.assign(&tp);
        t.dispatched(&tp, 0);
        t.dispatched(&tp, 1);
        assert_eq!(t.take_to_store(), vec![(tp.clone(), 0)]);
        assert!(t.take_to_store().is_empty());
        assert_eq!(t.wait_drained(std::slice::from_ref(&tp), Duration::from_millis(10)), 2);
        t.completed([(&tp, 0), (&tp, 1)]);
        assert_eq!(t.take_to_store(), vec![(tp.clone(), 2)]);
        assert_eq!(t.wait_drained(std::slice::from_ref(&tp), Duration::from_millis(10)), 0);
        assert_eq!(t.revoke(&tp).and_then(|w| w.committable()), Some(2));
        t.dispatched(&tp, 3);
        assert!(t.take_to_store().is_empty(), "revoked partitions are not tracked");
    }

    #[test]
    fn wait_drained_wakes_on_completion() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 1);
        t.assign(&tp);
        t.dispatched(&tp, 0);
        let t2 = Arc::clone(&t);
        let tp2 = tp.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t2.completed([(&tp2, 0)]);
        });
        assert_eq!(t.wait_drained(&[tp], Duration::from_secs(10)), 0);
        h.join().unwrap();
    }
}
