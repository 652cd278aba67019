//! Readiness without waiting: the `ready-probe` thread asks the database on its own schedule and
//! keeps the last answer with its time, the Kafka client reports what it last heard from its
//! brokers, and `/readyz` (or the systemd notifier) combines these with the halt and the
//! assignment from memory. No request ever waits for the database or the broker.

use crate::halt::Halt;
use crate::health::Assignment;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the probe rests between two questions to the database.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a question may go unanswered before the database counts as not answering. It also
/// bounds the probe's wait for a pooled connection.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Asks the database whether it answers: `Err` says what is wrong. Runs on the probe thread only.
pub type DatabaseProbe = Box<dyn FnMut() -> Result<(), String> + Send>;

/// The database's last answer to the probe.
#[derive(Debug, Clone)]
enum Answer {
    Yes { took: Duration },
    No(String),
}

#[derive(Debug, Default)]
struct Seen {
    last: Option<(Answer, Instant)>,
    /// When the question now pending was asked.
    asking_since: Option<Instant>,
}

/// What the probe last heard from the database, and whether a question is pending.
#[derive(Debug, Default)]
pub struct DatabaseAnswers {
    seen: Mutex<Seen>,
}

impl DatabaseAnswers {
    pub fn new() -> Arc<DatabaseAnswers> {
        Arc::new(DatabaseAnswers::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn asking(&self, at: Instant) {
        self.lock().asking_since = Some(at);
    }

    fn answered(&self, answer: Answer, at: Instant) {
        let mut seen = self.lock();
        seen.asking_since = None;
        seen.last = Some((answer, at));
    }

    /// What was last seen (`Ok`), or why the database counts as not answering (`Err`), at `now`.
    pub fn check(&self, now: Instant) -> Result<String, String> {
        let seen = self.lock();
        if let Some(since) = seen.asking_since {
            let waited = now.saturating_duration_since(since);
            if waited > PROBE_DEADLINE {
                return Err(format!(
                    "database: no answer for {} (asked {} ago; the probe's deadline is {})",
                    secs(waited),
                    secs(waited),
                    secs(PROBE_DEADLINE)
                ));
            }
        }
        match &seen.last {
            None => Err("database: not answered yet (the first probe is under way)".into()),
            Some((Answer::Yes { took }, at)) => Ok(format!(
                "answered {} ago in {} ms",
                secs(now.saturating_duration_since(*at)),
                took.as_millis()
            )),
            Some((Answer::No(error), at)) => Err(format!(
                "database: {error} ({} ago)",
                secs(now.saturating_duration_since(*at))
            )),
        }
    }
}

/// Starts the `ready-probe` thread: it asks `probe` every [`PROBE_EVERY`] until shutdown and keeps
/// each answer in `answers`. A question the database never answers holds only this thread, and
/// [`DatabaseAnswers::check`] reports it once it passes [`PROBE_DEADLINE`].
pub fn spawn_probe(
    mut probe: DatabaseProbe,
    answers: Arc<DatabaseAnswers>,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ready-probe".into())
        .spawn(move || loop {
            let asked = Instant::now();
            answers.asking(asked);
            let answer = match probe() {
                Ok(()) => Answer::Yes { took: asked.elapsed() },
                Err(error) => Answer::No(error),
            };
            answers.answered(answer, Instant::now());
            if shutdown.sleep(PROBE_EVERY) {
                break;
            }
        })
}

/// What the Kafka client last said of its brokers: how many are up, and when one last answered.
/// The client's statistics and its error callback write it; readiness and the metrics read it.
#[derive(Debug)]
pub struct BrokerLink {
    /// Brokers up at the last statistics; -1 before the first.
    up: AtomicI64,
    /// When a broker last answered; the link's creation until one has.
    last_contact: Mutex<Instant>,
    /// How long without an answer makes the worker not ready; `None`: never (no statistics).
    unreachable_after: Option<Duration>,
}

impl BrokerLink {
    pub fn new(unreachable_after: Option<Duration>) -> Arc<BrokerLink> {
        Arc::new(BrokerLink {
            up: AtomicI64::new(-1),
            last_contact: Mutex::new(Instant::now()),
            unreachable_after,
        })
    }

    /// A statistics report at `now`: `up` brokers usable, and the shortest time since one of them
    /// last answered (`None` when none has).
    pub fn observe(&self, up: usize, idle: Option<Duration>, now: Instant) {
        self.up.store(up as i64, Ordering::SeqCst);
        if let Some(at) = idle.and_then(|idle| now.checked_sub(idle)) {
            let mut last = self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
            *last = (*last).max(at);
        }
    }

    /// The client reported that every broker is down.
    pub fn all_down(&self) {
        self.up.store(0, Ordering::SeqCst);
    }

    /// Brokers up at the last report (0 before the first).
    pub fn brokers_up(&self) -> i64 {
        self.up.load(Ordering::SeqCst).max(0)
    }

    /// How long no broker has answered, at `now`.
    pub fn silence(&self, now: Instant) -> Duration {
        let last = *self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
        now.saturating_duration_since(last)
    }

    /// What was last heard (`Ok`), or why Kafka counts as unreachable (`Err`), at `now`.
    pub fn check(&self, now: Instant) -> Result<String, String> {
        let silence = self.silence(now);
        let up = self.up.load(Ordering::SeqCst);
        let heard = if up < 0 {
            format!("no statistics yet; started {} ago", secs(silence))
        } else {
            format!("a broker answered {} ago; {up} up", secs(silence))
        };
        match self.unreachable_after {
            Some(limit) if silence >= limit => Err(format!(
                "kafka: no broker has answered for {} (KAFKA_UNREACHABLE_READY_SECS={})",
                secs(silence),
                limit.as_secs()
            )),
            _ => Ok(heard),
        }
    }
}

/// What `/readyz` looks at; every part is read from memory.
pub struct Readiness {
    pub database: Arc<DatabaseAnswers>,
    pub broker: Arc<BrokerLink>,
    pub assignment: Arc<Assignment>,
    pub halt: Arc<Halt>,
}

/// Readiness at one moment: the verdict, and what was last seen of each service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Ready (with a note, perhaps), or why not.
    pub verdict: Result<Option<String>, String>,
    /// What the database and the broker last said, and when.
    pub seen: Vec<(&'static str, String)>,
}

impl Readiness {
    /// Ready when the worker is not halted, the database answered the last probe in time, a
    /// broker answered within `KAFKA_UNREACHABLE_READY_SECS`, and the group has assigned it
    /// partitions of every subscribed topic. The halt is named first: it is the cause to fix.
    pub fn report(&self) -> Report {
        let now = Instant::now();
        let database = self.database.check(now);
        let kafka = self.broker.check(now);
        let seen = vec![
            ("database", database.clone().unwrap_or_else(|e| e)),
            ("kafka", kafka.clone().unwrap_or_else(|e| e)),
        ];
        let verdict = match (self.halt.cause(), database, kafka) {
            (Some(cause), _, _) => Err(cause.reason()),
            (None, Err(e), _) | (None, Ok(_), Err(e)) => Err(e),
            (None, Ok(_), Ok(_)) => self.assignment.check(),
        };
        Report { verdict, seen }
    }

    /// The verdict of [`Readiness::report`].
    pub fn check(&self) -> Result<Option<String>, String> {
        self.report().verdict
    }

    /// Sets the gauges that mirror readiness, for a scrape.
    pub fn export(&self, metrics: &Metrics) {
        let ready = self.check().is_ok();
        let silence = self.broker.silence(Instant::now());
        metrics.set_readiness(ready, self.broker.brokers_up(), silence.as_secs_f64());
    }
}

/// A duration as people read it in a status line: `0.4 s`, `12.0 s`.
fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readiness(unreachable_after: Option<Duration>) -> Readiness {
        let assignment = Assignment::new(&["t"]);
        assignment.set(Some(["t".to_string()].into()));
        Readiness {
            database: DatabaseAnswers::new(),
            broker: BrokerLink::new(unreachable_after),
            assignment,
            halt: Arc::new(Halt::new(25)),
        }
    }

    #[test]
    fn the_database_counts_once_it_has_answered_and_until_a_question_passes_its_deadline() {
        let answers = DatabaseAnswers::new();
        let t0 = Instant::now();
        assert!(answers.check(t0).unwrap_err().contains("first probe"));
        answers.asking(t0);
        answers.answered(
            Answer::Yes {
                took: Duration::from_millis(3),
            },
            t0,
        );
        assert_eq!(
            answers.check(t0 + Duration::from_millis(400)).unwrap(),
            "answered 0.4 s ago in 3 ms"
        );
        answers.asking(t0 + Duration::from_secs(1));
        assert!(
            answers.check(t0 + Duration::from_secs(2)).is_ok(),
            "a pending question within its deadline"
        );
        let late = answers.check(t0 + Duration::from_secs(4)).unwrap_err();
        assert!(late.contains("no answer for 3.0 s"), "{late}");
        answers.answered(Answer::No("connection refused".into()), t0 + Duration::from_secs(5));
        let refused = answers.check(t0 + Duration::from_secs(5)).unwrap_err();
        assert_eq!(refused, "database: connection refused (0.0 s ago)");
    }

    #[test]
    fn kafka_counts_as_unreachable_once_no_broker_has_answered_for_the_limit() {
        let link = BrokerLink::new(Some(Duration::from_secs(60)));
        let t0 = Instant::now();
        assert!(link.check(t0).unwrap().contains("no statistics yet"));
        link.observe(1, Some(Duration::from_millis(200)), t0);
        assert_eq!(link.brokers_up(), 1);
        assert!(link.check(t0 + Duration::from_secs(59)).is_ok());
        let err = link.check(t0 + Duration::from_secs(61)).unwrap_err();
        assert!(err.contains("KAFKA_UNREACHABLE_READY_SECS=60"), "{err}");
        // A report that no broker has answered lately does not move the last contact.
        link.observe(0, None, t0 + Duration::from_secs(61));
        assert!(link.check(t0 + Duration::from_secs(61)).is_err());
        link.observe(1, Some(Duration::ZERO), t0 + Duration::from_secs(62));
        assert!(link.check(t0 + Duration::from_secs(62)).is_ok());
        link.all_down();
        assert_eq!(link.brokers_up(), 0);
    }

    #[test]
    fn without_statistics_kafka_never_makes_the_worker_unready() {
        let link = BrokerLink::new(None);
        assert!(link.check(Instant::now() + Duration::from_secs(86_400)).is_ok());
    }

    #[test]
    fn the_halt_is_named_first_then_the_database_then_kafka() {
        let r = readiness(Some(Duration::ZERO));
        let report = r.report();
        assert!(report.verdict.unwrap_err().contains("database"), "the database first");
        r.database
            .answered(Answer::Yes { took: Duration::ZERO }, Instant::now());
        assert!(r.check().unwrap_err().contains("kafka"));
        r.halt.enter(
            1,
            &crate::database::DbError::systemic(Some("42501"), "permission denied"),
        );
        assert!(r.check().unwrap_err().contains("SQLSTATE 42501"));
        let ready = readiness(None);
        ready
            .database
            .answered(Answer::Yes { took: Duration::ZERO }, Instant::now());
        let report = ready.report();
        assert_eq!(report.verdict, Ok(None));
        assert_eq!(report.seen[0].0, "database");
        assert!(report.seen[1].1.contains("no statistics yet"), "{:?}", report.seen);
    }
}
