//! The synchronous HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process and its
//! threads are alive) and `/readyz` (the database answers, the worker is not halted, a broker
//! answers and the consumer holds an assignment), plus the client side used by
//! `booking-worker healthcheck`.
//!
//! A small HTTP/1.0 responder: three GET paths for probes and a scraper need no more. It answers
//! from memory only: readiness comes from [`crate::readiness`], whose probe asks the database on
//! its own thread, so no request waits for the database or the broker. [`HTTP_THREADS`] named
//! threads (`http-1`, …) take connections from one listening socket, and each connection has one
//! deadline (`CLIENT_TIMEOUT`), so a slow or stalled client holds one thread at most that long and
//! the others keep answering.

use crate::health::Health;
use crate::metrics::Metrics;
use crate::readiness::{Readiness, Report};
use crate::shutdown::Shutdown;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Threads that serve the endpoint.
pub const HTTP_THREADS: usize = 3;

/// What every request may read.
struct Served {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    readiness: Readiness,
}

/// Serves the endpoint on `addr` from the `http-N` threads until shutdown.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<Endpoint> {
    let listener = TcpListener::bind(addr)?;
    let waker = listener.try_clone()?;
    log::info!(addr = addr.to_string(); "metrics and health endpoint listening");
    let served = Arc::new(Served {
        metrics,
        health,
        readiness,
    });
    let mut handles = Vec::with_capacity(HTTP_THREADS);
    for n in 1..=HTTP_THREADS {
        let (served, own_shutdown) = (Arc::clone(&served), shutdown.clone());
        // A blocking accept costs nothing while nobody asks; `Endpoint::stop` ends it.
        let started = listener.try_clone().and_then(|own| {
            std::thread::Builder::new()
                .name(format!("http-{n}"))
                .spawn(move || accept_until_shutdown(&own, &served, &own_shutdown))
        });
        match started {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                Endpoint { waker, handles }.stop_after(&shutdown);
                return Err(e);
            }
        }
    }
    Ok(Endpoint { waker, handles })
}

fn accept_until_shutdown(listener: &TcpListener, served: &Served, shutdown: &Shutdown) {
    for stream in listener.incoming() {
        if shutdown.is_triggered() {
            break;
        }
        match stream {
            Ok(stream) => {
                if let Err(e) = answer(stream, served) {
                    log::debug!(error = e.to_string(); "http client went away");
                }
            }
            Err(e) => {
                log::warn!(error = e.to_string(); "http endpoint error");
                shutdown.sleep(ERROR_PAUSE);
            }
        }
    }
}

/// The running `http-N` threads.
pub struct Endpoint {
    /// The listening socket, shared with the threads: shutting it down ends a blocked accept.
    waker: TcpListener,
    handles: Vec<JoinHandle<()>>,
}

impl Endpoint {
    /// Stops the threads once shutdown has been triggered: shutting the listening socket down
    /// makes every blocked accept return, and each thread then sees the shutdown. No connection
    /// is needed, so no firewall rule or address can keep them blocked.
    pub fn stop(self) -> std::thread::Result<()> {
        // SAFETY: `shutdown` on a socket this value owns (a duplicate of the threads' listener,
        // open until this value drops) only changes the socket's state.
        let rc = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.waker), libc::SHUT_RD) };
        if rc != 0 {
            log::warn!(error = std::io::Error::last_os_error().to_string(); "could not stop the http threads");
        }
        let mut result = Ok(());
        for handle in self.handles {
            if let Err(panic) = handle.join() {
                result = Err(panic);
            }
        }
        result
    }

    /// Triggers `shutdown` and stops the threads started so far (a failed start).
    fn stop_after(self, shutdown: &Shutdown) {
        shutdown.trigger();
        if self.stop().is_err() {
            log::error!("an http thread panicked");
        }
    }
}

/// How long the endpoint waits after a failed accept (out of file descriptors, say).
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a client may take to send its whole request, and to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Reads one request and answers it; the connection is closed after the answer.
fn answer(mut stream: TcpStream, served: &Served) -> std::io::Result<()> {
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    // One deadline for the whole request: a client that trickles bytes does not hold the thread.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > MAX_REQUEST {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = respond(method, target, served);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    write!(
        stream,
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn respond(method: &str, target: &str, served: &Served) -> (u16, &'static str, String) {
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            served.readiness.export(&served.metrics);
            (200, "text/plain; version=0.0.4", served.metrics.render())
        }
        ("GET", "/healthz") => status_of(Report {
            verdict: served.health.check().map(|()| None),
            seen: Vec::new(),
        }),
        ("GET", "/readyz") => status_of(served.readiness.report()),
        ("GET", _) => (404, "text/plain", "not found\n".into()),
        _ => (405, "text/plain", "method not allowed\n".into()),
    }
}

