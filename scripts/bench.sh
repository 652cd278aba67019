#!/usr/bin/env bash
# The benchmark of the release worker against the real local broker and
# database (started for the run, as for scripts/test.sh).
#
# Usage:
#   scripts/bench.sh [--runs N] [--events N] [--json FILE]
#       every regime in one table (also: --all): the worker idle once its group
#       has assigned it (BENCH_IDLE_SECS, default 20), at a steady 100 and
#       1,000 events/s (BENCH_STEADY_RATES, default "100 1000"; each for
#       BENCH_STEADY_SECS, default 40), then a catch-up of N bookings (default
#       100000, plus 20% cancellations) next to the COPY limit of the same rows.
#       A row per regime: CPU as a share of one core over that regime's window,
#       peak RSS, latency percentiles, events/s. --runs N repeats the whole
#       sequence N times and prints the median and range of each figure.
#   scripts/bench.sh --throughput [--events N] [--json FILE]
#       the catch-up of N bookings (default 200000) side by side with
#         (a) the same worker with batching off (one event per transaction,
#             the Go worker's pattern),
#         (b) the SQL ceiling: the same rows written straight into
#             PostgreSQL, one multi-row statement per batch, and
#         (c) the COPY limit: the same rows with one COPY in one transaction.
#       (--events N without --all means --throughput, as before)
#   scripts/bench.sh --events N --only-batched     just the worker's catch-up
#   scripts/bench.sh --steady RATE SECONDS [--json FILE]
#       the idle and one steady row of the table above (BENCH_IDLE_SECS,
#       default 60)
#
# Each mode prints a table and writes it as JSON (default target/bench.json).
#
# Environment: BENCH_BASELINE_MAX (cap on the events the batching-off run
# processes before its rate is taken; default all), BENCH_COMPRESSION (the
# producer's compression of the pre-loaded records: lz4 by default, none, gzip
# or zstd), BENCH_LINGER_MS (the steady load generator's linger.ms; default 0,
# each record sent at once), the BENCH_* above, plus the worker's own
# variables. Services are started as for scripts/test.sh unless KAFKA_BROKERS /
# DB_HOST point at running ones.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="bench"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

EVENTS=""
MODE=""
STEADY_RATE=1000
STEADY_SECONDS=60
RUNS=1
JSON_OUT="$ROOT_DIR/target/bench.json"
ONLY_BATCHED=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --all) MODE=all; shift ;;
        --throughput) MODE=throughput; shift ;;
        --events) EVENTS="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --steady) MODE=steady; STEADY_RATE="$2"; STEADY_SECONDS="$3"; shift 3 ;;
        --json) JSON_OUT="$2"; shift 2 ;;
        --only-batched) ONLY_BATCHED=1; shift ;;
        -h|--help) help_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
if [[ -z "$MODE" ]]; then
    # --events without --all keeps the meaning it had before the table of regimes.
    if [[ -n "$EVENTS" ]]; then MODE=throughput; else MODE=all; fi
fi
if [[ -z "$EVENTS" ]]; then
    if [[ "$MODE" == all ]]; then EVENTS=100000; else EVENTS=200000; fi
fi
IDLE_SECS="${BENCH_IDLE_SECS:-$([[ "$MODE" == all ]] && echo 20 || echo 60)}"
STEADY_RATES="${BENCH_STEADY_RATES:-100 1000}"
STEADY_SECS="${BENCH_STEADY_SECS:-40}"
# The steady load generator sends each record at once, as a producer without linger does: a
# linger would count in the end-to-end latency (a record's Kafka timestamp is taken before it).
LINGER_MS="${BENCH_LINGER_MS:-0}"
read -r -a rates <<<"$STEADY_RATES"
for n in "$EVENTS" "$STEADY_RATE" "$STEADY_SECONDS" "$RUNS" "$IDLE_SECS" "$STEADY_SECS" "$LINGER_MS" "${rates[@]}"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "--events, --runs, RATE, SECONDS and the BENCH_* figures take whole numbers"
done
[[ "$RUNS" -ge 1 ]] || die "--runs takes at least 1"
[[ "$RUNS" == 1 || "$MODE" == all ]] || die "--runs goes with the table of regimes (--all)"
[[ "$ONLY_BATCHED" == 0 || "$MODE" == throughput ]] || die "--only-batched goes with --events N (the throughput mode)"

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
LEDGER="$SESSION_DIR/ledger.json"
METRICS_PORT="$(free_port "${KAFKA_PORT:-}" "${KAFKA_CONTROLLER_PORT:-}" "$DB_PORT")"

