#!/usr/bin/env bash
# The benchmark: throughput, latency, peak RSS and CPU time of the release
# worker against the real local broker and database, side by side with
#   (a) the same worker with batching off (one event per transaction, the Go
#       worker's pattern), and
#   (b) the ceiling: the same rows written straight into PostgreSQL, one
#       multi-row statement per batch, and
#   (c) the bulk-load limit: the same rows with one COPY in one transaction.
# All four run on the same machine and the same data, in one run. It prints a
# table and writes it as JSON.
#
# Usage:
#   scripts/bench.sh [--events N] [--json FILE]        throughput (default 200000 bookings)
#   scripts/bench.sh --events N --only-batched         just the worker's figures (for tuning)
#   scripts/bench.sh --steady RATE SECONDS [--json F]  idle CPU and RSS, then a steady rate:
#                                                      end-to-end latency percentiles
#
# Environment: BENCH_BASELINE_MAX (cap on the events the batching-off run
# processes before its rate is taken; default all), BENCH_IDLE_SECS (how long
# --steady measures the idle worker; default 60), BENCH_COMPRESSION (the
# producer's compression of the pre-loaded records: lz4 by default, none, gzip
# or zstd), plus the worker's own
# variables. Services are started as for scripts/test.sh unless KAFKA_BROKERS /
# DB_HOST point at running ones.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="bench"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

EVENTS=200000
MODE=throughput
STEADY_RATE=1000
STEADY_SECONDS=60
JSON_OUT="$ROOT_DIR/target/bench.json"
ONLY_BATCHED=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --events) EVENTS="$2"; shift 2 ;;
        --steady) MODE=steady; STEADY_RATE="$2"; STEADY_SECONDS="$3"; shift 3 ;;
        --json) JSON_OUT="$2"; shift 2 ;;
        --only-batched) ONLY_BATCHED=1; shift ;;
        -h|--help) help_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$EVENTS" =~ ^[0-9]+$ && "$STEADY_RATE" =~ ^[0-9]+$ && "$STEADY_SECONDS" =~ ^[0-9]+$ ]] \
    || die "--events, RATE and SECONDS take whole numbers"

ensure_cargo
WORKER_PID=""
# Called by session_end.
# shellcheck disable=SC2317
session_on_exit() {
    if [[ -n "$WORKER_PID" ]]; then
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
}
session_begin bench

session_isolated_services
ADMIN_DB="$DB_NAME"

cd "$ROOT_DIR"
log "building the release binaries"
cargo build --release --locked --bins 2>&1 | tail -n 1 >&2

# A fresh database with the schema, the sample data and the worker's tables.
# Every run starts from the same state: a new database and a checkpoint, so
# no run pays for the previous one's dirty pages.
fresh_db() {
    local db="$1"
    psql_db "$ADMIN_DB" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
    psql_db "$db" -f sql/schema.sql -f sql/seed.sql >/dev/null
    DB_NAME="$db" ./target/release/booking-worker migrate >/dev/null 2>&1
    psql_db "$db" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
}

RUN_ID="bench$(date +%s)"
BOOKINGS_TOPIC="bench-bookings-$RUN_ID"
CANCELS_TOPIC="bench-cancellations-$RUN_ID"
LEDGER="$SESSION_DIR/ledger.json"
METRICS_PORT="$(free_port "${KAFKA_PORT:-}" "${KAFKA_CONTROLLER_PORT:-}" "$DB_PORT")"

# Starts the worker in the background on database $1 with group $2 and extra env $3...
start_worker() {
    local db="$1" group="$2"
    shift 2
    # The worker logs as configured (one line per record at the default level) into a file, as
    # journald or a container runtime would take it.
    env "$@" DB_NAME="$db" KAFKA_GROUP_ID="$group" KAFKA_BOOKING_TOPIC="$BOOKINGS_TOPIC" \
        KAFKA_CANCELLATION_TOPIC="$CANCELS_TOPIC" METRICS_ADDR="127.0.0.1:$METRICS_PORT" \
        ./target/release/booking-worker run >"$SESSION_DIR/worker-$group.log" 2>&1 &
    WORKER_PID=$!
}

# Stops the worker that start_worker started with group $1.
stop_worker() {
    kill -TERM "$WORKER_PID"
    wait "$WORKER_PID" || warn "worker exited with $? (log: $SESSION_DIR/worker-$1.log)"
    WORKER_PID=""
}

# Runs the worker on database $1 with group $2 and extra env $4..., until $3 records have reached
# an end, then prints one JSON object of figures.
measure_worker() {
    local db="$1" group="$2" limit="$3"
    shift 3
    start_worker "$db" "$group" "$@"
    python3 "$SCRIPT_DIR/bench_measure.py" --pid "$WORKER_PID" --metrics "127.0.0.1:$METRICS_PORT" --until "$limit"
    stop_worker "$group"
}

