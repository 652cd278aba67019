//! The synchronous HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process and its
//! threads are alive) and `/readyz` (the database answers and the consumer holds an assignment),
//! plus the client side used by `booking-worker healthcheck`.

use crate::database::{DbError, Pool};
use crate::metrics::Metrics;
use crate::repository;
use crate::shutdown::Shutdown;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// What `/readyz` looks at.
pub struct Readiness {
    pub pool: Pool,
    pub assigned: Arc<AtomicBool>,
}

impl Readiness {
    pub fn check(&self) -> Result<(), String> {
        let db = self
            .pool
            .get_timeout(Duration::from_secs(2))
            .map_err(DbError::from)
            .and_then(|mut c| repository::ping(&mut c));
        if let Err(e) = db {
            return Err(format!("database: {e}"));
        }
        if !self.assigned.load(Ordering::SeqCst) {
            return Err("consumer holds no partition".into());
        }
        Ok(())
    }
}

/// Serves the endpoint on `addr` from a thread named `http` until shutdown.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    log::info!(addr = addr.to_string(); "metrics and health endpoint listening");
    std::thread::Builder::new().name("http".into()).spawn(move || {
        while !shutdown.is_triggered() {
            match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(request)) => respond(request, &metrics, &health, &readiness),
                Ok(None) => {}
                Err(e) => {
                    log::warn!(error = e.to_string(); "http endpoint error");
                    shutdown.sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

fn respond(request: tiny_http::Request, metrics: &Metrics, health: &Health, readiness: &Readiness) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let (status, content_type, body) = match (request.method(), path.as_str()) {
        (tiny_http::Method::Get, "/metrics") => (200, "text/plain; version=0.0.4", metrics.render()),
        (tiny_http::Method::Get, "/healthz") => status_of(health.check()),
        (tiny_http::Method::Get, "/readyz") => status_of(readiness.check()),
        (tiny_http::Method::Get, _) => (404, "text/plain", "not found\n".into()),
        _ => (405, "text/plain", "method not allowed\n".into()),
    };
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()).expect("valid header");
    let response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(e) = request.respond(response) {
        log::debug!(error = e.to_string(); "http client went away");
    }
}

fn status_of(result: Result<(), String>) -> (u16, &'static str, String) {
    match result {
        Ok(()) => (200, "application/json", "{\"status\":\"ok\"}\n".into()),
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
    fn endpoint_serves_health_and_metrics() {
        let metrics = Metrics::new();
        let health = Health::new();
        let shutdown = Shutdown::new();
        let config = crate::config::Config::from_vars(&[("DB_PORT".into(), "1".into())]).unwrap();
        let readiness = Readiness {
            pool: crate::database::pool(&config.database),
            assigned: Arc::new(AtomicBool::new(true)),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let handle = serve(addr, metrics, Arc::clone(&health), readiness, shutdown.clone()).unwrap();
        let a = addr.to_string();
        let t = Duration::from_secs(5);
        assert_eq!(get_status(&a, "/healthz", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/metrics", t).unwrap(), 200);
        assert_eq!(get_status(&a, "/readyz", t).unwrap(), 503, "no database on port 1");
        assert_eq!(get_status(&a, "/nope", t).unwrap(), 404);
        let guard = health.register("writer-1");
        drop(guard);
        assert_eq!(get_status(&a, "/healthz", t).unwrap(), 503);
        shutdown.trigger();
        handle.join().unwrap();
    }
}
