#!/usr/bin/env bash
# The full reliability run of booking-worker, in one command: provides Kafka
# and PostgreSQL like scripts/test.sh, runs every scenario of
# tests/reliability/ at full size (50 000 bookings, about 10 000
# cancellations, per scenario), each in its own process group with a time
# limit, and prints one line per scenario: records published, applied,
# dead-lettered, lost, duplicated, time to recover, longest pause between
# durable writes, duration.
#
# Usage: scripts/reliability.sh [substring of scenario names ...]
#
# Environment:
#   RELIABILITY_EVENTS    bookings per scenario (default 50000)
#   RELIABILITY_TIMEOUT   seconds allowed per scenario (default 900)
#   RELIABILITY_SEED      seed of the random choices (default: the clock)
#   RELIABILITY_OUT       where the report (report.jsonl) and each scenario's
#                         log go (default target/reliability)
#   KAFKA_BROKERS, DB_*   as for scripts/test.sh
#
# Exit code: 0 when every scenario passed with nothing lost and nothing
# duplicated; 1 otherwise (a failed or timed-out scenario, or a figure).

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="reliability"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

RELIABILITY_EVENTS="${RELIABILITY_EVENTS:-50000}"
RELIABILITY_TIMEOUT="${RELIABILITY_TIMEOUT:-900}"
OUT_DIR="${RELIABILITY_OUT:-$ROOT_DIR/target/reliability}"
[[ "$RELIABILITY_EVENTS" =~ ^[0-9]+$ && "$RELIABILITY_EVENTS" -gt 0 ]] \
    || die "RELIABILITY_EVENTS must be a positive number, got '$RELIABILITY_EVENTS'"
[[ "$RELIABILITY_TIMEOUT" =~ ^[0-9]+$ && "$RELIABILITY_TIMEOUT" -gt 0 ]] \
    || die "RELIABILITY_TIMEOUT must be a positive number of seconds, got '$RELIABILITY_TIMEOUT'"
have python3 || die "python3 is needed to print the report"

ensure_cargo

SCENARIO_PID=""
RUN_TMP=""

# Stops a scenario's process group (the test, its workers) and any broker of
# its own that it left behind.
stop_leftovers() {
    local state port
    if [[ -n "$SCENARIO_PID" ]] && pid_alive "$SCENARIO_PID"; then
        kill -TERM -- "-$SCENARIO_PID" 2>/dev/null || true
        sleep 5
        kill -KILL -- "-$SCENARIO_PID" 2>/dev/null || true
    fi
    SCENARIO_PID=""
    [[ -n "$RUN_TMP" ]] || return 0
    for state in "$RUN_TMP"/reliability-kafka*/state; do
        [[ -f "$state" ]] || continue
        port="$(state_get "$state" port)"
        log "stopping the broker a scenario left on port $port"
        KAFKA_STATE_DIR="$(dirname "$state")" KAFKA_PORT="$port" KAFKA_KEEP_DATA=0 \
            bash "$SCRIPT_DIR/kafka.sh" stop || true
    done
}

# Called by session_end.
# shellcheck disable=SC2317
session_on_exit() {
    stop_leftovers
    if [[ -n "$RUN_TMP" ]]; then
        rm -rf "$RUN_TMP"
    fi
    log "finished in $((SECONDS / 60))m$((SECONDS % 60))s (exit $1)"
}
session_begin reliability

# The same services as scripts/test.sh.
session_isolated_services

mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/report.jsonl"
: >"$REPORT"
RUN_TMP="$(mktemp -d /tmp/booking-worker-reliability.XXXXXX)"
export BOOKING_WORKER_REQUIRE_SERVICES=1 RELIABILITY_EVENTS RELIABILITY_REPORT="$REPORT"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}" TMPDIR="$RUN_TMP"
if [[ -n "${RELIABILITY_SEED:-}" ]]; then
    export RELIABILITY_SEED
fi

cd "$ROOT_DIR"
log "Kafka: $KAFKA_BROKERS; PostgreSQL: $DB_USER@$DB_HOST:$DB_PORT/$DB_NAME"
log "building (cargo test --release --locked --test reliability --no-run)"
cargo test --release --locked --test reliability --no-run

