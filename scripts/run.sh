#!/usr/bin/env bash
# Runs booking-worker in the foreground against real local services.
#
# Usage: scripts/run.sh [booking-worker arguments]
#
# Kafka       KAFKA_BROKERS if it answers (default localhost:9092); otherwise a
#             local single-node broker from scripts/kafka.sh on 127.0.0.1:9092.
# PostgreSQL  the DB_* server if the login works; otherwise a throwaway cluster
#             from scripts/postgres.sh, loaded with sql/schema.sql and the
#             sample data in sql/seed.sql.
# The worker is built in release mode and runs until Ctrl-C; the services this
# script started are stopped when it exits. Exit code: the worker's.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="run"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

if ! have cargo && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
have cargo || die "cargo not found: install Rust (https://rustup.rs) or run scripts/install-deps.sh"

RUN_DIR="$(mktemp -d /tmp/booking-worker-run.XXXXXX)"
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
    exit "$rc"
}
trap cleanup EXIT

# ---- Kafka ---------------------------------------------------------------
KAFKA_BROKERS="${KAFKA_BROKERS:-localhost:9092}"
if brokers_answer "$KAFKA_BROKERS"; then
    log "using Kafka at $KAFKA_BROKERS"
else
    log "no broker answers at $KAFKA_BROKERS; starting a local one"
    export KAFKA_PORT="${KAFKA_PORT:-9092}"
    KAFKA_STARTED=1
    kafka_out="$(KAFKA_STATE_DIR="$RUN_DIR/kafka" bash "$SCRIPT_DIR/kafka.sh" start)"
    KAFKA_BROKERS="$(printf '%s\n' "$kafka_out" | sed -n 's/^KAFKA_BROKERS=//p' | tail -n 1)"
    [[ -n "$KAFKA_BROKERS" ]] || die "scripts/kafka.sh start printed no KAFKA_BROKERS line"
fi
export KAFKA_BROKERS

# ---- PostgreSQL ------------------------------------------------------------
pg_out="$(PG_STATE_DIR="$RUN_DIR/pg" bash "$SCRIPT_DIR/postgres.sh" start)"
eval "$(printf '%s\n' "$pg_out" | grep '^export DB_')"
if [[ -f "$RUN_DIR/pg/state" ]]; then
    PG_STARTED=1
    log "loading sql/schema.sql and the sample data into the throwaway database"
    PGPASSWORD="$DB_PASSWORD" psql -q -v ON_ERROR_STOP=1 -h "$DB_HOST" -p "$DB_PORT" -U "$DB_USER" -d "$DB_NAME" \
        -f "$ROOT_DIR/sql/schema.sql" -f "$ROOT_DIR/sql/seed.sql" >/dev/null
else
    log "using the configured PostgreSQL at $DB_HOST:$DB_PORT/$DB_NAME (schema and data left as they are)"
fi

# ---- the worker --------------------------------------------------------------
cd "$ROOT_DIR"
log "building the release binary"
cargo build --release --locked --bin booking-worker
log "booking-worker running; Ctrl-C stops it and the services started here"
set +e
./target/release/booking-worker "$@"
rc=$?
set -e
exit "$rc"