if [[ "$MODE" == steady ]]; then
    count=$((STEADY_RATE * STEADY_SECONDS))
    idle_secs="${BENCH_IDLE_SECS:-60}"
    fresh_db bench_steady
    group="steady-$RUN_ID"
    # The worker starts first: its idle figures are taken once the group has assigned it the
    # partitions, and every record is produced after that, so end-to-end latency is the steady one.
    log "idle: the worker with no traffic for $idle_secs s once ready"
    start_worker bench_steady "$group"
    idle="$(python3 "$SCRIPT_DIR/bench_measure.py" --pid "$WORKER_PID" --metrics "127.0.0.1:$METRICS_PORT" --idle "$idle_secs")"
    log "steady rate: $STEADY_RATE events/s for $STEADY_SECONDS s ($count bookings' worth)"
    ./target/release/booking-loadgen --count "$count" --rate "$STEADY_RATE" --cancel-ratio 0.2 --early-cancel-ratio 0 \
        --unauthorized-ratio 0 --duplicate-ratio 0 --bad-ratio 0 --baggage-ratio 0.5 --id-prefix "$RUN_ID" \
        --booking-topic "$BOOKINGS_TOPIC" --cancellation-topic "$CANCELS_TOPIC" --ledger "$LEDGER" \
        >"$SESSION_DIR/loadgen.json" 2>"$SESSION_DIR/loadgen.log" &
    loadgen=$!
    total="$(python3 -c 'import json,sys,time
while True:
    try:
        print(json.load(open(sys.argv[1]))["records"]); break
    except Exception: time.sleep(0.2)' "$LEDGER")"
    steady="$(python3 "$SCRIPT_DIR/bench_measure.py" --pid "$WORKER_PID" --metrics "127.0.0.1:$METRICS_PORT" --until "$total")"
    stop_worker "$group"
    wait "$loadgen" || die "the load generator failed: $(tail -n 3 "$SESSION_DIR/loadgen.log")"
    python3 "$SCRIPT_DIR/bench_measure.py" --report-steady "$idle" "$steady" --rate "$STEADY_RATE" --json "$JSON_OUT"
    exit 0
fi

log "pre-loading $EVENTS bookings (20% cancelled) with the load generator"
./target/release/booking-loadgen --count "$EVENTS" --compression "${BENCH_COMPRESSION:-lz4}" --cancel-ratio 0.2 --early-cancel-ratio 0 --unauthorized-ratio 0 \
    --duplicate-ratio 0 --bad-ratio 0 --baggage-ratio 0.5 --id-prefix "$RUN_ID" \
    --booking-topic "$BOOKINGS_TOPIC" --cancellation-topic "$CANCELS_TOPIC" --ledger "$LEDGER" >"$SESSION_DIR/loadgen.json"
total="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["records"])' "$LEDGER")"
log "$total records in Kafka"

fresh_db bench_batched
log "run 1/4: the worker, default settings"
batched="$(measure_worker bench_batched "batched-$RUN_ID" "$total")"
if [[ "$ONLY_BATCHED" == 1 ]]; then
    printf '%s\n' "$batched"
    exit 0
fi

fresh_db bench_single
limit="${BENCH_BASELINE_MAX:-$total}"
log "run 2/4: the worker with batching off (BATCH_SIZE=1), up to $limit records"
single="$(measure_worker bench_single "single-$RUN_ID" "$limit" BATCH_SIZE=1 BATCH_LINGER_MS=0)"

fresh_db bench_ceiling
log "run 3/4: the ceiling, the same rows as multi-row SQL, 500 per statement"
python3 "$SCRIPT_DIR/bench_measure.py" --ceiling-sql "$LEDGER" --batch 500 >"$SESSION_DIR/ceiling.sql"
start_ns="$(date +%s%N)"
psql_db bench_ceiling -f "$SESSION_DIR/ceiling.sql" >/dev/null
end_ns="$(date +%s%N)"
ceiling="{\"records\": $total, \"seconds\": $(python3 -c "print(($end_ns - $start_ns) / 1e9)")}"

fresh_db bench_copy
log "run 4/4: the bulk-load limit, the same rows with one COPY in one transaction, every index in place"
psql_db bench_copy -At -c "SELECT 'user|' || username || '|' || id FROM users UNION ALL
                           SELECT 'room|' || internal_id || '|' || id FROM rooms" >"$SESSION_DIR/ids.txt"
python3 "$SCRIPT_DIR/bench_measure.py" --copy-csv "$LEDGER" --ids "$SESSION_DIR/ids.txt" >"$SESSION_DIR/copy.csv"
start_ns="$(date +%s%N)"
psql_db bench_copy -1 -c "\\copy bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status, external_id) FROM '$SESSION_DIR/copy.csv' WITH (FORMAT csv)" >/dev/null
end_ns="$(date +%s%N)"
copy="{\"records\": $total, \"seconds\": $(python3 -c "print(($end_ns - $start_ns) / 1e9)")}"

python3 "$SCRIPT_DIR/bench_measure.py" --report "$batched" "$single" "$ceiling" "$copy" --json "$JSON_OUT"
