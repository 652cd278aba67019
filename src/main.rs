//! The `booking-worker` binary: parses the command line, installs the logger and the signal
//! handler, runs the chosen command and turns its result into an exit code. Only this file exits.

use booking_worker::commands::{self, ExitStatus, Selection};
use booking_worker::config::{self, Config, ConfigError, Settings};
use booking_worker::logger;
use booking_worker::shutdown::{Latch, Shutdown};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Exits the process at once with `status`.
fn exit_now(status: ExitStatus) -> ! {
    std::process::exit(i32::from(status.code()))
}

#[derive(Parser)]
#[command(
    name = "booking-worker",
    version,
    about = "Consumes hotel booking and cancellation events from Kafka into PostgreSQL.",
    next_help_heading = "Settings (each from its environment variable, or the flag)",
    after_help = after_help(),
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM (the default command).
    Run,
    /// Check the configuration, the database, the broker and the topics; the exit code says which
    /// failed first (see Exit codes).
    Check,
    /// Apply the worker's own database migrations, online, and exit.
    Migrate,
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Exit 0 if the running worker's /healthz answers 200, else 1 (for Docker's HEALTHCHECK).
    Healthcheck,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Print dead letters as JSON lines, oldest first.
    List {
        /// Only this dead letter.
        #[arg(long)]
        id: Option<i64>,
        /// Only dead letters with this reason code (e.g. unknown_user).
        #[arg(long)]
        reason: Option<String>,
        /// Also those already replayed.
        #[arg(long)]
        include_replayed: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Run dead letters through the same handling again; those that now succeed are marked
    /// replayed.
    Replay {
        /// The dead letter to replay.
        #[arg(long, required_unless_present = "reason", conflicts_with = "reason")]
        id: Option<i64>,
        /// Replay every dead letter with this reason code that has not been replayed.
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
    },
}

/// What `--help` says after the settings.
fn after_help() -> String {
    format!(
        "KAFKA_PROP_<NAME>: any librdkafka property, e.g. KAFKA_PROP_SECURITY_PROTOCOL=ssl sets
security.protocol (underscores become dots); it overrides the worker's own settings, except those
the worker relies on (refused with exit code {}).

{}",
        ExitStatus::Config.code(),
        ExitStatus::help()
    )
}

/// Parses the command line and the settings' environment variables. A refused setting is logged
/// as one JSON line naming the variable and exits 2; other command-line errors, `--help` and
/// `--version` are clap's own (usage errors exit 2 too).
fn parse_command_line() -> Result<Cli, ConfigError> {
    let parsed = config::hide_values(Cli::command())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    parsed.map_err(|e| ConfigError::from_clap(&e).unwrap_or_else(|| e.exit()))
}

/// Whether the command line asks for `dead-letters list`, whose stdout carries data: its log
/// lines go to stderr, also when the command line cannot be parsed.
fn lists_data() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).any(|w| w[0] == "dead-letters" && w[1] == "list")
}

/// Makes a panic in any thread end the process at once with [`ExitStatus::Panic`], after one JSON line
/// naming the thread. A worker with a dead thread would look alive while a partition or a writer
/// stood still; a restart by systemd or Docker resumes from the committed offsets, and replay is
/// idempotent. A hook rather than `panic = "abort"`: it logs through the JSON logger, and it ends
/// the process the same way whether the panic happened on a worker thread or inside a librdkafka
/// callback.
fn exit_on_panic() {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::panic::set_hook(Box::new(|info| {
        // The first panic speaks for the process; a thread that panics while it is ending waits
        // for the exit, so that the log has one line and one cause.
        if PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // A panic while a writer's lines are held back for one write: they go out first.
        logger::release_held();
        log::error!(thread = thread.as_str(), panic = message.as_str(), location = location.as_str();
            "a thread panicked; exiting so that the service manager restarts the worker (replay is idempotent)");
        log::logger().flush();
        let _ = std::io::Write::flush(&mut std::io::stdout());
        // SAFETY: `_exit` ends the process at once, without running destructors or atexit
        // handlers; nothing is left to clean up that the restart does not redo.
        unsafe { libc::_exit(i32::from(ExitStatus::Panic.code())) }
    }));
}

fn main() -> ExitCode {
    booking_worker::allocator::use_one_arena();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(e) => {
            logger::init("info", lists_data());
            log::error!(variable = e.variable.as_str(); "invalid configuration: {e}");
            return ExitStatus::Config.into();
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    let data_on_stdout = matches!(command, Command::DeadLetters(DeadLetters::List { .. }));
    logger::init(&cli.settings.log_level, data_on_stdout);
    exit_on_panic();
    let config = match Config::from_settings(&cli.settings) {
        Ok(config) => config,
        Err(e) => {
            log::error!(variable = e.variable.as_str(); "invalid configuration: {e}");
            return ExitStatus::Config.into();
        }
    };
    let status = match command {
        Command::Run => return run(config),
        Command::Check => commands::check(&config),
        Command::Migrate => commands::migrate(&config),
        Command::Healthcheck => commands::healthcheck(&config),
        Command::DeadLetters(DeadLetters::List {
            id,
            reason,
            include_replayed,
            limit,
        }) => {
            let selection = Selection {
                id,
                reason,
                include_replayed,
                limit,
            };
            commands::list_dead_letters(&config, &selection, &mut std::io::stdout().lock())
        }
        Command::DeadLetters(DeadLetters::Replay { id, reason, limit }) => {
            let selection = Selection {
                id,
                reason,
                include_replayed: false,
                limit,
            };
            commands::replay_dead_letters(&config, &selection)
        }
    };
    status.into()
}

fn run(config: Config) -> ExitCode {
    let shutdown = Shutdown::new();
    let finished = Latch::new();
    let deadline = config.shutdown_timeout;

    let on_signal = shutdown.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if on_signal.trigger() {
            log::info!(deadline_secs = deadline.as_secs(); "shutdown requested; draining");
        } else {
            log::warn!("second signal; exiting now (replay is idempotent)");
            exit_now(ExitStatus::SecondSignal);
        }
    }) {
        log::error!(error = e.to_string(); "could not install the signal handler");
        return ExitStatus::Failure.into();
    }

    let watch_shutdown = shutdown.clone();
    let watch_finished = finished.clone();
    let watchdog = std::thread::Builder::new()
        .name("shutdown-timer".into())
        .spawn(move || {
            while !watch_shutdown.sleep(Duration::from_secs(3600)) {}
            if !watch_finished.sleep(deadline) {
                log::error!(deadline_secs = deadline.as_secs(); "shutdown deadline passed; exiting now");
                exit_now(ExitStatus::Deadline);
            }
        });

    let result = booking_worker::run(config, shutdown.clone());
    finished.trigger();
    shutdown.trigger();
    if let Ok(handle) = watchdog {
        let _ = handle.join();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(error = e.to_string(); "booking-worker failed");
            e.exit_status().into()
        }
    }
}
