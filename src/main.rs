//! The `booking-worker` binary: parses the command line, installs the logger and the signal
//! handler, runs the worker and turns the result into an exit code. Only this file exits.

use booking_worker::config::{self, Config, VARIABLES};
use booking_worker::shutdown::Shutdown;
use booking_worker::{database, logger, repository};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Exit code when the configuration is invalid.
const EXIT_CONFIG: u8 = 2;
/// Exit code when the shutdown deadline passes.
const EXIT_DEADLINE: i32 = 124;
/// Exit code on a second SIGINT/SIGTERM.
const EXIT_SECOND_SIGNAL: i32 = 130;

#[derive(Parser)]
#[command(
    name = "booking-worker",
    version,
    about = "Consumes hotel booking and cancellation events from Kafka into PostgreSQL.",
    long_about = None,
    after_help = environment_help(),
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM (the default).
    Run,
    /// Apply the worker's own database migrations and exit.
    Migrate,
}

fn environment_help() -> String {
    let mut out = String::from("Configuration comes from the environment:\n");
    for v in VARIABLES {
        let default = if v.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", v.default)
        };
        out.push_str(&format!("  {:<30} {}{}\n", v.name, v.help, default));
    }
    out.push_str(
        "\nExit codes: 0 clean stop, 1 runtime failure, 2 invalid configuration, 3 database unusable,\n\
         4 Kafka client failure, 124 shutdown deadline passed, 130 second signal.",
    );
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match config::log_level_from_env() {
        Ok(level) => level,
        Err(e) => {
            eprintln!("booking-worker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logger::init(&level);
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            log::error!(variable = e.variable.as_str(); "invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Migrate => migrate(&config),
    }
}

fn run(config: Config) -> ExitCode {
    let shutdown = Shutdown::new();
    let finished = Shutdown::new();
    let deadline = config.shutdown_timeout;

    let on_signal = shutdown.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if on_signal.trigger() {
            log::info!(deadline_secs = deadline.as_secs(); "shutdown requested; draining");
        } else {
            log::warn!("second signal; exiting now (replay is idempotent)");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    }) {
        log::error!(error = e.to_string(); "could not install the signal handler");
        return ExitCode::FAILURE;
    }

    let watch_shutdown = shutdown.clone();
    let watch_finished = finished.clone();
    let watchdog = std::thread::Builder::new()
        .name("shutdown-deadline".into())
        .spawn(move || {
            while !watch_shutdown.sleep(Duration::from_secs(3600)) {}
            if !watch_finished.sleep(deadline) {
                log::error!(deadline_secs = deadline.as_secs(); "shutdown deadline passed; exiting now");
                std::process::exit(EXIT_DEADLINE);
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
            ExitCode::from(e.exit_code())
        }
    }
}

fn migrate(config: &Config) -> ExitCode {
    let pool = database::pool(&config.database);
    let result = pool
        .get()
        .map_err(database::DbError::from)
        .and_then(|mut conn| repository::migrate(&mut conn));
    match result {
        Ok(applied) => {
            log::info!(applied = format!("{applied:?}"); "migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!(error = e.to_string(); "migration failed");
            ExitCode::from(3)
        }
    }
}
