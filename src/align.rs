//! Keeps the cancellation topic from running ahead of the booking topic while a backlog drains
//! (`ALIGN_CANCELLATIONS`). Both topics' partitions are read at the same pace, so in a backlog the
//! small cancellation topic reaches records whose bookings are still far down the booking topic,
//! and each such cancellation is parked in the database and taken out again when its booking comes.
//! Here each booking partition thread publishes how far it has handed records to the writers (its
//! horizon, the Kafka timestamp of the last one), and a cancellation partition thread waits until
//! every booking partition that is draining a backlog has passed the cancellation's timestamp. The
//! booking then travels ahead of its cancellation in the same writer's channel (both are routed by
//! booking id), and the two meet in one transaction. Parking still covers every other order: this
//! only changes the order in which the records reach the writers, never what they do.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A booking record older than this when it is handed on (by its Kafka timestamp) means that its
/// partition is draining a backlog. A partition that keeps up never holds a cancellation back.
pub const BEHIND: Duration = Duration::from_secs(1);

/// How long a cancellation waits for a horizon that does not move (the booking partitions are
/// held by back-pressure, say) before it goes on alone.
pub const STALL: Duration = Duration::from_secs(1);

/// How often a waiting cancellation looks at the horizon again.
const RECHECK: Duration = Duration::from_millis(5);

/// A booking partition that holds nothing back: it keeps up, or has nothing to read.
const CAUGHT_UP: i64 = i64::MAX;

/// A booking partition whose thread has not read anything yet.
const NOT_STARTED: i64 = i64::MIN;

/// The horizons of the booking partitions this instance holds.
#[derive(Debug, Default)]
pub struct Horizon {
    slots: Mutex<Vec<Arc<AtomicI64>>>,
}

impl Horizon {
    pub fn new() -> Arc<Horizon> {
        Arc::new(Horizon::default())
    }

    /// A slot for a new booking partition thread; it leaves the horizon when dropped.
    pub fn join(self: &Arc<Self>) -> BookingSlot {
        let slot = Arc::new(AtomicI64::new(NOT_STARTED));
        self.lock().push(Arc::clone(&slot));
        BookingSlot {
            slot,
            horizon: Arc::clone(self),
        }
    }

    /// The lowest horizon of the booking partitions ([`CAUGHT_UP`] when there are none).
    fn lowest(&self) -> i64 {
        self.lock()
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .min()
            .unwrap_or(CAUGHT_UP)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<AtomicI64>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One booking partition thread's part of the horizon.
#[derive(Debug)]
pub struct BookingSlot {
    slot: Arc<AtomicI64>,
    horizon: Arc<Horizon>,
}

impl BookingSlot {
    /// A booking record with this Kafka timestamp was handed to the writers at `now_ms`.
    pub fn handed_on(&self, produced_at_ms: Option<i64>, now_ms: i64) {
        let behind = produced_at_ms.filter(|t| now_ms.saturating_sub(*t) > BEHIND.as_millis() as i64);
        self.slot.store(behind.unwrap_or(CAUGHT_UP), Ordering::Release);
    }

    /// The partition had nothing to read.
    pub fn idle(&self) {
        self.slot.store(CAUGHT_UP, Ordering::Release);
    }
}

impl Drop for BookingSlot {
    fn drop(&mut self) {
        self.horizon.lock().retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

/// What a cancellation partition thread does before it hands a cancellation on.
#[derive(Debug)]
pub struct CancellationGate {
    horizon: Arc<Horizon>,
    /// The horizon at which the last wait gave up: while it stays there, nothing waits again.
    gave_up_at: Option<i64>,
}

/// How a wait at the gate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passage {
    /// The booking partitions had passed the cancellation's time (or keep up).
    Reached,
    /// The horizon did not move for [`STALL`]; the cancellation goes on alone.
    GaveUp,
    /// The thread was told to stop.
    Stopped,
}

impl CancellationGate {
    pub fn new(horizon: &Arc<Horizon>) -> CancellationGate {
        CancellationGate {
            horizon: Arc::clone(horizon),
            gave_up_at: None,
        }
    }

    /// Waits until every booking partition that drains a backlog has handed on records up to the
    /// cancellation's Kafka timestamp, or its horizon stalls, or `stop` turns true.
    pub fn wait(&mut self, produced_at_ms: Option<i64>, stop: &dyn Fn() -> bool) -> Passage {
        let Some(at) = produced_at_ms else {
            return Passage::Reached;
        };
        let mut seen = self.horizon.lowest();
        let mut moved_at = Instant::now();
        loop {
            let lowest = self.horizon.lowest();
            if lowest >= at {
                self.gave_up_at = None;
                return Passage::Reached;
            }
            if self.gave_up_at == Some(lowest) {
                return Passage::GaveUp;
            }
            if stop() {
                return Passage::Stopped;
            }
            if lowest != seen {
                (seen, moved_at) = (lowest, Instant::now());
            } else if moved_at.elapsed() >= STALL {
                self.gave_up_at = Some(lowest);
                return Passage::GaveUp;
            }
            std::thread::sleep(RECHECK);
        }
    }
}

/// The wall clock in milliseconds since the epoch, as Kafka timestamps count.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const NOW: i64 = 1_000_000_000;
    const OLD: i64 = NOW - 60_000;

    fn never() -> bool {
        false
    }

    #[test]
    fn without_booking_partitions_nothing_waits() {
        let horizon = Horizon::new();
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(NOW), &never),
            Passage::Reached
        );
    }

