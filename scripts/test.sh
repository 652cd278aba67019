#!/usr/bin/env bash
# The one test command for booking-worker: provides Kafka and PostgreSQL,
# runs `cargo test --all-targets --locked "$@"`, and stops exactly what it
# started (on success, failure or Ctrl-C).
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

if ! have cargo && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
have cargo || die "cargo not found"

RUN_DIR="$(mktemp -d /tmp/booking-worker-test.XXXXXX)"
KAFKA_STARTED=0
PG_STARTED=0

# Called through the EXIT trap.
# shellcheck disable=SC2317
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ "$KAFKA_STARTED" == 1 ]]; then
        KAFKA_STATE_DIR="$RUN_DIR/kafka" bash "$SCRIPT_DIR/kafka.sh" stop
    fi
    if [[ "$PG_STARTED" == 1 ]]; then
        PG_STATE_DIR="$RUN_DIR/pg" bash "$SCRIPT_DIR/postgres.sh" stop
    fi
    rm -rf "$RUN_DIR"
    local elapsed=$SECONDS
    log "finished in $((elapsed / 60))m$((elapsed % 60))s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- Kafka ---------------------------------------------------------------
if [[ -n "${KAFKA_BROKERS:-}" ]] && brokers_answer "$KAFKA_BROKERS"; then
    log "using Kafka at $KAFKA_BROKERS"
else
    if [[ -n "${KAFKA_BROKERS:-}" ]]; then
        log "KAFKA_BROKERS=$KAFKA_BROKERS does not answer; starting a throwaway broker"
    fi
    KAFKA_PORT="$(free_port)"
    KAFKA_CONTROLLER_PORT="$(free_port "$KAFKA_PORT")"
    export KAFKA_PORT KAFKA_CONTROLLER_PORT
    KAFKA_STARTED=1
    kafka_out="$(KAFKA_STATE_DIR="$RUN_DIR/kafka" bash "$SCRIPT_DIR/kafka.sh" start)"
    KAFKA_BROKERS="$(printf '%s\n' "$kafka_out" | sed -n 's/^KAFKA_BROKERS=//p' | tail -n 1)"
    [[ -n "$KAFKA_BROKERS" ]] || die "scripts/kafka.sh start printed no KAFKA_BROKERS line"
fi
export KAFKA_BROKERS

# ---- PostgreSQL ------------------------------------------------------------
PG_PORT="$(free_port "${KAFKA_PORT:-}" "${KAFKA_CONTROLLER_PORT:-}")"
export PG_PORT
if [[ -z "${DB_HOST:-}" && -z "${DB_PORT:-}" ]]; then
    # Nothing configured: never touch a developer's default server, use a
    # throwaway cluster (nothing answers on PG_PORT, so postgres.sh makes one).
    export DB_HOST=127.0.0.1 DB_PORT="$PG_PORT"
fi
PG_STARTED=1
pg_out="$(PG_STATE_DIR="$RUN_DIR/pg" bash "$SCRIPT_DIR/postgres.sh" start)"
pg_env="$(printf '%s\n' "$pg_out" | grep '^export DB_' || true)"
[[ -n "$pg_env" ]] || die "scripts/postgres.sh start printed no export lines"
eval "$pg_env"

export BOOKING_WORKER_REQUIRE_SERVICES=1
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

log "Kafka: $KAFKA_BROKERS; PostgreSQL: $DB_USER@$DB_HOST:$DB_PORT/$DB_NAME"
log "cargo test --all-targets --locked $*"
cd "$ROOT_DIR"
set +e
cargo test --all-targets --locked "$@"
rc=$?
set -e
exit "$rc"