mapfile -t ALL < <(cargo test --release --locked --test reliability -- --list 2>/dev/null | sed -n 's/: test$//p')
[[ ${#ALL[@]} -gt 0 ]] || die "tests/reliability/main.rs lists no scenario"
SCENARIOS=()
for name in "${ALL[@]}"; do
    if [[ $# -eq 0 ]]; then
        SCENARIOS+=("$name")
        continue
    fi
    for want in "$@"; do
        if [[ "$name" == *"$want"* ]]; then
            SCENARIOS+=("$name")
            break
        fi
    done
done
[[ ${#SCENARIOS[@]} -gt 0 ]] || die "no scenario matches: $*"

declare -A RESULT=()
for name in "${SCENARIOS[@]}"; do
    section "$name ($RELIABILITY_EVENTS bookings, at most ${RELIABILITY_TIMEOUT}s)"
    scenario_log="$OUT_DIR/$name.log"
    started=$SECONDS
    # A session of its own, so that a timeout stops the test and its workers together.
    setsid cargo test --release --locked --test reliability -- --exact "$name" --test-threads=1 --nocapture \
        >"$scenario_log" 2>&1 &
    SCENARIO_PID=$!
    timed_out=0
    while pid_alive "$SCENARIO_PID"; do
        if ((SECONDS - started > RELIABILITY_TIMEOUT)); then
            warn "$name ran over ${RELIABILITY_TIMEOUT}s; stopping it"
            timed_out=1
            stop_leftovers
            break
        fi
        sleep 1
    done
    rc=0
    wait "$SCENARIO_PID" 2>/dev/null || rc=$?
    SCENARIO_PID=""
    stop_leftovers
    grep -E '^\[[a-z-]+\] ' "$scenario_log" | grep -v ' stderr\] ' >&2 || true
    if [[ "$timed_out" == 1 ]]; then
        RESULT[$name]="timed out"
    elif [[ "$rc" != 0 ]]; then
        RESULT[$name]="failed (exit $rc, see $scenario_log)"
        grep -E -A12 "panicked at" "$scenario_log" | head -n 40 >&2 || true
    else
        RESULT[$name]="passed"
    fi
    log "$name: ${RESULT[$name]} after $((SECONDS - started))s"
done

results="$RUN_TMP/results.tsv"
: >"$results"
for name in "${SCENARIOS[@]}"; do
    printf '%s\t%s\n' "$name" "${RESULT[$name]}" >>"$results"
done

echo
status=0
python3 - "$REPORT" "$results" <<'PY' || status=$?
import json, sys

report, results = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(report) if line.strip()]
outcome = [line.rstrip("\n").split("\t", 1) for line in open(results) if line.strip()]
cols = ["scenario", "events", "applied", "dead-lettered", "lost", "duplicated", "recover s", "longest pause s", "total s", "result"]
table = []
bad = False
for name, result in outcome:
    found = [r for r in rows if r.get("test") == name]
    if not found:
        table.append([name, "-", "-", "-", "-", "-", "-", "-", "-", result])
        bad = True
        continue
    r = found[-1]
    ok = result == "passed" and r["lost"] == 0 and r["duplicated"] == 0 and r.get("mismatched", 0) == 0
    bad = bad or not ok
    rec = "-" if r["recover_seconds"] is None else f'{r["recover_seconds"]:.2f}'
    table.append([r["scenario"], r["events"], r["applied"], r["dead_lettered"], r["lost"], r["duplicated"],
                  rec, f'{r.get("longest_pause_seconds", 0):.2f}', f'{r["seconds"]:.1f}', result])
widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)]
line = lambda cells: "  ".join(str(c).rjust(w) if i not in (0, len(cols) - 1) else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths)))
print(line(cols))
print(line(["-" * w for w in widths]))
for row in table:
    print(line(row))
sys.exit(1 if bad else 0)
PY
log "report: $REPORT; logs: $OUT_DIR/<scenario>.log"
exit "$status"
