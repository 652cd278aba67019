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
log "booking-worker running; Ctrl-C stops it and the services started here"
set +e
./target/release/booking-worker "$@"
rc=$?
set -e
exit "$rc"
