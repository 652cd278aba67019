#!/usr/bin/env bash
# Shared by scripts/container-image.sh, tests/container/run-image.sh and
# tests/container/run-systemd.sh: podman with the tests' own containers.conf,
# the image names, and small helpers. Source it after scripts/lib.sh.
#
#   CONTAINERS_CONF   default: tests/container/containers.conf (podman reads
#                     it instead of /etc/containers/containers.conf)
#   IMAGE             the worker image (default localhost/booking-worker:test)
#   SYSTEMD_IMAGE     the systemd test image
#                     (default localhost/booking-worker-systemd:test)
#   BASE_IMAGE        localhost/debian:bookworm-slim, the local stand-in for
#                     debian:bookworm-slim (scripts/container-image.sh); fixed
#
# A script that finds no podman exits with EXIT_NO_ENGINE (77), so that a
# caller can tell "cannot run here" from a failure.

set -euo pipefail

CONTAINER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$CONTAINER_DIR/../.." && pwd)"

export CONTAINERS_CONF="${CONTAINERS_CONF:-$CONTAINER_DIR/containers.conf}"
IMAGE="${IMAGE:-localhost/booking-worker:test}"
SYSTEMD_IMAGE="${SYSTEMD_IMAGE:-localhost/booking-worker-systemd:test}"
# Fixed: the Dockerfile and Containerfile.systemd name debian:bookworm-slim.
# shellcheck disable=SC2034 # used by the scripts that source this file
BASE_IMAGE=localhost/debian:bookworm-slim
EXIT_NO_ENGINE=77

require_podman() {
    if ! have podman; then
        printf '[%s] ERROR: podman not found (Debian: scripts/install-deps.sh, or apt-get install --no-install-recommends podman runc slirp4netns uidmap fuse-overlayfs catatonit)\n' "$LOG_TAG" >&2
        exit "$EXIT_NO_ENGINE"
    fi
}

# Seconds since the epoch, with milliseconds.
now() {
    date +%s.%3N
}

# elapsed START: seconds since START (from `now`), to one decimal.
elapsed() {
    awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f\n", b - a }'
}

# past START LIMIT: true once more than LIMIT seconds have gone by since START.
past() {
    awk -v e="$(elapsed "$1")" -v t="$2" 'BEGIN { exit !(e > t) }'
}

# http_status HOST:PORT PATH: the status code of GET PATH (HTTP/1.0), or 000
# when nothing answers within 3 s.
http_status() {
    local addr="$1" path="$2" line
    # $0..$2 are expanded by the inner bash, on purpose.
    # shellcheck disable=SC2016
    line="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3
        head -n 1 <&3' "${addr%:*}" "${addr##*:}" "$path" 2>/dev/null || true)"
    line="${line#HTTP/* }"
    line="${line%% *}"
    if [[ "$line" =~ ^[0-9]{3}$ ]]; then
        echo "$line"
    else
        echo 000
    fi
}

# worker_status HOST:PORT: the status code of the worker's /healthz, or, when
# that is 200 and WAIT_READY=1, of its /readyz.
worker_status() {
    local code
    code="$(http_status "$1" /healthz)"
    if [[ "$code" == 200 && "${WAIT_READY:-0}" == 1 ]]; then
        code="$(http_status "$1" /readyz)"
    fi
    echo "$code"
}

# Names of the variables the worker reads: those of scripts/booking-worker.env
# (commented out or not), one per line.
worker_variable_names() {
    sed -n 's/^#\{0,1\}\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$REPO_DIR/scripts/booking-worker.env" | sort -u
}

# The worker variables that the caller's environment sets, NAME=value, one
# per line: every name of scripts/booking-worker.env, and KAFKA_PROP_*.
# METRICS_ADDR is left out (the scripts choose it).
worker_environment() {
    local name
    {
        worker_variable_names
        compgen -e | grep '^KAFKA_PROP_' || true
    } | sort -u | while read -r name; do
        if [[ "$name" != METRICS_ADDR && -n "${!name+set}" ]]; then
            printf '%s=%s\n' "$name" "${!name}"
        fi
    done
}

# require_env NAME...: dies naming the unset ones.
require_env() {
    local name missing=()
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || missing+=("$name")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "not set: ${missing[*]}"
}
