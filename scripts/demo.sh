#!/usr/bin/env bash
# The demo, in one command on a fresh machine: starts a throwaway Kafka broker
# and PostgreSQL cluster, loads the schema and sample data, runs the worker,
# publishes sample events (some with baggage, some bad) with booking-loadgen,
# and prints what landed in PostgreSQL and what was dead-lettered. Everything
# it started is stopped at the end.
#
# Usage: scripts/demo.sh [number of bookings, default 300]

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="demo"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

COUNT="${1:-300}"
[[ "$COUNT" =~ ^[0-9]+$ && "$COUNT" -gt 0 ]] || die "usage: scripts/demo.sh [number of bookings > 0]"

ensure_cargo
WORKER_PID=""
# Called by session_end.
# shellcheck disable=SC2317
session_on_exit() {
    if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null || true
    fi
}
session_begin demo

# Throwaway services on free ports, whatever else runs on this machine.
unset KAFKA_BROKERS
KAFKA_PORT="$(free_port)"
KAFKA_CONTROLLER_PORT="$(free_port "$KAFKA_PORT")"
export KAFKA_PORT KAFKA_CONTROLLER_PORT
session_kafka
export DB_HOST=127.0.0.1 DB_PORT
DB_PORT="$(free_port "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT")"
session_postgres || die "expected a throwaway PostgreSQL cluster"

sql() {
    psql_db "$DB_NAME" "$@"
}
log "loading sql/schema.sql and sql/seed.sql"
sql -f "$ROOT_DIR/sql/schema.sql" -f "$ROOT_DIR/sql/seed.sql" >/dev/null

cd "$ROOT_DIR"
log "building the release binaries"
cargo build --release --locked --bins

METRICS_ADDR="127.0.0.1:$(free_port "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$DB_PORT")"
export METRICS_ADDR
WORKER_LOG="$SESSION_DIR/worker.log"
./target/release/booking-worker run >"$WORKER_LOG" 2>&1 &
WORKER_PID=$!
log "worker running (pid $WORKER_PID, metrics on http://$METRICS_ADDR/metrics, log $WORKER_LOG)"

log "publishing $COUNT bookings with cancellations, duplicates, baggage and some bad records"
LEDGER="$SESSION_DIR/ledger.json"
./target/release/booking-loadgen --count "$COUNT" --cancel-ratio 0.3 --early-cancel-ratio 0.2 \
    --unauthorized-ratio 0.1 --duplicate-ratio 0.05 --bad-ratio 0.05 --baggage-ratio 0.5 \
    --id-prefix demo --ledger "$LEDGER"

expected_bookings="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["bookings"]))' "$LEDGER")"
expected_dead="$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))["dead_letters"].values()))' "$LEDGER")"
log "waiting for $expected_bookings bookings and $expected_dead dead letters"
for _ in $(seq 1 120); do
    got="$(sql -At -c "SELECT (SELECT count(*) FROM bookings) || ' ' || (SELECT count(*) FROM booking_worker.dead_letters)")"
    [[ "$got" == "$expected_bookings $expected_dead" ]] && break
    kill -0 "$WORKER_PID" 2>/dev/null || die "the worker stopped; see $WORKER_LOG"
    sleep 1
done
[[ "$got" == "$expected_bookings $expected_dead" ]] || warn "not everything arrived in time: bookings/dead letters = $got"

echo
echo "== Bookings in PostgreSQL, by status =="
sql -c "SELECT status, count(*) AS bookings FROM bookings GROUP BY status ORDER BY status"
echo "== Dead letters, by reason =="
sql -c "SELECT reason, count(*) AS records, min(error) AS example FROM booking_worker.dead_letters GROUP BY reason ORDER BY reason"
echo "== Expected (from the load generator's ledger) =="
python3 - "$LEDGER" <<'PY'
import collections, json, sys
ledger = json.load(open(sys.argv[1]))
print("bookings by status:", dict(collections.Counter(b["status"] for b in ledger["bookings"].values())))
print("dead letters by reason:", ledger["dead_letters"])
PY
echo "== A log line about an event that carried baggage =="
grep -m 1 '"baggage":"trace-id=' "$WORKER_LOG" || echo "(none)"
echo "== Metrics excerpt =="
python3 - "$METRICS_ADDR" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in body.splitlines():
    if line.startswith(("booking_worker_events_total", "booking_worker_dead_letters_total", "process_resident_memory_bytes")):
        print(line)
PY
echo
kill -TERM "$WORKER_PID"
if wait "$WORKER_PID"; then
    log "worker stopped cleanly (exit 0)"
else
    warn "worker exited with $?"
fi
WORKER_PID=""
