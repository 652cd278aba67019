//! Services of a test's own, for the tests that stop or freeze them: a single-node broker and a
//! PostgreSQL cluster on free ports from the project's scripts, and SIGSTOP/SIGCONT of their
//! processes, as a hung server or a network partition looks to the worker.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A single-node broker of this test's own, from scripts/kafka.sh on free ports, that the test
/// can stop and start again with its data kept. Stopped, and its data deleted, when dropped.
pub struct OwnBroker {
    port: u16,
    controller_port: u16,
    state_dir: PathBuf,
    /// The bootstrap address of this broker.
    pub brokers: String,
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        let port = free_port_below_ephemeral(&[]);
        let controller_port = free_port_below_ephemeral(&[port]);
        let state_dir = std::env::temp_dir().join(super::unique("reliability-kafka"));
        let broker = OwnBroker {
            port,
            controller_port,
            state_dir,
            brokers: format!("127.0.0.1:{port}"),
        };
        broker.kafka("start", false);
        broker
    }

    /// Runs `scripts/kafka.sh command` for this broker; `keep_data` keeps its records on a stop.
    pub fn kafka(&self, command: &str, keep_data: bool) {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg(command)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("KAFKA_STATE_DIR", &self.state_dir)
            .env("KAFKA_KEEP_DATA", if keep_data { "1" } else { "0" })
            .env_remove("KAFKA_DATA_DIR")
            .output()
            .expect("run scripts/kafka.sh");
        assert!(
            out.status.success(),
            "scripts/kafka.sh {command} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg("stop")
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_STATE_DIR", &self.state_dir)
            .env("KAFKA_KEEP_DATA", "0")
            .output();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A free port in 20000-32199, below Linux's ephemeral range, so that no outgoing connection
/// takes it while a stopped broker is away.
fn free_port_below_ephemeral(avoid: &[u16]) -> u16 {
    let mut rng = fastrand::Rng::new();
    for _ in 0..500 {
        let port = rng.u16(20000..32200);
        if avoid.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            return port;
        }
    }
    panic!("no free port in 20000-32199");
}

impl OwnBroker {
    /// The broker's process id, from scripts/kafka.sh's state file.
    pub fn pid(&self) -> u32 {
        let state = std::fs::read_to_string(self.state_dir.join("state")).expect("the broker's state file");
        state
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse().ok())
            .expect("the broker's pid in its state file")
    }
}

/// A throwaway PostgreSQL cluster of this test's own, from scripts/postgres.sh on a free port.
/// Stopped, and its files deleted, when dropped.
pub struct OwnPostgres {
    state_dir: PathBuf,
    pub port: u16,
}

impl OwnPostgres {
    pub fn start() -> OwnPostgres {
        let pg = OwnPostgres {
            state_dir: std::env::temp_dir().join(super::unique("own-pg")),
            port: free_port_below_ephemeral(&[]),
        };
        pg.postgres("start");
        pg
    }

    fn postgres(&self, command: &str) -> std::process::Output {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh"))
            .arg(command)
            .env("PG_STATE_DIR", &self.state_dir)
            .env("DB_HOST", "127.0.0.1")
            .env("DB_PORT", self.port.to_string())
            .env("PG_PORT", self.port.to_string())
            .env("DB_USER", "postgres")
            .env("DB_PASSWORD", "postgres")
            .env("DB_NAME", "booking_management")
            .output()
            .expect("run scripts/postgres.sh");
        assert!(
            out.status.success() || command == "stop",
            "scripts/postgres.sh {command} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// These services with this cluster as the database.
    pub fn services(&self, around: &super::Services) -> super::Services {
        super::Services {
            db_host: "127.0.0.1".into(),
            db_port: self.port,
            db_user: "postgres".into(),
            db_password: "postgres".into(),
            db_name: "booking_management".into(),
            ..around.clone()
        }
    }

    /// The postmaster and every process it started: all of the cluster's processes (none when
    /// it is not running).
    pub fn pids(&self) -> Vec<u32> {
        let postmaster = std::fs::read_to_string(self.state_dir.join("state"))
            .ok()
            .and_then(|state| Some(PathBuf::from(state.lines().find_map(|l| l.strip_prefix("data_dir="))?)))
            .and_then(|data_dir| std::fs::read_to_string(data_dir.join("postmaster.pid")).ok())
            .and_then(|pid_file| pid_file.lines().next()?.trim().parse::<u32>().ok());
        let Some(postmaster) = postmaster else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        pids
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // A frozen cluster cannot stop.
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
        }
        self.postgres("stop");
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so read after ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.to_string()))
                .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

/// Processes stopped with SIGSTOP, as a hung server: they go on (SIGCONT) when this is dropped,
/// also when a test fails meanwhile.
pub struct Frozen(Vec<u32>);

impl Frozen {
    /// Stops every process of `pids` that still exists: a server's child may exit between being
    /// listed and being stopped, and a process that is gone needs no stopping. The ones stopped go
    /// on when this is dropped, also if a later one cannot be stopped.
    pub fn new(pids: Vec<u32>) -> Frozen {
        assert!(!pids.is_empty(), "no process to freeze");
        let mut frozen = Frozen(Vec::with_capacity(pids.len()));
        for pid in pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let stopped = Command::new("kill").args(["-STOP", &pid.to_string()]).status();
            if stopped.is_ok_and(|s| s.success()) {
                frozen.0.push(pid);
            } else {
                assert!(!Path::new(&format!("/proc/{pid}")).exists(), "kill -STOP {pid} failed");
            }
        }
        assert!(!frozen.0.is_empty(), "every process to freeze was gone");
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
        }
    }
}

/// Sends `kill -SIGNAL pid` (STOP, CONT, ...).
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}
