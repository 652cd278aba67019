//! The worker's health as its threads report it: which long-running threads are alive and whether
//! the consumer's poll loop goes round (`/healthz`), and what the group has assigned this instance
//! (part of `/readyz`). The HTTP server only reads it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Liveness of the worker's long-running threads.
#[derive(Debug, Default)]
pub struct Health {
    threads: Mutex<Vec<(String, Arc<AtomicBool>)>>,
    poll_beat_ms: AtomicU64,
}

/// Held by a thread for as long as it runs; dropping it (also by a panic) marks the thread dead.
#[derive(Debug)]
pub struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The main queue must be polled at least this often for the process to count as healthy.
const POLL_STALL: Duration = Duration::from_secs(120);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// Registers the calling thread under `name`; keep the guard for the thread's life.
    pub fn register(&self, name: &str) -> Alive {
        let flag = Arc::new(AtomicBool::new(true));
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|(n, _)| n != name);
        threads.push((name.to_string(), Arc::clone(&flag)));
        Alive(flag)
    }

    /// The consumer's poll loop went round.
    pub fn beat(&self) {
        self.poll_beat_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// Ok, or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let dead: Vec<&str> = threads
            .iter()
            .filter(|(_, alive)| !alive.load(Ordering::SeqCst))
            .map(|(n, _)| n.as_str())
            .collect();
        if !dead.is_empty() {
            return Err(format!("threads stopped: {}", dead.join(", ")));
        }
        let beat = self.poll_beat_ms.load(Ordering::SeqCst);
        if beat != 0 && now_ms().saturating_sub(beat) > POLL_STALL.as_millis() as u64 {
            return Err(format!("consumer not polled for {} s", (now_ms() - beat) / 1000));
        }
        Ok(())
    }
}

/// Which subscribed topics this instance holds partitions of, as the last rebalance left them.
#[derive(Debug)]
pub struct Assignment {
    topics: Vec<String>,
    /// `None` until the first assignment, and while a rebalance has taken everything away.
    held: Mutex<Option<BTreeSet<String>>>,
}

impl Assignment {
    pub fn new(topics: &[&str]) -> Arc<Assignment> {
        Arc::new(Assignment {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            held: Mutex::new(None),
        })
    }

    /// A rebalance ended with partitions of these topics held (`None`: it is still under way).
    pub fn set(&self, held: Option<BTreeSet<String>>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    /// Ready once the group has settled an assignment on this instance. The worker subscribes only
    /// when every subscribed topic has partitions, so the group assigns them all at once; an
    /// instance that holds none, or none of a topic, because the group has more members than
    /// that topic has partitions, is ready with a note saying so.
    pub fn check(&self) -> Result<Option<String>, String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = held.as_ref() else {
            return Err("the consumer holds no assignment yet (joining its group or rebalancing)".into());
        };
        if held.is_empty() {
            return Ok(Some(
                "no partition assigned: the group has more members than partitions".into(),
            ));
        }
        let missing: Vec<&str> = self
            .topics
            .iter()
            .filter(|t| !held.contains(*t))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            Ok(None)
        } else {
            Ok(Some(format!(
                "no partition of {} assigned to this instance: the group gave them to other members",
                missing.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_thread_makes_the_process_unhealthy() {
        let health = Health::new();
        let writer = health.register("writer-1");
        let _poll = health.register("consumer-poll");
        health.beat();
        assert_eq!(health.check(), Ok(()));
        drop(writer);
        assert_eq!(health.check(), Err("threads stopped: writer-1".to_string()));
    }

    #[test]
    fn a_stalled_poll_loop_is_unhealthy() {
        let health = Health::new();
        health.poll_beat_ms.store(now_ms() - 10 * 60 * 1000, Ordering::SeqCst);
        assert!(health.check().unwrap_err().contains("not polled"));
    }

    #[test]
    fn ready_once_an_assignment_has_settled_with_a_note_when_a_topic_is_not_held() {
        let a = Assignment::new(&["bookings", "cancels"]);
        assert!(a.check().unwrap_err().contains("no assignment yet"));
        a.set(Some(["bookings".to_string()].into()));
        assert!(a.check().unwrap().unwrap().contains("no partition of cancels"));
        a.set(Some(["bookings".to_string(), "cancels".to_string()].into()));
        assert_eq!(a.check(), Ok(None));
        a.set(Some(BTreeSet::new()));
        assert!(a.check().unwrap().unwrap().contains("more members than partitions"));
        a.set(None);
        assert!(a.check().is_err());
    }
}
