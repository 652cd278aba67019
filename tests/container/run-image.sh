#!/usr/bin/env bash
# Runs the worker image (scripts/container-image.sh worker) with podman the way
# an operator would, against real services, for the container tests. It
# publishes nothing and reads no rows: the caller does, between subcommands.
#
# Usage: tests/container/run-image.sh SUBCOMMAND NAME
#
#   start NAME   podman run --detach --name NAME --network host --read-only
#                (and no tmpfs either: the worker writes no files), no --user
#                (the image's USER applies), with the caller's worker settings
#                and METRICS_ADDR=127.0.0.1:<free port>; waits until /healthz
#                answers 200, and with WAIT_READY=1 /readyz too (START_TIMEOUT
#                seconds, default 90). /healthz says the process and its
#                threads are alive (also while the database is unreachable);
#                /readyz that the database answers and partitions are held.
#                Prints CONTAINER=, CONTAINER_ID=, METRICS_ADDR=, READYZ=<status
#                of /readyz then>, START_SECONDS=.
#   health NAME  podman healthcheck run NAME (the image's HEALTHCHECK, i.e.
#                `booking-worker healthcheck`). Prints HEALTH=healthy|unhealthy;
#                exit 0 only when healthy.
#   uid NAME     the ids the container's main process runs with, read from
#                /proc/<pid>/status on the host (rootful podman, no user
#                namespace). Prints UID=, GID= (effective), IMAGE_USER= (the
#                image's USER).
#   rootfs NAME  tries to write / and /tmp inside the container as its user.
#                Prints READ_ONLY=<podman's ReadonlyRootfs>, ROOT_WRITE= and
#                TMP_WRITE= (refused|allowed); exit 0 when both are refused.
#   stop NAME    podman stop -t 45 NAME (one SIGTERM, SIGKILL after 45 s, the
#                unit's TimeoutStopSec). Prints EXIT_CODE=, STOP_SECONDS=.
#   kill NAME    podman kill --signal KILL NAME, waits for it. Prints EXIT_CODE=.
#   logs NAME    the container's output (the worker's JSON lines) on stdout.
#   rm NAME      podman rm --force NAME (no error when it does not exist).
#
# Environment of `start` (all required but the topics and group, whose
# defaults the worker has): KAFKA_BROKERS, DB_HOST, DB_PORT, DB_USER,
# DB_PASSWORD, DB_NAME, KAFKA_BOOKING_TOPIC, KAFKA_CANCELLATION_TOPIC,
# KAFKA_GROUP_ID. Every other variable that scripts/booking-worker.env names
# (SHUTDOWN_TIMEOUT_SECS, LOG_LEVEL, ...) and every KAFKA_PROP_* is passed
# when set. METRICS_PORT picks the metrics port instead of a free one. IMAGE,
# CONTAINERS_CONF: see tests/container/common.sh.
#
# Output: the KEY=value lines above on stdout, progress on stderr. Exit 1 on
# failure, 77 when podman is missing.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="run-image"
# shellcheck source=scripts/lib.sh
. "$HERE/../../scripts/lib.sh"
# shellcheck source=tests/container/common.sh
. "$HERE/common.sh"

STOP_TIMEOUT=45
START_TIMEOUT="${START_TIMEOUT:-90}"

usage() {
    die "usage: tests/container/run-image.sh start|health|uid|rootfs|stop|kill|logs|rm NAME"
}

