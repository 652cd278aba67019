#!/usr/bin/env bash
# PostgreSQL for local development and tests of booking-worker.
#
# `start` uses the server that the DB_* variables point at when it accepts
# that login; otherwise it starts a throwaway cluster (initdb in a temp dir,
# 127.0.0.1 only, a free port) and records it so `stop`/`env` find it.
#
# Usage: scripts/postgres.sh start|stop|status|env
#
# Environment (the same variables the worker reads):
#   DB_HOST      default localhost
#   DB_PORT      default 5432
#   DB_USER      default postgres (superuser of a throwaway cluster)
#   DB_PASSWORD  default postgres
#   DB_NAME      default booking_management (created if missing)
# Script settings:
#   PG_STATE_DIR  state of the throwaway cluster (default /tmp/booking-worker-pg)
#   PG_PORT       port for a throwaway cluster (default DB_PORT if free, else
#                 a free port)
#   PG_BINDIR     directory with initdb/pg_ctl (default: found automatically)
#   PG_START_TIMEOUT  seconds pg_ctl waits for startup (default 60)
#
# TLS: a throwaway cluster offers TLS (`ssl = on`) with certificates made by
# the openssl CLI at startup in <cluster root>/tls/, valid for 30 days:
#   ca.crt        self-signed test CA that signed the server certificate
#   server.crt    CN=localhost, subjectAltName DNS:localhost, IP:127.0.0.1
#   other-ca.crt  an unrelated self-signed CA (signed nothing), so a test can
#                 check that verification against the wrong CA fails
# (plus ca.key and server.key, mode 0600, owned by the cluster owner). Tests
# find the CA beside the server certificate: `SHOW ssl_cert_file` -> its
# directory -> ca.crt, other-ca.crt. The CA files and their directory are
# world-readable, so a test running as root or as another user can read them.
# Password (scram-sha-256) login works with and without TLS, so
# sslmode=disable still connects. Without openssl the cluster starts without
# TLS (with a warning); a server this script did not start may not offer TLS
# either, so tests check `SHOW ssl` first.
#
# Output: progress goes to stderr. `start` and `env` print, as their last
# stdout lines, shell-sourceable `export DB_HOST=...` lines for all five DB_
# variables, e.g.   eval "$(scripts/postgres.sh start)"
# `status` exits 0 when the throwaway cluster (or the configured server)
# answers, 1 otherwise.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="postgres"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

DB_HOST="${DB_HOST:-localhost}"
DB_PORT="${DB_PORT:-5432}"
DB_USER="${DB_USER:-postgres}"
DB_PASSWORD="${DB_PASSWORD:-postgres}"
DB_NAME="${DB_NAME:-booking_management}"

PG_STATE_DIR="${PG_STATE_DIR:-/tmp/booking-worker-pg}"
STATE_FILE="$PG_STATE_DIR/state"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
# System user that owns a throwaway cluster when we run as root.
PG_OS_USER=postgres

# --------------------------------------------------------------------------
# Helpers

# psql on PATH, else the one next to the server binaries.
psql_bin() {
    if have psql; then
        command -v psql
        return 0
    fi
    local dir
    dir="$(find_bindir)"
    if [[ -n "$dir" && -x "$dir/psql" ]]; then
        echo "$dir/psql"
    fi
}

# Run psql against host/port/user/password/database, extra args follow.
# The password is passed through the environment, never on the command line.
pg_psql() {
    local host="$1" port="$2" user="$3" password="$4" db="$5" psql
    shift 5
    psql="$(psql_bin)"
    [[ -n "$psql" ]] || return 1
    PGPASSWORD="$password" PGCONNECT_TIMEOUT=5 "$psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$host" -p "$port" -U "$user" -d "$db" "$@"
}

