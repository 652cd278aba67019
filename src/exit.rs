//! The process's exit codes, declared once: `main` exits with them, `--help` lists them, and the
//! README's table is checked against them.

/// How the process ends, as the shell and the service manager see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Ok,
    Failure,
    Config,
    Database,
    Kafka,
    TopicsMissing,
    StillFailing,
    MigrationRefused,
    Panic,
    Deadline,
    SecondSignal,
}

impl ExitStatus {
    /// Every status, in the order of their codes.
    pub const ALL: [ExitStatus; 11] = [
        ExitStatus::Ok,
        ExitStatus::Failure,
        ExitStatus::Config,
        ExitStatus::Database,
        ExitStatus::Kafka,
        ExitStatus::TopicsMissing,
        ExitStatus::StillFailing,
        ExitStatus::MigrationRefused,
        ExitStatus::Panic,
        ExitStatus::Deadline,
        ExitStatus::SecondSignal,
    ];

    /// The code, its name and what it means.
    fn describe(self) -> (u8, &'static str, &'static str) {
        match self {
            ExitStatus::Ok => (0, "ok", "success, or a clean stop"),
            ExitStatus::Failure => (1, "failure", "runtime failure; healthcheck: not healthy"),
            ExitStatus::Config => (2, "config", "invalid configuration"),
            ExitStatus::Database => (3, "database", "the database cannot be used"),
            ExitStatus::Kafka => (4, "kafka", "the Kafka client or the broker failed"),
            ExitStatus::TopicsMissing => (5, "topics_missing", "a topic is missing or has no partitions"),
            ExitStatus::StillFailing => (6, "still_failing", "dead-letters replay: some still fail"),
            ExitStatus::MigrationRefused => (
                7,
                "migration_refused",
                "a migration is pending that this role may not apply (run `booking-worker migrate` as the tables' owner)",
            ),
            ExitStatus::Panic => (70, "panic", "a thread panicked"),
            ExitStatus::Deadline => (124, "deadline", "the shutdown deadline passed"),
            ExitStatus::SecondSignal => (130, "second_signal", "a second signal during shutdown"),
        }
    }

    pub fn code(self) -> u8 {
        self.describe().0
    }

    pub fn name(self) -> &'static str {
        self.describe().1
    }

    pub fn meaning(self) -> &'static str {
        self.describe().2
    }

    /// The exit codes as `--help` lists them.
    pub fn help() -> String {
        let lines: Vec<String> = ExitStatus::ALL
            .iter()
            .map(|s| format!("  {:>3}  {}", s.code(), s.meaning()))
            .collect();
        format!("Exit codes:\n{}", lines.join("\n"))
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> Self {
        std::process::ExitCode::from(status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_are_distinct_and_in_order() {
        let codes: Vec<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(codes, sorted);
        let mut names: Vec<&str> = ExitStatus::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitStatus::ALL.len());
        assert_eq!(
            ExitStatus::Config.code(),
            2,
            "systemd's RestartPreventExitStatus names 2 and 7"
        );
        assert_eq!(ExitStatus::MigrationRefused.code(), 7);
    }

    #[test]
    fn help_lists_every_code() {
        let help = ExitStatus::help();
        for s in ExitStatus::ALL {
            assert!(help.contains(&format!("{:>3}  {}", s.code(), s.meaning())), "{help}");
        }
    }
}