# Points the worker and the load generator at a pair of topics of their own, named after $1.
use_topics() {
    BOOKINGS_TOPIC="bench-bookings-$1"
    CANCELS_TOPIC="bench-cancellations-$1"
}
use_topics "$RUN_ID"

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

measure() {
    python3 "$SCRIPT_DIR/bench_measure.py" --pid "$WORKER_PID" --metrics "127.0.0.1:$METRICS_PORT" "$@"
}

# Runs the worker on database $1 with group $2 and extra env $4..., until $3 records have reached
# an end; sets FIGURES to one JSON object of figures.
measure_worker() {
    local db="$1" group="$2" limit="$3"
    shift 3
    start_worker "$db" "$group" "$@"
    FIGURES="$(measure --until "$limit")"
    stop_worker "$group"
}

# Pre-loads $1 bookings and their 20% cancellations with the load generator, as fast as it can,
# into the current topics; sets TOTAL to the number of records.
preload() {
    log "pre-loading $1 bookings (20% cancelled) with the load generator"
    ./target/release/booking-loadgen --count "$1" --compression "${BENCH_COMPRESSION:-lz4}" --cancel-ratio 0.2 \
        --early-cancel-ratio 0 --unauthorized-ratio 0 --duplicate-ratio 0 --bad-ratio 0 --baggage-ratio 0.5 \
        --id-prefix "$BOOKINGS_TOPIC" --booking-topic "$BOOKINGS_TOPIC" --cancellation-topic "$CANCELS_TOPIC" \
        --ledger "$LEDGER" >"$SESSION_DIR/loadgen.json"
    TOTAL="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["records"])' "$LEDGER")"
    log "$TOTAL records in Kafka"
}

# The bulk-load limit: the pre-loaded rows with one COPY in one transaction, every index in place,
# on a fresh database; sets COPY_FIGURES.
copy_limit() {
    fresh_db bench_copy
    psql_db bench_copy -At -c "SELECT 'user|' || username || '|' || id FROM users UNION ALL
                               SELECT 'room|' || internal_id || '|' || id FROM rooms" >"$SESSION_DIR/ids.txt"
    python3 "$SCRIPT_DIR/bench_measure.py" --copy-csv "$LEDGER" --ids "$SESSION_DIR/ids.txt" >"$SESSION_DIR/copy.csv"
    local start_ns end_ns
    start_ns="$(date +%s%N)"
    psql_db bench_copy -1 -c "\\copy bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status, external_id) FROM '$SESSION_DIR/copy.csv' WITH (FORMAT csv)" >/dev/null
    end_ns="$(date +%s%N)"
    COPY_FIGURES="{\"records\": $TOTAL, \"seconds\": $(python3 -c "print(($end_ns - $start_ns) / 1e9)")}"
}

