#!/usr/bin/env bash
# The one test command for booking-worker: checks the alert rules and runs
# their unit tests with promtool (scripts/monitoring/), provides Kafka and
# PostgreSQL, runs `cargo test --all-targets --locked --features failpoints "$@"`, and stops
# exactly what it started (on success, failure or Ctrl-C).
#
# Usage: scripts/test.sh [extra cargo test arguments, e.g. -- --nocapture]
#
# Services:
#   Kafka       KAFKA_BROKERS if set and answering; otherwise a throwaway
#               broker from scripts/kafka.sh on free ports.
#   PostgreSQL  if DB_HOST or DB_PORT is set, scripts/postgres.sh uses that
#               server when the DB_* login works; otherwise (and by default)
#               a throwaway cluster on a free port.
# Each run keeps its service state in its own temp dir, so runs in parallel
# and a developer's own services do not clash.
#
# The tests see KAFKA_BROKERS, DB_HOST, DB_PORT, DB_USER, DB_PASSWORD,
# DB_NAME and BOOKING_WORKER_REQUIRE_SERVICES=1 (integration tests fail
# instead of skipping when a service is missing). Exit code: cargo's.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="test"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

ensure_cargo

# Called by session_end.
# shellcheck disable=SC2317
session_on_exit() {
    log "finished in $((SECONDS / 60))m$((SECONDS % 60))s (exit $1)"
}
session_begin test

# The alert rules before anything is started: a missing promtool fails the run, as a missing
# service does (scripts/install-deps.sh installs Debian's prometheus package, which has it).
have promtool || die "promtool not found: run scripts/install-deps.sh (Debian: apt-get install prometheus)"
log "promtool check rules, test rules: scripts/monitoring/"
promtool check rules "$ROOT_DIR/scripts/monitoring/alerts.yml" >&2 ||
    die "promtool check rules scripts/monitoring/alerts.yml failed"
promtool test rules "$ROOT_DIR/scripts/monitoring/alerts_test.yml" >&2 ||
    die "promtool test rules scripts/monitoring/alerts_test.yml failed"

session_isolated_services

export BOOKING_WORKER_REQUIRE_SERVICES=1
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

log "Kafka: $KAFKA_BROKERS; PostgreSQL: $DB_USER@$DB_HOST:$DB_PORT/$DB_NAME"
# The fail points let tests make a thread panic, or pause before subscribing, on purpose; they do
# nothing unless FAILPOINTS is set, which only those tests do.
log "cargo test --all-targets --locked --features failpoints $*"
cd "$ROOT_DIR"
set +e
cargo test --all-targets --locked --features failpoints "$@"
rc=$?
set -e
exit "$rc"
