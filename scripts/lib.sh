#!/usr/bin/env bash
# Shared helpers for the booking-worker service and CI scripts.
#
# Source it, don't run it:   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Conventions used by every script that sources this file:
#   - progress and errors go to stderr (log/warn/die), so stdout stays free
#     for the machine-readable lines a script promises (KAFKA_BROKERS=...,
#     export DB_...=...);
#   - every service binds 127.0.0.1 only.

set -euo pipefail

# Guard against being sourced twice.
if [[ -n "${BOOKING_WORKER_LIB_SOURCED:-}" ]]; then
    return 0
fi
BOOKING_WORKER_LIB_SOURCED=1

# Name shown in log lines: the script that sourced us.
LOG_TAG="${LOG_TAG:-$(basename "${0:-lib.sh}" .sh)}"

log() {
    printf '[%s] %s\n' "$LOG_TAG" "$*" >&2
}

warn() {
    printf '[%s] WARNING: %s\n' "$LOG_TAG" "$*" >&2
}

die() {
    printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2
    exit 1
}

# Print a section header (used by CI so each step is easy to find in the log).
section() {
    printf '\n==== %s ====\n' "$*" >&2
}

is_root() {
    [[ "$(id -u)" -eq 0 ]]
}

have() {
    command -v "$1" >/dev/null 2>&1
}

# True if a TCP connection to host:port succeeds within ~1 s.
port_open() {
    local host="$1" port="$2"
    # $0/$1 are expanded by the inner bash, on purpose.
    # shellcheck disable=SC2016
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" >/dev/null 2>&1
}

# True if something listens on (or a connection succeeds to) the local port.
port_in_use() {
    local port="$1"
    if have ss; then
        if [[ -n "$(ss -Htan "sport = :$port" 2>/dev/null)" ]]; then
            return 0
        fi
    fi
    port_open 127.0.0.1 "$port"
}

# Print a currently free TCP port on 127.0.0.1. Optional arguments are ports
# that must not be returned (e.g. one already picked but not yet bound).
# Ports come from 20000-32199, below Linux's ephemeral range (32768+), so an
# outgoing connection cannot take the port before the service binds it.
free_port() {
    local port attempt skip taken
    for attempt in $(seq 1 200); do
        : "$attempt"
        port=$((20000 + RANDOM % 12200))
        taken=0
        for skip in "$@"; do
            if [[ "$skip" == "$port" ]]; then taken=1; fi
        done
        if [[ "$taken" -eq 0 ]] && ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
    done
    die "could not find a free TCP port"
}

# True if the process with this pid exists and is not a zombie (a child that
# died but was not reaped yet still answers kill -0).
pid_alive() {
    local pid="${1:-}" stat
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }"
        [[ "${stat:0:1}" != Z ]] || return 1
    fi
    return 0
}

# Read key from a key=value state file; prints nothing if absent.
state_get() {
    local file="$1" key="$2"
    [[ -f "$file" ]] || return 0
    sed -n "s/^${key}=//p" "$file" | tail -n 1
}