# True if host/port/user/password can log in (to DB_NAME, `postgres` or
# `template1`). pg_isready first, so an absent server is detected quickly.
can_login() {
    local host="$1" port="$2" user="$3" password="$4" db isready
    isready="$(dirname "$(psql_bin)")/pg_isready"
    if [[ -x "$isready" ]] && ! "$isready" -q -h "$host" -p "$port" -t 3 >/dev/null 2>&1; then
        return 1
    fi
    for db in "$DB_NAME" postgres template1; do
        if pg_psql "$host" "$port" "$user" "$password" "$db" -Atc 'SELECT 1' \
            </dev/null >/dev/null 2>&1; then
            return 0
        fi
    done
    return 1
}

# Create DB_NAME on the given server unless it exists.
ensure_database() {
    local host="$1" port="$2" user="$3" password="$4" admin_db="" db exists
    for db in postgres template1 "$DB_NAME"; do
        if pg_psql "$host" "$port" "$user" "$password" "$db" -Atc 'SELECT 1' \
            </dev/null >/dev/null 2>&1; then
            admin_db="$db"
            break
        fi
    done
    [[ -n "$admin_db" ]] || die "cannot log in to $host:$port as $DB_USER"
    # Variables are interpolated only in psql's input, not in -c strings.
    exists="$(printf '%s\n' "SELECT 1 FROM pg_database WHERE datname = :'name';" \
        | pg_psql "$host" "$port" "$user" "$password" "$admin_db" -At -v name="$DB_NAME")"
    if [[ "$exists" != 1 ]]; then
        log "creating database $DB_NAME"
        printf '%s\n' 'CREATE DATABASE :"name";' \
            | pg_psql "$host" "$port" "$user" "$password" "$admin_db" -v name="$DB_NAME" >&2
    fi
}

print_env() {
    local host="$1" port="$2"
    printf 'export DB_HOST=%q\n' "$host"
    printf 'export DB_PORT=%q\n' "$port"
    printf 'export DB_USER=%q\n' "$DB_USER"
    printf 'export DB_PASSWORD=%q\n' "$DB_PASSWORD"
    printf 'export DB_NAME=%q\n' "$DB_NAME"
}

# Directory holding initdb and pg_ctl, or empty.
find_bindir() {
    local dir
    if [[ -n "${PG_BINDIR:-}" ]]; then
        echo "$PG_BINDIR"
        return 0
    fi
    if have pg_config; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    fi
    for dir in $(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V -r); do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    if have initdb && have pg_ctl; then
        dirname "$(command -v initdb)"
    fi
}

