//! The service manager's notifications (systemd's `sd_notify` protocol): `READY=1` once the worker
//! is ready as `/readyz` means it, a `STATUS=` line whenever what it is doing changes (starting,
//! consuming, halted and why, not ready and why, draining), `STOPPING=1` at shutdown, and
//! `WATCHDOG=1` pings only while every beating thread of the pipeline goes round its loop.
//!
//! The protocol is a datagram of `KEY=value` lines to the Unix socket named by `NOTIFY_SOCKET` (a
//! path, or an abstract name written with a leading `@`); std's `UnixDatagram` sends it, no
//! library is linked. Without `NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`)
//! nothing of this runs: no thread is started, so a thread dump shows only threads that work.

use crate::database::remedy;
use crate::halt::{Cause, Halt};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The readiness verdict as `/readyz` gives it: `Ok` (with a note, perhaps) when ready, `Err` with
/// the reason when not. The notifier asks it at every turn, so it must answer from memory
/// ([`crate::readiness::Readiness::check`] does): a verdict that waited for the database would
/// hold up the watchdog's pings.
pub type ReadinessVerdict = Box<dyn Fn() -> Result<Option<String>, String> + Send>;

/// How often the notifier looks at the worker's state.
const TURN: Duration = Duration::from_millis(500);

/// What the notifier reads.
pub struct Sources {
    pub health: Arc<Health>,
    pub halt: Arc<Halt>,
    pub metrics: Arc<Metrics>,
    pub readiness: ReadinessVerdict,
}

/// The service manager's notification socket.
pub struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Socket {
    /// The socket `NOTIFY_SOCKET` names, or `None` when it is unset, empty or not a Unix address.
    pub fn from_env() -> Option<Socket> {
        Socket::at(&std::env::var_os("NOTIFY_SOCKET")?)
    }

    /// The socket at `name`: a path, or an abstract name when it starts with `@`.
    pub fn at(name: &OsStr) -> Option<Socket> {
        let addr = socket_address(name)?;
        let socket = UnixDatagram::unbound().ok()?;
        Some(Socket { socket, addr })
    }

    /// Sends one datagram of `KEY=value` lines. Each is sent to the address anew, so a service
    /// manager that re-executed itself (and bound its socket again) still hears it.
    pub fn send(&self, lines: &[String]) -> std::io::Result<()> {
        let message = lines.join("\n");
        self.socket.send_to_addr(message.as_bytes(), &self.addr).map(drop)
    }
}

/// The address `NOTIFY_SOCKET` names: a path, or an abstract name after a leading `@`.
fn socket_address(name: &OsStr) -> Option<SocketAddr> {
    let bytes = name.as_bytes();
    match bytes.first()? {
        b'@' => SocketAddr::from_abstract_name(&bytes[1..]).ok(),
        b'/' => SocketAddr::from_pathname(name).ok(),
        _ => None,
    }
}

/// The watchdog interval systemd asks for: `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or
/// names this process (it is meant for the main process only).
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => Some(Duration::from_micros(usec)),
        Some(Ok(pid)) if pid == own_pid => Some(Duration::from_micros(usec)),
        Some(_) => None,
    }
}

/// What the worker is doing, as its status line says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not ready yet since the start, and why.
    Starting(String),
    /// A systemic database error holds every writer.
    Halted(Cause),
    /// Ready, holding this many partitions.
    Consuming(i64),
    /// Was ready, is not now (the database does not answer, no broker has, a rebalance), and why.
    NotReady(String),
    /// Shutdown: the writers drain and the offsets are committed.
    Draining,
}

impl Phase {
    /// The phase from the halt, the readiness verdict, whether the worker was ready before, and
    /// the partitions held.
    pub fn of(
        halt: Option<Cause>,
        verdict: &Result<Option<String>, String>,
        was_ready: bool,
        partitions: i64,
    ) -> Phase {
        match (halt, verdict) {
            (Some(cause), _) => Phase::Halted(cause),
            (None, Err(reason)) if was_ready => Phase::NotReady(reason.clone()),
            (None, Err(reason)) => Phase::Starting(reason.clone()),
            (None, Ok(_)) => Phase::Consuming(partitions),
        }
    }