[[ $# -eq 2 ]] || usage
cmd="$1"
name="$2"
require_podman

# podman without its complaint that it cannot set up the health-check timers
# when PID 1 is not systemd (it runs them as systemd timers); the `health`
# subcommand runs the check itself.
podman_q() {
    local err rc=0
    err="$(mktemp)"
    podman "$@" 2>"$err" || rc=$?
    grep -v 'unable to get systemd connection' "$err" >&2 || true
    rm -f "$err"
    return "$rc"
}

exists() {
    podman container exists "$name"
}

require_container() {
    exists || die "no container $name"
}

state() {
    podman inspect --format "$1" "$name"
}

cmd_start() {
    require_env KAFKA_BROKERS DB_HOST DB_PORT DB_USER DB_PASSWORD DB_NAME
    podman image exists "$IMAGE" || die "no image $IMAGE (build it: scripts/container-image.sh worker)"
    ! exists || die "container $name exists already (tests/container/run-image.sh rm $name)"
    local port addr t0 env_args=() line id code
    port="${METRICS_PORT:-$(free_port)}"
    addr="127.0.0.1:$port"
    while IFS= read -r line; do
        env_args+=(--env "$line")
    done < <(worker_environment)
    env_args+=(--env "METRICS_ADDR=$addr")
    t0="$(now)"
    log "podman run --name $name --network host --read-only $IMAGE (METRICS_ADDR=$addr)"
    id="$(podman_q run --detach --name "$name" --network host \
        --read-only --read-only-tmpfs=false \
        "${env_args[@]}" "$IMAGE")" || die "podman run failed"
    local want=/healthz
    [[ "${WAIT_READY:-0}" != 1 ]] || want=/readyz
    while :; do
        code="$(worker_status "$addr")"
        [[ "$code" != 200 ]] || break
        if [[ "$(state '{{.State.Running}}')" != true ]]; then
            podman logs --tail 30 "$name" >&2 || true
            die "container $name exited with $(state '{{.State.ExitCode}}') before /healthz answered"
        fi
        if past "$t0" "$START_TIMEOUT"; then
            podman logs --tail 30 "$name" >&2 || true
            die "$want of $name did not answer 200 within ${START_TIMEOUT}s (last: $code)"
        fi
        sleep 0.2
    done
    echo "CONTAINER=$name"
    echo "CONTAINER_ID=$id"
    echo "METRICS_ADDR=$addr"
    echo "READYZ=$(http_status "$addr" /readyz)"
    echo "START_SECONDS=$(elapsed "$t0")"
}

cmd_health() {
    require_container
    local out
    if out="$(podman healthcheck run "$name" 2>&1)"; then
        log "podman healthcheck run $name: ${out:-healthy}"
        echo "HEALTH=healthy"
    else
        log "podman healthcheck run $name: $out"
        echo "HEALTH=unhealthy"
        return 1
    fi
}

cmd_uid() {
    require_container
    local pid
    pid="$(state '{{.State.Pid}}')"
    [[ "$pid" =~ ^[1-9][0-9]*$ && -r "/proc/$pid/status" ]] || die "container $name is not running"
    # Uid:/Gid: lines are real, effective, saved, filesystem.
    echo "UID=$(awk '$1 == "Uid:" { print $3 }' "/proc/$pid/status")"
    echo "GID=$(awk '$1 == "Gid:" { print $3 }' "/proc/$pid/status")"
    echo "IMAGE_USER=$(podman image inspect --format '{{.Config.User}}' "$(state '{{.Image}}')")"
}

# write_probe PATH: refused|allowed, writing PATH inside the container.
write_probe() {
    local out
    if out="$(podman exec "$name" /bin/sh -c ": > '$1' && rm -f '$1'" 2>&1)"; then
        echo allowed
    else
        log "writing $1 in $name: $out"
        echo refused
    fi
}

cmd_rootfs() {
    require_container
    local root tmp
    root="$(write_probe /rootfs-write-probe)"
    tmp="$(write_probe /tmp/rootfs-write-probe)"
    echo "READ_ONLY=$(state '{{.HostConfig.ReadonlyRootfs}}')"
    echo "ROOT_WRITE=$root"
    echo "TMP_WRITE=$tmp"
    [[ "$root" == refused && "$tmp" == refused ]]
}

cmd_stop() {
    require_container
    local t0
    t0="$(now)"
    log "podman stop -t $STOP_TIMEOUT $name"
    podman_q stop --time "$STOP_TIMEOUT" "$name" >/dev/null
    echo "EXIT_CODE=$(state '{{.State.ExitCode}}')"
    echo "STOP_SECONDS=$(elapsed "$t0")"
}

cmd_kill() {
    require_container
    log "podman kill --signal KILL $name"
    podman_q kill --signal KILL "$name" >/dev/null
    podman wait "$name" >/dev/null 2>&1 || true
    echo "EXIT_CODE=$(state '{{.State.ExitCode}}')"
}

case "$cmd" in
    start) cmd_start ;;
    health) cmd_health ;;
    uid) cmd_uid ;;
    rootfs) cmd_rootfs ;;
    stop) cmd_stop ;;
    kill) cmd_kill ;;
    logs)
        require_container
        podman logs "$name" 2>&1
        ;;
    rm)
        podman_q rm --force --ignore --time 0 "$name" >/dev/null
        log "removed $name"
        ;;
    *) usage ;;
esac