/// A JSON body: `status`, the `note` or the `reason`, and what was last seen of each service.
fn status_of(report: Report) -> (u16, &'static str, String) {
    let (code, mut body) = match report.verdict {
        Ok(None) => (200, serde_json::json!({"status": "ok"})),
        Ok(Some(note)) => (200, serde_json::json!({"status": "ok", "note": note})),
        Err(reason) => (503, serde_json::json!({"status": "unavailable", "reason": reason})),
    };
    for (service, seen) in report.seen {
        body[service] = serde_json::Value::String(seen);
    }
    (code, "application/json", format!("{body}\n"))
}

/// `GET path` on a local endpoint; returns the status code. `0.0.0.0` means this host.
pub fn get_status(addr: &str, path: &str, timeout: Duration) -> std::io::Result<u16> {
    let target = addr.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
    let socket = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    let mut stream = TcpStream::connect_timeout(&socket, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut head)?;
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Assignment;
    use crate::readiness::{spawn_probe, BrokerLink, DatabaseAnswers};

    /// An endpoint on a free port whose database probe asks a port where nothing listens.
    fn endpoint(health: &Arc<Health>, halt: &Arc<crate::halt::Halt>, shutdown: &Shutdown) -> (Endpoint, String) {
        let config = crate::config::Config::from_vars(&[("DB_PORT".into(), "1".into())]).unwrap();
        let pool = crate::database::Pool::new(&config.database).unwrap();
        let answers = DatabaseAnswers::new();
        let probe = spawn_probe(
            Box::new(move || {
                let mut conn = pool.get_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
                crate::repository::ping(conn.client()).map_err(|e| e.to_string())
            }),
            Arc::clone(&answers),
            shutdown.clone(),
        )
        .unwrap();
        drop(probe);
        let assignment = Assignment::new(&["t"]);
        assignment.set(Some(["t".to_string()].into()));
        let readiness = Readiness {
            database: answers,
            broker: BrokerLink::new(None),
            assignment,
            halt: Arc::clone(halt),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = serve(addr, Metrics::new(), Arc::clone(health), readiness, shutdown.clone()).unwrap();
        (endpoint, addr.to_string())
    }

    #[test]
    fn endpoint_serves_health_and_metrics() {
        let health = Health::new();
        let shutdown = Shutdown::new();
        let halt = Arc::new(crate::halt::Halt::new(25));
        let (endpoint, a) = endpoint(&health, &halt, &shutdown);
        let t = Duration::from_secs(5);
        assert_eq!(get_status(&a, "/healthz", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/metrics", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/readyz", t).unwrap(), 503, "no database on port 1");
        assert_eq!(get_status(&a, "/nope", t).unwrap(), 404);
        let body = readiness_body(&a);
        assert!(body.contains("\"database\":") && body.contains("\"kafka\":"), "{body}");
        halt.enter(
            1,
            &crate::database::DbError::systemic(Some("42703"), "column \"payment_id\" does not exist"),
        );
        let body = readiness_body(&a);
        assert!(body.contains("SQLSTATE 42703"), "{body}");
        let guard = health.register("writer-1");
        drop(guard);
        assert_eq!(get_status(&a, "/healthz", t).unwrap(), 503);
        shutdown.trigger();
        endpoint.stop().unwrap();
    }

    #[test]
    fn stalled_clients_do_not_keep_others_waiting() {
        let health = Health::new();
        let shutdown = Shutdown::new();
        let halt = Arc::new(crate::halt::Halt::new(25));
        let (endpoint, a) = endpoint(&health, &halt, &shutdown);
        // More silent clients than threads: each holds a thread until its deadline.
        let stalled: Vec<TcpStream> = (0..HTTP_THREADS + 2).map(|_| TcpStream::connect(&a).unwrap()).collect();
        for _ in 0..3 {
            let asked = Instant::now();
            assert_eq!(get_status(&a, "/healthz", Duration::from_secs(10)).unwrap(), 200);
            assert!(
                asked.elapsed() < CLIENT_TIMEOUT * 3,
                "answered after {:?}, behind the stalled clients' deadlines",
                asked.elapsed()
            );
        }
        drop(stalled);
        shutdown.trigger();
        endpoint.stop().unwrap();
    }

    fn readiness_body(addr: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 503 "), "{out}");
        out
    }
}