    /// The `STATUS=` text: one line.
    pub fn status(&self) -> String {
        let text = match self {
            Phase::Starting(reason) => format!("starting: {reason}"),
            Phase::NotReady(reason) => format!("not ready: {reason}"),
            Phase::Halted(cause) => format!("{} ({})", cause.reason(), remedy(cause.sqlstate.as_deref())),
            Phase::Consuming(0) => "consuming nothing: no partition assigned to this instance".to_string(),
            Phase::Consuming(1) => "consuming 1 partition".to_string(),
            Phase::Consuming(n) => format!("consuming {n} partitions"),
            Phase::Draining => "draining: shutting down".to_string(),
        };
        text.replace(['\n', '\r'], " ")
    }
}

/// Starts the `sd-notify` thread when `NOTIFY_SOCKET` is set; `None` otherwise. It runs until
/// shutdown, then sends `STOPPING=1` and ends.
pub fn spawn(sources: Sources, shutdown: Shutdown) -> std::io::Result<Option<JoinHandle<()>>> {
    let Some(socket) = Socket::from_env() else {
        return Ok(None);
    };
    spawn_on(socket, watchdog_from_env(), sources, shutdown).map(Some)
}

/// [`spawn`] on a given socket and watchdog interval.
pub fn spawn_on(
    socket: Socket,
    watchdog: Option<Duration>,
    sources: Sources,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let notifier = Notifier {
        socket,
        watchdog,
        sources,
        status: String::new(),
        ready: false,
        last_ping: None,
        stalled: None,
    };
    std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || notifier.run(&shutdown))
}

struct Notifier {
    socket: Socket,
    watchdog: Option<Duration>,
    sources: Sources,
    /// The last `STATUS=` text sent.
    status: String,
    /// `READY=1` was sent.
    ready: bool,
    last_ping: Option<Instant>,
    /// Why the pings stopped, while they do.
    stalled: Option<String>,
}

impl Notifier {
    fn run(mut self, shutdown: &Shutdown) {
        log::debug!(watchdog_ms = self.watchdog.map(|w| w.as_millis() as u64); "notifying the service manager");
        loop {
            self.report();
            self.watch();
            if shutdown.sleep(TURN) {
                break;
            }
        }
        self.send(vec![
            "STOPPING=1".to_string(),
            format!("STATUS={}", Phase::Draining.status()),
        ]);
    }

    /// Sends `READY=1` the first time the worker is ready, and the status line when it changed.
    fn report(&mut self) {
        let verdict = (self.sources.readiness)();
        let phase = Phase::of(
            self.sources.halt.cause(),
            &verdict,
            self.ready,
            self.sources.metrics.assigned(),
        );
        let mut lines = Vec::new();
        if verdict.is_ok() && !self.ready {
            self.ready = true;
            lines.push("READY=1".to_string());
        }
        let status = phase.status();
        if status != self.status {
            lines.push(format!("STATUS={status}"));
            self.status = status;
        }
        if !lines.is_empty() {
            self.send(lines);
        }
    }

    /// Pings the watchdog every half interval while no beating thread has stalled for a whole
    /// interval; logs when the pings stop and when they go on again.
    fn watch(&mut self) {
        let Some(interval) = self.watchdog else { return };
        match self.sources.health.stalled(interval) {
            Some(why) => {
                if self.stalled.is_none() {
                    log::error!(stalled = why.as_str(), watchdog_secs = interval.as_secs();
                        "a thread of the pipeline is stuck; watchdog pings stopped, the service manager restarts the worker");
                }
                self.stalled = Some(why);
            }
            None => {
                if self.stalled.take().is_some() {
                    log::warn!("every thread of the pipeline goes round again; watchdog pings resumed");
                }
                if self.last_ping.is_none_or(|t| t.elapsed() >= interval / 2) {
                    self.last_ping = Some(Instant::now());
                    self.send(vec!["WATCHDOG=1".to_string()]);
                }
            }
        }
    }

