//! The synchronous HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process and its
//! threads are alive) and `/readyz` (the database answers, the worker is not halted and the
//! consumer holds an assignment), plus the client side used by `booking-worker healthcheck`.
//!
//! It is a small HTTP/1.0 responder on one named thread: three GET paths for probes and a
//! scraper need no more, and every thread of the worker stays named and joined.

use crate::health::{Health, Readiness};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Serves the endpoint on `addr` from a thread named `http` until shutdown.
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
    // A blocking accept costs nothing while nobody asks; `Endpoint::stop` ends it.
    let handle = std::thread::Builder::new().name("http".into()).spawn(move || {
        for stream in listener.incoming() {
            if shutdown.is_triggered() {
                break;
            }
            match stream {
                Ok(stream) => {
                    if let Err(e) = answer(stream, &metrics, &health, &readiness) {
                        log::debug!(error = e.to_string(); "http client went away");
                    }
                }
                Err(e) => {
                    log::warn!(error = e.to_string(); "http endpoint error");
                    shutdown.sleep(ERROR_PAUSE);
                }
            }
        }
    })?;
    Ok(Endpoint { waker, handle })
}

/// The running `http` thread.
pub struct Endpoint {
    /// The listening socket, shared with the thread: shutting it down ends a blocked accept.
    waker: TcpListener,
    handle: JoinHandle<()>,
}

impl Endpoint {
    /// Stops the thread once shutdown has been triggered: shutting the listening socket down
    /// makes the blocked accept return, and the thread then sees the shutdown. No connection is
    /// needed, so no firewall rule or address can keep it blocked.
    pub fn stop(self) -> std::thread::Result<()> {
        // SAFETY: `shutdown` on a socket this value owns (a duplicate of the thread's listener,
        // open until this value drops) only changes the socket's state.
        let rc = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.waker), libc::SHUT_RD) };
        if rc != 0 {
            log::warn!(error = std::io::Error::last_os_error().to_string(); "could not stop the http thread");
        }
        self.handle.join()
    }
}

/// How long the endpoint waits after a failed accept (out of file descriptors, say).
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a client may take to send its whole request, and to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Reads one request and answers it; the connection is closed after the answer.
fn answer(mut stream: TcpStream, metrics: &Metrics, health: &Health, readiness: &Readiness) -> std::io::Result<()> {
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
    let (status, content_type, body) = respond(method, target, metrics, health, readiness);
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

fn respond(
    method: &str,
    target: &str,
    metrics: &Metrics,
    health: &Health,
    readiness: &Readiness,
) -> (u16, &'static str, String) {
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => status_of(health.check().map(|()| None)),
        ("GET", "/readyz") => status_of(readiness.check()),
        ("GET", _) => (404, "text/plain", "not found\n".into()),
        _ => (405, "text/plain", "method not allowed\n".into()),
    }
}

fn status_of(result: Result<Option<String>, String>) -> (u16, &'static str, String) {
    match result {
        Ok(None) => (200, "application/json", "{\"status\":\"ok\"}\n".into()),
        Ok(Some(note)) => (
            200,
            "application/json",
            format!("{}\n", serde_json::json!({"status": "ok", "note": note})),
        ),
        Err(reason) => (
            503,
            "application/json",
            format!("{}\n", serde_json::json!({"status": "unavailable", "reason": reason})),
        ),
    }
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

    #[test]
    fn endpoint_serves_health_and_metrics() {
        let metrics = Metrics::new();
        let health = Health::new();
        let shutdown = Shutdown::new();
        let config = crate::config::Config::from_vars(&[("DB_PORT".into(), "1".into())]).unwrap();
        let halt = Arc::new(crate::halt::Halt::new(25));
        let assignment = Assignment::new(&["t"]);
        assignment.set(Some(["t".to_string()].into()));
        let readiness = Readiness {
            database: {
                let pool = crate::database::Pool::new(&config.database).unwrap();
                Box::new(move || {
                    let mut conn = pool.get_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
                    crate::repository::ping(conn.client()).map_err(|e| e.to_string())
                })
            },
            assignment,
            halt: Arc::clone(&halt),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = serve(addr, metrics, Arc::clone(&health), readiness, shutdown.clone()).unwrap();
        let a = addr.to_string();
        let t = Duration::from_secs(5);
        assert_eq!(get_status(&a, "/healthz", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/metrics", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/readyz", t).unwrap(), 503, "no database on port 1");
        assert_eq!(get_status(&a, "/nope", t).unwrap(), 404);
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

    fn readiness_body(addr: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 503 "), "{out}");
        out
    }
}