# One worker on a fresh database, on topics of its own named after $1: idle for $2 s once its group
# has assigned it, then a steady window at each rate $3... for STEADY_SECS s each. The worker
# starts first, so every record is produced after the assignment and its latency is the steady
# one. Sets STEADY_FIGURES to the JSON members "idle" and "steady".
idle_and_steady() {
    local tag="$1" idle_secs="$2" rate bookings ledger idle rows=""
    shift 2
    use_topics "steady-$tag"
    fresh_db bench_steady
    start_worker bench_steady "steady-$tag"
    log "idle: the worker with no traffic for $idle_secs s once ready"
    idle="$(measure --idle "$idle_secs")"
    for rate in "$@"; do
        # 1.2 records per booking (20% are cancelled): about rate x STEADY_SECS records.
        bookings=$(((rate * STEADY_SECS * 5 + 3) / 6))
        ledger="$SESSION_DIR/ledger-$rate.json"
        log "steady: $rate events/s for about $STEADY_SECS s"
        rows+="${rows:+, }$(measure --steady "$rate" --ledger "$ledger" --logs "$SESSION_DIR/loadgen-$rate" -- \
            ./target/release/booking-loadgen --count "$bookings" --rate "$rate" --linger-ms "$LINGER_MS" --cancel-ratio 0.2 \
            --early-cancel-ratio 0 --unauthorized-ratio 0 --duplicate-ratio 0 --bad-ratio 0 --baggage-ratio 0.5 \
            --id-prefix "$tag-$rate" --booking-topic "$BOOKINGS_TOPIC" --cancellation-topic "$CANCELS_TOPIC" \
            --ledger "$ledger")"
    done
    stop_worker "steady-$tag"
    STEADY_FIGURES="\"idle\": $idle, \"steady\": [$rows]"
}

if [[ "$MODE" == steady ]]; then
    STEADY_SECS="$STEADY_SECONDS"
    idle_and_steady "$RUN_ID" "$IDLE_SECS" "$STEADY_RATE"
    printf '{%s}\n' "$STEADY_FIGURES" >"$SESSION_DIR/runs.jsonl"
    python3 "$SCRIPT_DIR/bench_measure.py" --report-regimes "$SESSION_DIR/runs.jsonl" --json "$JSON_OUT"
    exit 0
fi

if [[ "$MODE" == all ]]; then
    : >"$SESSION_DIR/runs.jsonl"
    for run in $(seq 1 "$RUNS"); do
        log "run $run of $RUNS: idle, steady at ${rates[*]} events/s, catch-up of $EVENTS bookings, COPY limit"
        idle_and_steady "${RUN_ID}r$run" "$IDLE_SECS" "${rates[@]}"
        use_topics "catchup-${RUN_ID}r$run"
        preload "$EVENTS"
        fresh_db bench_batched
        log "catch-up: the worker, default settings"
        measure_worker bench_batched "catchup-${RUN_ID}r$run" "$TOTAL"
        log "the COPY limit of the same rows"
        copy_limit
        printf '{%s, "catchup": %s, "copy": %s}\n' "$STEADY_FIGURES" "$FIGURES" "$COPY_FIGURES" \
            >>"$SESSION_DIR/runs.jsonl"
    done
    python3 "$SCRIPT_DIR/bench_measure.py" --report-regimes "$SESSION_DIR/runs.jsonl" --json "$JSON_OUT"
    exit 0
fi

preload "$EVENTS"

fresh_db bench_batched
log "run 1/4: the worker, default settings"
measure_worker bench_batched "batched-$RUN_ID" "$TOTAL"
batched="$FIGURES"
if [[ "$ONLY_BATCHED" == 1 ]]; then
    printf '%s\n' "$batched"
    exit 0
fi

fresh_db bench_single
limit="${BENCH_BASELINE_MAX:-$TOTAL}"
log "run 2/4: the worker with batching off (BATCH_SIZE=1), up to $limit records"
measure_worker bench_single "single-$RUN_ID" "$limit" BATCH_SIZE=1 BATCH_LINGER_MS=0
single="$FIGURES"

fresh_db bench_ceiling
log "run 3/4: the ceiling, the same rows as multi-row SQL, 500 per statement"
python3 "$SCRIPT_DIR/bench_measure.py" --ceiling-sql "$LEDGER" --batch 500 >"$SESSION_DIR/ceiling.sql"
start_ns="$(date +%s%N)"
psql_db bench_ceiling -f "$SESSION_DIR/ceiling.sql" >/dev/null
end_ns="$(date +%s%N)"
ceiling="{\"records\": $TOTAL, \"seconds\": $(python3 -c "print(($end_ns - $start_ns) / 1e9)")}"

log "run 4/4: the bulk-load limit, the same rows with one COPY in one transaction, every index in place"
copy_limit
python3 "$SCRIPT_DIR/bench_measure.py" --report "$batched" "$single" "$ceiling" "$COPY_FIGURES" --json "$JSON_OUT"