# Run a server binary as the cluster owner (root may not run initdb/postgres).
as_owner() {
    if is_root; then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

ensure_os_user() {
    is_root || return 0
    if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
        log "creating system user $PG_OS_USER"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$PG_OS_USER"
    fi
}

# True if the throwaway cluster recorded in the state file is running: its
# postmaster.pid names a live process (pid_alive also rejects a killed but
# not yet reaped one, which `pg_ctl status` would count as running).
cluster_running() {
    local data_dir pid
    [[ -f "$STATE_FILE" ]] || return 1
    data_dir="$(state_get "$STATE_FILE" data_dir)"
    [[ -n "$data_dir" && -f "$data_dir/postmaster.pid" ]] || return 1
    pid="$(head -n 1 "$data_dir/postmaster.pid" 2>/dev/null || true)"
    pid_alive "$pid"
}

remove_cluster_files() {
    local root
    root="$(state_get "$STATE_FILE" root)"
    if [[ -n "$root" && "$root" != "/" && -d "$root" ]]; then
        rm -rf "$root"
    fi
    rm -rf "$PG_STATE_DIR"
}

# Write an openssl config for `req` with subject CN=$2 and the sections for
# a CA (v3_ca) and a server certificate (v3_server) to file $1.
write_openssl_config() {
    local file="$1" cn="$2"
    cat >"$file" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $cn
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
}

# Make the test certificates (see the header) in directory $1, which must
# not exist yet: EC P-256 keys, valid for 30 days. openssl's output goes to
# $1/openssl.log (kept only on failure). Returns non-zero if any step fails.
# Every step has its own `|| exit 1`: set -e would be ignored here, as the
# caller tests the result.
make_test_certs() {
    local dir="$1"
    mkdir "$dir" || return 1
    (
        cd "$dir" || exit 1
        umask 077
        exec 2>openssl.log
        days=30
        for name in ca other-ca; do
            openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
                -pkeyopt ec_param_enc:named_curve -out "$name.key" >&2 || exit 1
            write_openssl_config "$name.cnf" "booking-worker test $name" || exit 1
            openssl req -new -x509 -config "$name.cnf" -extensions v3_ca -key "$name.key" \
                -sha256 -days "$days" -set_serial "0x$(openssl rand -hex 16)" \
                -out "$name.crt" >&2 || exit 1
        done
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
            -pkeyopt ec_param_enc:named_curve -out server.key >&2 || exit 1
        write_openssl_config server.cnf localhost || exit 1
        openssl req -new -config server.cnf -key server.key -out server.csr >&2 || exit 1
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key \
            -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
            -extfile server.cnf -extensions v3_server -out server.crt >&2 || exit 1
        openssl verify -CAfile ca.crt server.crt >&2 || exit 1
        # Nothing is signed with other-ca.key: only its certificate is kept.
        rm -f ./*.cnf server.csr other-ca.key || exit 1
        chmod 644 ca.crt other-ca.crt server.crt || exit 1
        chmod 600 ca.key server.key || exit 1
    ) || return 1
    rm -f "$dir/openssl.log"
    chmod 755 "$dir"
}

# --------------------------------------------------------------------------
# Throwaway cluster

start_cluster() {
    local bindir root data port
    bindir="$(find_bindir)"
    if [[ -z "$bindir" ]] && is_root && have apt-get; then
        log "PostgreSQL server binaries not found; installing the postgresql package"
        apt_install postgresql
        bindir="$(find_bindir)"
    fi
    if [[ -z "$bindir" || ! -x "$bindir/initdb" || ! -x "$bindir/pg_ctl" ]]; then
        die "PostgreSQL server binaries (initdb, pg_ctl) not found. Install them (Debian: apt-get install postgresql), set PG_BINDIR, or point DB_HOST/DB_PORT/DB_USER/DB_PASSWORD at a running server."
    fi
    ensure_os_user

    port="${PG_PORT:-}"
    if [[ -z "$port" ]]; then
        port="$DB_PORT"
        if port_in_use "$port"; then
            port="$(free_port "$DB_PORT")"
        fi
    elif port_in_use "$port"; then
        die "PG_PORT $port is already in use"
    fi

    # /tmp (not TMPDIR): the cluster owner must be able to reach it.
    root="$(mktemp -d /tmp/booking-worker-pg-cluster.XXXXXX)"
    data="$root/data"
    mkdir -p "$root/socket" "$PG_STATE_DIR"
    chmod 700 "$PG_STATE_DIR"
    {
        echo "root=$root"
        echo "data_dir=$data"
        echo "bindir=$bindir"
        echo "port=$port"
    } >"$STATE_FILE"
    chmod 600 "$STATE_FILE"

    local pwfile="$root/pwfile"
    (umask 077 && printf '%s\n' "$DB_PASSWORD" >"$pwfile")
    if is_root; then
        chown -R "$PG_OS_USER:" "$root"
    fi

    log "initdb ($bindir) in $data"
    if ! as_owner "$bindir/initdb" -D "$data" --username="$DB_USER" --pwfile="$pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --no-locale \
        >"$root/initdb.log" 2>&1; then
        cat "$root/initdb.log" >&2
        remove_cluster_files
        die "initdb failed"
    fi
    rm -f "$pwfile"

    cat >>"$data/postgresql.conf" <<EOF

# Added by scripts/postgres.sh: throwaway cluster for tests.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$root/socket'
max_connections = 200
shared_buffers = 128MB
# Tests check durability: keep fsync on.
fsync = on
logging_collector = off
log_min_messages = warning
EOF

    # TLS (see the header). The cluster root becomes traversable (0711, not
    # listable) so that other users reach tls/; the socket directory stays
    # private, as local connections are trusted.
    if ! have openssl; then
        warn "openssl not found: starting the throwaway cluster without TLS"
    elif make_test_certs "$root/tls"; then
        if is_root; then
            chown -R "$PG_OS_USER:" "$root/tls"
        fi
        chmod 700 "$root/socket"
        chmod 711 "$root"
        cat >>"$data/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = '$root/tls/server.crt'
ssl_key_file = '$root/tls/server.key'
EOF
        log "TLS on; test CA $root/tls/ca.crt"
    else
        cat "$root/tls/openssl.log" >&2 || true
        rm -rf "$root/tls"
        warn "could not make the test certificates: starting the throwaway cluster without TLS"
    fi

    log "starting PostgreSQL on 127.0.0.1:$port (log $root/postgres.log)"
    if ! as_owner "$bindir/pg_ctl" -D "$data" -l "$root/postgres.log" -w \
        -t "$PG_START_TIMEOUT" start >&2; then
        tail -n 50 "$root/postgres.log" >&2 || true
        as_owner "$bindir/pg_ctl" -D "$data" stop -m immediate >/dev/null 2>&1 || true
        remove_cluster_files
        die "PostgreSQL did not start"
    fi
}

# --------------------------------------------------------------------------
# Commands

cmd_start() {
    local port
    if [[ -f "$STATE_FILE" ]]; then
        if cluster_running; then
            port="$(state_get "$STATE_FILE" port)"
            log "throwaway cluster already running on 127.0.0.1:$port"
            ensure_database 127.0.0.1 "$port" "$DB_USER" "$DB_PASSWORD"
            print_env 127.0.0.1 "$port"
            return 0
        fi
        log "removing stale throwaway cluster files ($PG_STATE_DIR)"
        remove_cluster_files
    fi

    if [[ -n "$(psql_bin)" ]] && can_login "$DB_HOST" "$DB_PORT" "$DB_USER" "$DB_PASSWORD"; then
        log "using the running server at $DB_HOST:$DB_PORT"
        ensure_database "$DB_HOST" "$DB_PORT" "$DB_USER" "$DB_PASSWORD"
        print_env "$DB_HOST" "$DB_PORT"
        return 0
    fi

    start_cluster
    port="$(state_get "$STATE_FILE" port)"
    ensure_database 127.0.0.1 "$port" "$DB_USER" "$DB_PASSWORD"
    log "PostgreSQL ready on 127.0.0.1:$port, database $DB_NAME"
    print_env 127.0.0.1 "$port"
}

cmd_stop() {
    if [[ ! -f "$STATE_FILE" ]]; then
        log "no throwaway cluster recorded in $PG_STATE_DIR; nothing to stop"
        return 0
    fi
    local bindir data
    bindir="$(state_get "$STATE_FILE" bindir)"
    data="$(state_get "$STATE_FILE" data_dir)"
    if cluster_running; then
        log "stopping throwaway cluster ($data)"
        as_owner "$bindir/pg_ctl" -D "$data" stop -m fast -w -t 60 >&2 \
            || as_owner "$bindir/pg_ctl" -D "$data" stop -m immediate -w >&2 \
            || warn "pg_ctl stop failed"
    fi
    remove_cluster_files
    log "stopped"
}

cmd_status() {
    local port
    if cluster_running; then
        port="$(state_get "$STATE_FILE" port)"
        log "throwaway cluster running on 127.0.0.1:$port ($(state_get "$STATE_FILE" data_dir))"
        return 0
    fi
    if [[ -n "$(psql_bin)" ]] && can_login "$DB_HOST" "$DB_PORT" "$DB_USER" "$DB_PASSWORD"; then
        log "configured server $DB_HOST:$DB_PORT accepts the login (not started by this script)"
        return 0
    fi
    log "no throwaway cluster running and $DB_HOST:$DB_PORT does not accept the login"
    return 1
}

cmd_env() {
    if cluster_running; then
        print_env 127.0.0.1 "$(state_get "$STATE_FILE" port)"
        return 0
    fi
    if [[ -n "$(psql_bin)" ]] && can_login "$DB_HOST" "$DB_PORT" "$DB_USER" "$DB_PASSWORD"; then
        print_env "$DB_HOST" "$DB_PORT"
        return 0
    fi
    die "no PostgreSQL available: run scripts/postgres.sh start"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