# apt-get install the given packages (root only). Runs `apt-get update` at
# most once per process, and only when something is actually installed.
APT_UPDATED="${APT_UPDATED:-0}"
apt_install() {
    [[ $# -gt 0 ]] || return 0
    is_root || die "need root to apt-get install: $*"
    have apt-get || die "apt-get not found; install manually: $*"
    export DEBIAN_FRONTEND=noninteractive
    if [[ "$APT_UPDATED" != 1 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
        export APT_UPDATED
    fi
    log "apt-get install -y $*"
    apt-get install -y -qq --no-install-recommends "$@" >&2
}

# help_from_header FILE: prints the comment block at the top of FILE (after
# the #! line), without the leading "# ": a script's --help.
help_from_header() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
}

# psql_db DB [psql arguments]: psql as DB_USER on DB_HOST:DB_PORT, database
# DB, stopping at the first error; the password goes through the environment.
psql_db() {
    local db="$1"
    shift
    PGPASSWORD="$DB_PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h "$DB_HOST" -p "$DB_PORT" -U "$DB_USER" -d "$db" "$@"
}

# True if the Debian package is installed.
deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Java major version ("17"), or empty if java is missing.
java_major() {
    have java || return 0
    java -version 2>&1 | sed -n '1s/.*version "\([0-9]*\)[."].*/\1/p'
}

# Make sure java >= 17 is on PATH, installing it when root.
ensure_java() {
    local major
    major="$(java_major)"
    if [[ -z "$major" || "$major" -lt 17 ]]; then
        if is_root && have apt-get; then
            apt_install openjdk-17-jre-headless
            major="$(java_major)"
        fi
    fi
    [[ -n "$major" ]] || die "java not found: install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)"
    [[ "$major" -ge 17 ]] || die "java $major is too old: Kafka 4.x needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
}

# Make sure mvn is on PATH, installing it when root.
ensure_maven() {
    if ! have mvn && is_root && have apt-get; then
        apt_install maven
    fi
    have mvn || die "mvn not found: install Apache Maven (Debian: apt-get install maven)"
}

# True if any host:port of a comma-separated broker list accepts TCP.
brokers_answer() {
    local list="$1" entry host port
    local -a entries
    IFS=',' read -r -a entries <<<"$list"
    for entry in "${entries[@]}"; do
        entry="${entry// /}"
        entry="${entry#*://}"
        host="${entry%:*}"
        port="${entry##*:}"
        [[ "$port" =~ ^[0-9]+$ && -n "$host" ]] || continue
        if port_open "$host" "$port"; then
            return 0
        fi
    done
    return 1
}

# ---- Services for one command --------------------------------------------
# run.sh, test.sh and the other entry points start what is missing and stop,
# on exit (also on failure or Ctrl-C), exactly what they started.

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Puts rustup's cargo on PATH (its env file) when a bare shell lacks it.
load_cargo_env() {
    if ! have cargo && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
}

# Makes cargo reachable (rustup's env file) or dies.
ensure_cargo() {
    load_cargo_env
    have cargo || die "cargo not found: install Rust with rustup, then run scripts/install-deps.sh"
}

# session_begin NAME: a temp dir for the services this command starts, and
# traps that stop them on exit. A function session_on_exit, if defined, is
# called last with the exit code.
session_begin() {
    SESSION_DIR="$(mktemp -d "/tmp/booking-worker-$1.XXXXXX")"
    SESSION_KAFKA=0
    SESSION_PG=0
    trap session_end EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Called through the EXIT trap.
# shellcheck disable=SC2317
session_end() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ "$SESSION_KAFKA" == 1 ]]; then
        KAFKA_STATE_DIR="$SESSION_DIR/kafka" bash "$LIB_DIR/kafka.sh" stop
    fi
    if [[ "$SESSION_PG" == 1 ]]; then
        PG_STATE_DIR="$SESSION_DIR/pg" bash "$LIB_DIR/postgres.sh" stop
    fi
    rm -rf "$SESSION_DIR"
    if declare -F session_on_exit >/dev/null; then
        session_on_exit "$rc"
    fi
    exit "$rc"
}

# The one user of the SASL_PLAINTEXT (mechanism PLAIN) listener of the
# broker that scripts/kafka.sh starts. Fixed, test-only credentials.
KAFKA_TEST_SASL_USERNAME=booking-worker
KAFKA_TEST_SASL_PASSWORD=booking-worker-secret

# Uses KAFKA_BROKERS when it answers; otherwise starts a broker (on
# KAFKA_PORT, default 9092) for this session. Exports KAFKA_BROKERS.
# When it starts the broker, also exports KAFKA_SASL_BROKERS (its
# SASL_PLAINTEXT listener) with KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD
# (mechanism PLAIN). With a broker it did not start, it leaves those three as
# the caller set them (possibly unset).
session_kafka() {
    if [[ -n "${KAFKA_BROKERS:-}" ]] && brokers_answer "$KAFKA_BROKERS"; then
        log "using Kafka at $KAFKA_BROKERS"
    else
        if [[ -n "${KAFKA_BROKERS:-}" ]]; then
            log "no broker answers at $KAFKA_BROKERS; starting one"
        fi
        SESSION_KAFKA=1
        local out sasl_brokers
        out="$(KAFKA_STATE_DIR="$SESSION_DIR/kafka" bash "$LIB_DIR/kafka.sh" start)"
        KAFKA_BROKERS="$(printf '%s\n' "$out" | sed -n 's/^KAFKA_BROKERS=//p' | tail -n 1)"
        [[ -n "$KAFKA_BROKERS" ]] || die "scripts/kafka.sh start printed no KAFKA_BROKERS line"
        # No such line when kafka.sh found a broker it did not start.
        sasl_brokers="$(printf '%s\n' "$out" | sed -n 's/^KAFKA_SASL_BROKERS=//p' | tail -n 1)"
        if [[ -n "$sasl_brokers" ]]; then
            KAFKA_SASL_BROKERS="$sasl_brokers"
            KAFKA_SASL_USERNAME="$KAFKA_TEST_SASL_USERNAME"
            KAFKA_SASL_PASSWORD="$KAFKA_TEST_SASL_PASSWORD"
            export KAFKA_SASL_BROKERS KAFKA_SASL_USERNAME KAFKA_SASL_PASSWORD
        fi
    fi
    export KAFKA_BROKERS
}

# Uses the DB_* server when its login works; otherwise starts a throwaway
# cluster for this session. Exports the DB_* variables. Returns 0 when it
# started the cluster itself, 1 when it uses a configured server.
session_postgres() {
    local out exports
    out="$(PG_STATE_DIR="$SESSION_DIR/pg" bash "$LIB_DIR/postgres.sh" start)"
    exports="$(printf '%s\n' "$out" | grep '^export DB_' || true)"
    [[ -n "$exports" ]] || die "scripts/postgres.sh start printed no export lines"
    eval "$exports"
    if [[ -f "$SESSION_DIR/pg/state" ]]; then
        SESSION_PG=1
        return 0
    fi
    return 1
}

# Services for tests and benchmarks, isolated from a developer's own: a
# broker on free ports unless KAFKA_BROKERS answers, and a throwaway cluster
# on a free port unless DB_HOST or DB_PORT is set.
session_isolated_services() {
    if [[ -z "${KAFKA_BROKERS:-}" ]] || ! brokers_answer "$KAFKA_BROKERS"; then
        KAFKA_PORT="$(free_port)"
        KAFKA_CONTROLLER_PORT="$(free_port "$KAFKA_PORT")"
        export KAFKA_PORT KAFKA_CONTROLLER_PORT
    fi
    session_kafka
    PG_PORT="$(free_port "${KAFKA_PORT:-}" "${KAFKA_CONTROLLER_PORT:-}")"
    export PG_PORT
    if [[ -z "${DB_HOST:-}" && -z "${DB_PORT:-}" ]]; then
        export DB_HOST=127.0.0.1 DB_PORT="$PG_PORT"
    fi
    session_postgres || true
}
