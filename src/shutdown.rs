//! A latch that can be waited on: [`Shutdown`] is the one a signal handler (or a fatal error) sets
//! and every loop of the worker watches; the binary uses another to learn that the worker finished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The latch that starts shutdown.
pub type Shutdown = Latch;

/// A cloneable handle on one flag that is set once and never cleared.
#[derive(Debug, Clone, Default)]
pub struct Latch {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    triggered: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Latch {
    pub fn new() -> Latch {
        Latch::default()
    }

    /// Sets the latch. Returns true the first time, false when it was already set.
    pub fn trigger(&self) -> bool {
        let first = !self.inner.triggered.swap(true, Ordering::SeqCst);
        let _guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.wake.notify_all();
        first
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// Sleeps for `timeout`, waking early when the latch is set. Returns true if it is set.
    pub fn sleep(&self, timeout: Duration) -> bool {
        let guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_triggered() {
            return true;
        }
        let _ = self
            .inner
            .wake
            .wait_timeout_while(guard, timeout, |_| !self.is_triggered())
            .unwrap_or_else(|p| p.into_inner());
        self.is_triggered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_is_seen_by_clones_and_wakes_sleepers() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let h = std::thread::spawn(move || s2.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.trigger());
        assert!(!s.trigger(), "second trigger reports it was already on");
        assert!(h.join().unwrap());
        assert!(s.sleep(Duration::from_secs(30)));
    }

    #[test]
    fn sleep_times_out_without_trigger() {
        assert!(!Shutdown::new().sleep(Duration::from_millis(5)));
    }
}