    #[test]
    fn a_booking_partition_that_keeps_up_or_is_idle_holds_nothing_back() {
        let horizon = Horizon::new();
        let slot = horizon.join();
        slot.handed_on(Some(NOW - 10), NOW);
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(NOW), &never),
            Passage::Reached
        );
        slot.handed_on(Some(OLD), NOW);
        slot.idle();
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(NOW), &never),
            Passage::Reached
        );
        slot.handed_on(None, NOW);
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(NOW), &never),
            Passage::Reached
        );
    }

    #[test]
    fn a_cancellation_older_than_the_backlog_s_horizon_goes_at_once() {
        let horizon = Horizon::new();
        let slot = horizon.join();
        slot.handed_on(Some(OLD), NOW);
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(OLD - 1), &never),
            Passage::Reached
        );
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(OLD), &never),
            Passage::Reached
        );
    }

    #[test]
    fn a_cancellation_waits_until_the_backlog_passes_its_time() {
        let horizon = Horizon::new();
        let slot = horizon.join();
        slot.handed_on(Some(OLD), NOW);
        let waiting = {
            let horizon = Arc::clone(&horizon);
            std::thread::spawn(move || {
                let started = Instant::now();
                (
                    CancellationGate::new(&horizon).wait(Some(OLD + 500), &never),
                    started.elapsed(),
                )
            })
        };
        for t in [OLD + 100, OLD + 200, OLD + 300, OLD + 400] {
            std::thread::sleep(Duration::from_millis(100));
            slot.handed_on(Some(t), NOW);
        }
        std::thread::sleep(Duration::from_millis(100));
        slot.handed_on(Some(OLD + 500), NOW);
        let (passage, waited) = waiting.join().unwrap();
        assert_eq!(passage, Passage::Reached);
        assert!(waited >= Duration::from_millis(400), "went after {waited:?}");
    }

    #[test]
    fn a_horizon_that_does_not_move_is_given_up_once() {
        let horizon = Horizon::new();
        let slot = horizon.join();
        slot.handed_on(Some(OLD), NOW);
        let mut gate = CancellationGate::new(&horizon);
        let started = Instant::now();
        assert_eq!(gate.wait(Some(NOW), &never), Passage::GaveUp);
        assert!(started.elapsed() >= STALL);
        let again = Instant::now();
        assert_eq!(gate.wait(Some(NOW), &never), Passage::GaveUp);
        assert!(again.elapsed() < STALL, "a second wait at the same stalled horizon");
        slot.handed_on(Some(NOW - 5_000), NOW);
        assert_eq!(gate.wait(Some(NOW - 6_000), &never), Passage::Reached);
    }

    #[test]
    fn a_thread_that_has_read_nothing_yet_holds_back_until_it_reads_or_leaves() {
        let horizon = Horizon::new();
        let slot = horizon.join();
        let stop = AtomicBool::new(true);
        let stopped = || stop.load(Ordering::SeqCst);
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(OLD), &stopped),
            Passage::Stopped
        );
        drop(slot);
        assert_eq!(
            CancellationGate::new(&horizon).wait(Some(OLD), &never),
            Passage::Reached
        );
    }

    #[test]
    fn the_lowest_booking_partition_sets_the_horizon() {
        let horizon = Horizon::new();
        let (a, b) = (horizon.join(), horizon.join());
        a.handed_on(Some(OLD + 1_000), NOW);
        b.handed_on(Some(OLD), NOW);
        assert_eq!(horizon.lowest(), OLD);
        b.idle();
        assert_eq!(horizon.lowest(), OLD + 1_000);
        drop(a);
        assert_eq!(horizon.lowest(), CAUGHT_UP);
    }
}
