//! The cap on the bytes of records in flight between the partition threads and the writers
//! (`MAX_IN_FLIGHT_BYTES`): the channels bound how many records wait, this bounds how much memory
//! they hold, whatever their size. A partition thread that would pass the cap waits, which pauses
//! its consumption as a full channel does.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a waiting partition thread looks at its stop flag.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Bytes in flight, and the cap.
#[derive(Debug)]
pub struct ByteBudget {
    cap: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl ByteBudget {
    pub fn new(cap: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            cap,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Takes `bytes`, waiting while they would pass the cap. A record larger than the cap goes
    /// through alone, once nothing else is in flight. Returns false when `stop` turns true first.
    pub fn acquire(&self, bytes: usize, stop: &dyn Fn() -> bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *used == 0 || *used + bytes <= self.cap {
                *used += bytes;
                return true;
            }
            if stop() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, WAIT_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Gives back `bytes` whose records reached their end (or were withdrawn).
    pub fn release(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(bytes);
        self.freed.notify_all();
    }

    /// Bytes in flight now.
    pub fn in_flight(&self) -> usize {
        *self.used.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_until_bytes_come_back() {
        let budget = ByteBudget::new(100);
        assert!(budget.acquire(60, &|| false));
        assert!(!budget.acquire(60, &|| true), "over the cap it waits, until stopped");
        assert!(budget.acquire(40, &|| false));
        assert_eq!(budget.in_flight(), 100);
        let waiter = {
            let budget = Arc::clone(&budget);
            std::thread::spawn(move || budget.acquire(50, &|| false))
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished());
        budget.release(60);
        assert!(waiter.join().unwrap());
        assert_eq!(budget.in_flight(), 90);
    }

    #[test]
    fn a_record_larger_than_the_cap_goes_through_alone() {
        let budget = ByteBudget::new(100);
        assert!(budget.acquire(500, &|| false));
        assert!(!budget.acquire(1, &|| true));
        budget.release(500);
        assert_eq!(budget.in_flight(), 0);
    }
}
