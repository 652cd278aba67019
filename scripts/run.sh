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
# The worker is built in release mode and runs until Ctrl-C or SIGTERM (either
# is passed on to it once, and it drains as under systemd); the services this
# script started are stopped when it exits. Exit code: the worker's.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="run"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

ensure_cargo
session_begin run

KAFKA_BROKERS="${KAFKA_BROKERS:-localhost:9092}"
session_kafka

if session_postgres; then
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
log "booking-worker running; Ctrl-C or SIGTERM stops it and the services started here"
# bash runs a trap only once its foreground child has exited, so the worker runs in the
# background, in a process group of its own (set -m): a terminal's Ctrl-C reaches this script
# alone, and the traps below pass each signal on to the worker exactly once (a second one would
# make it exit at once). `wait` returns early when a trapped signal arrives; the loop waits on
# until the worker has drained and exited.
set -m
./target/release/booking-worker "$@" &
worker=$!
set +m
trap 'kill -INT "$worker" 2>/dev/null || true' INT
trap 'kill -TERM "$worker" 2>/dev/null || true' TERM
rc=0
while :; do
    wait "$worker" && rc=0 || rc=$?
    kill -0 "$worker" 2>/dev/null || break
done
exit "$rc"