    fn send(&self, lines: Vec<String>) {
        if let Err(e) = self.socket.send(&lines) {
            log::warn!(error = e.to_string(), message = lines.join(" "); "could not notify the service manager");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::database::{DbError, ErrorClass};

    fn cause(code: &str, message: &str) -> Cause {
        Cause {
            sqlstate: Some(code.into()),
            message: message.into(),
            since: Instant::now(),
        }
    }

    #[test]
    fn the_status_line_says_what_the_worker_is_doing() {
        let not_ready: Result<Option<String>, String> = Err("database: connection refused".into());
        let ready: Result<Option<String>, String> = Ok(None);
        let starting = Phase::of(None, &not_ready, false, 0);
        assert_eq!(starting.status(), "starting: database: connection refused");
        assert_eq!(
            Phase::of(None, &not_ready, true, 8).status(),
            "not ready: database: connection refused"
        );
        assert_eq!(Phase::of(None, &ready, false, 8).status(), "consuming 8 partitions");
        assert_eq!(Phase::of(None, &ready, true, 1).status(), "consuming 1 partition");
        let alone = Ok(Some("no partition assigned".to_string()));
        assert_eq!(
            Phase::of(None, &alone, true, 0).status(),
            "consuming nothing: no partition assigned to this instance"
        );
        let halt = || Some(cause("42501", "permission denied\nfor table bookings"));
        let halted = Phase::of(halt(), &Err("halted".into()), true, 8);
        assert_eq!(
            halted.status(),
            format!(
                "halted: SQLSTATE 42501: permission denied for table bookings ({})",
                remedy(Some("42501"))
            )
        );
        assert!(
            halted.status().contains("grant it what the README"),
            "{}",
            halted.status()
        );
        assert_eq!(
            Phase::of(halt(), &not_ready, false, 0).status(),
            halted.status(),
            "the halt is named first"
        );
        let halted_at_start = Phase::of(Some(cause("42501", "denied")), &not_ready, false, 0);
        assert!(halted_at_start.status().starts_with("halted: SQLSTATE 42501: denied ("));
        assert_eq!(Phase::Draining.status(), "draining: shutting down");
    }

    #[test]
    fn the_watchdog_is_for_the_main_process_only() {
        let second = Some(Duration::from_secs(1));
        assert_eq!(watchdog_interval(Some("1000000"), None, 42), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("42"), 42), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("41"), 42), None);
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None);
    }

    #[test]
    fn without_a_notify_socket_nothing_runs() {
        assert!(socket_address(OsStr::new("")).is_none());
        assert!(socket_address(OsStr::new("relative/path")).is_none());
        assert!(socket_address(OsStr::new("@abstract")).is_some());
        assert!(socket_address(OsStr::new("/run/systemd/notify")).is_some());
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            let sources = sources(Arc::new(Halt::new(25)), Box::new(|| Ok(None)));
            let handle = spawn(sources, Shutdown::new()).unwrap();
            assert!(handle.is_none(), "no thread without NOTIFY_SOCKET");
        }
    }

    fn sources(halt: Arc<Halt>, readiness: ReadinessVerdict) -> Sources {
        let metrics = Metrics::new();
        metrics.set_assigned(4);
        Sources {
            health: Health::new(),
            halt,
            metrics,
            readiness,
        }
    }

    /// A socket in a directory of its own, read with a timeout.
    struct Listener {
        socket: UnixDatagram,
        path: std::path::PathBuf,
    }

    impl Listener {
        fn new(tag: &str) -> Listener {
            let dir = std::env::temp_dir().join(format!("bw-notify-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Listener { socket, path }
        }

        /// The next datagram, or `None` after the read timeout.
        fn next(&self) -> Option<String> {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).to_string())
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
        }
    }

    #[test]
    fn the_service_manager_hears_ready_status_and_stopping() {
        let listener = Listener::new("ready");
        let halt = Arc::new(Halt::new(25));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let verdict = {
            let ready = Arc::clone(&ready);
            Box::new(move || match ready.load(std::sync::atomic::Ordering::SeqCst) {
                true => Ok(None),
                false => Err("the consumer holds no assignment yet".to_string()),
            })
        };
        let shutdown = Shutdown::new();
        let socket = Socket::at(listener.path.as_os_str()).unwrap();
        let handle = spawn_on(socket, None, sources(Arc::clone(&halt), verdict), shutdown.clone()).unwrap();
        assert_eq!(handle.thread().name(), Some("sd-notify"));
        assert_eq!(
            listener.next().unwrap(),
            "STATUS=starting: the consumer holds no assignment yet"
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(listener.next().unwrap(), "READY=1\nSTATUS=consuming 4 partitions");
        let error = DbError {
            class: ErrorClass::Systemic,
            sqlstate: Some("42501".into()),
            message: "permission denied for table bookings".into(),
        };
        halt.enter(1, &error);
        let halted = listener.next().unwrap();
        assert!(
            halted.starts_with("STATUS=halted: SQLSTATE 42501: permission denied for table bookings ("),
            "{halted}"
        );
        halt.leave(1);
        assert_eq!(listener.next().unwrap(), "STATUS=consuming 4 partitions");
        ready.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            listener.next().unwrap(),
            "STATUS=not ready: the consumer holds no assignment yet"
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            listener.next().unwrap(),
            "STATUS=consuming 4 partitions",
            "READY=1 only once"
        );
        shutdown.trigger();
        assert_eq!(listener.next().unwrap(), "STOPPING=1\nSTATUS=draining: shutting down");
        handle.join().unwrap();
        listener
            .socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        assert_eq!(listener.next(), None, "READY=1 and each status were sent once");
    }

    /// The datagrams that arrive within `window`.
    fn heard_within(listener: &Listener, window: Duration) -> Vec<String> {
        let until = Instant::now() + window;
        let mut heard = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            listener
                .socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match listener.next() {
                Some(m) => heard.push(m),
                None => break,
            }
        }
        heard
    }

    #[test]
    fn the_watchdog_is_pinged_only_while_every_beating_thread_goes_round() {
        let listener = Listener::new("watchdog");
        let s = sources(Arc::new(Halt::new(25)), Box::new(|| Ok(None)));
        let health = Arc::clone(&s.health);
        let writer = health.register("writer-1");
        writer.beat();
        let shutdown = Shutdown::new();
        let socket = Socket::at(listener.path.as_os_str()).unwrap();
        let interval = Duration::from_millis(1500);
        let handle = spawn_on(socket, Some(interval), s, shutdown.clone()).unwrap();
        let pings = |heard: &[String]| heard.iter().filter(|m| *m == "WATCHDOG=1").count();
        let first = heard_within(&listener, Duration::from_millis(1000));
        assert!(pings(&first) >= 1, "a beating writer: pinged ({first:?})");
        // The writer stops beating: once it has been silent for the interval, the pings stop.
        std::thread::sleep(interval);
        heard_within(&listener, Duration::from_millis(10));
        let wedged = heard_within(&listener, Duration::from_millis(2000));
        assert_eq!(pings(&wedged), 0, "a silent writer: no ping ({wedged:?})");
        writer.beat();
        let again = heard_within(&listener, Duration::from_millis(1000));
        assert!(pings(&again) >= 1, "beating again: pinged again ({again:?})");
        shutdown.trigger();
        handle.join().unwrap();
    }
}
