#!/usr/bin/env bash
# Runs scripts/booking-worker.service for real, under systemd as PID 1 of a
# container (the systemd test image of scripts/container-image.sh), against
# real services, for the unit tests. It publishes nothing and reads no rows:
# the caller does, between subcommands.
#
# Usage: tests/container/run-systemd.sh SUBCOMMAND [ARGS]
#
#   up          podman run --systemd=always --privileged --cgroupns=private
#               --network host SYSTEMD_IMAGE /sbin/init (--privileged: the
#               unit's sandboxing needs mount namespaces; --cgroupns=private:
#               see cmd_up); waits for the boot; then installs, as
#               the unit's header says, the binary at the unit's ExecStart
#               path, the unit as /etc/systemd/system/booking-worker.service
#               and, at the unit's EnvironmentFile path (root, 0600),
#               scripts/booking-worker.env with the caller's settings and
#               METRICS_ADDR=127.0.0.1:<free port> filled in; runs
#               systemd-analyze verify on the installed unit, daemon-reload
#               and enable. Prints CONTAINER=, METRICS_ADDR=, UP_SECONDS=.
#   start       systemctl start booking-worker (Type=notify: it returns once
#               the worker sent READY=1), watching the unit meanwhile; waits
#               until it is active and /healthz answers 200, with
#               WAIT_READY=1 /readyz too (START_TIMEOUT, default 90 s). Prints
#               ACTIVE_STATE=, MAIN_PID=, MAIN_UID= (its effective uid: the
#               dynamic user's), START_SECONDS=, STARTING_STATUS= (the
#               first StatusText seen while the unit was activating, empty
#               when none was seen), ACTIVE_AFTER_START= (ActiveState as
#               soon as systemctl start returned), STATUS_TEXT=.
#   status      systemctl show's ActiveState=, SubState=, Result=, MainPID=,
#               ExecMainCode=, ExecMainStatus=, NRestarts= lines, as it
#               prints them.
#   state       what systemd knows of the worker: ACTIVE_STATE=, SUB_STATE=,
#               RESULT=, MAIN_PID=, NRESTARTS=, STATUS_TEXT= (the worker's
#               last STATUS=), TYPE=, NOTIFY_ACCESS=, WATCHDOG_SEC= (the
#               last WatchdogSec= of the unit and its drop-ins, as written),
#               WATCHDOG_USEC= (the watchdog of the running worker as
#               systemctl prints it, e.g. 1min 30s; infinity when stopped).
#   dropin NAME [SETTING...]
#               writes the [Service] SETTINGs (e.g. WatchdogSec=10s) as the
#               drop-in /etc/systemd/system/booking-worker.service.d/NAME.conf,
#               or removes it when none is given; then daemon-reload. A
#               running worker keeps its environment until it is started
#               again.
#   wait-restart
#               (the service must be active) waits until systemd has
#               restarted the worker by itself (a new main PID, active, and
#               /healthz as for start; START_TIMEOUT counts from the call).
#               Prints OLD_MAIN_PID=, MAIN_PID=, NRESTARTS=, SEEN_RESULT=
#               (the first Result other than success seen meanwhile, e.g.
#               watchdog), WATCHDOG_TIMEOUTS= (systemd's "Watchdog timeout"
#               lines about the unit in the journal), RESTART_SECONDS=.
#   main-pid    MAIN_PID= (0 when not running).
#   kill9       kill -9 of the main PID; Restart=on-failure should start it
#               again after RestartSec: waits until a new main PID is active
#               and /healthz answers. Prints OLD_MAIN_PID=, MAIN_PID=,
#               NRESTARTS=, RESTART_SECONDS= (WAIT_READY as for start).
#   stop        systemctl stop booking-worker. Prints RESULT=, EXEC_MAIN_CODE=
#               (exited or killed), EXEC_MAIN_STATUS=, ACTIVE_STATE=,
#               STOP_SECONDS=, STATUS_TEXT= (what the worker said last).
#   bad-config  (the service must not be active) DB_PORT=notaport in the
#               environment file, start, watch it fail and stay failed for
#               RestartSec + 5 s, then restore the file and reset-failed.
#               Prints RESULT= (exit-code), EXEC_MAIN_STATUS= (2 expected),
#               NRESTARTS= (0 expected), ACTIVE_STATE=, MESSAGE= (the worker's
#               last log line).
#   journal     the worker's own log lines (journalctl _SYSTEMD_UNIT=
#               booking-worker.service -o cat: the JSON lines, without
#               systemd's lines about the unit) on stdout.
#   memorymax   (the service must be active) whether the unit's MemoryMax is
#               enforced: the limit file of the main process's memory cgroup
#               (cgroup v1 memory.limit_in_bytes, or v2 memory.max), compared
#               with the unit's MemoryMax. Prints UNIT_MEMORYMAX=,
#               MEMORY_CGROUP=, MEMORY_LIMIT_FILE=, MEMORY_LIMIT=,
#               MEMORYMAX=enforced|not-enforced; then MEMORYMAX_PROBE=killed|
#               survived: whether a transient unit with the same MemoryMax in
#               the same slice is SIGKILLed when it allocates 128 MiB more
#               (the kernel's OOM killer at work); and the same for MemoryHigh
#               (UNIT_MEMORYHIGH=, MEMORY_HIGH_FILE=, MEMORY_HIGH=,
#               MEMORYHIGH=...; cgroup v1 has no memory.high).
#   down        podman rm --force the container.
#
# Environment:
#   SYSTEMD_CONTAINER  the container's name (default booking-worker-systemd)
#   BINARY             the binary installed by `up` (default
#                      target/release/booking-worker)
#   for `up`: KAFKA_BROKERS, DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME
#   (required), and every other variable that scripts/booking-worker.env names
#   (KAFKA_BOOKING_TOPIC, KAFKA_CANCELLATION_TOPIC, KAFKA_GROUP_ID, ...) and
#   every KAFKA_PROP_*, written into the environment file when set;
#   METRICS_PORT picks the metrics port instead of a free one.
#   SYSTEMD_IMAGE, CONTAINERS_CONF: see tests/container/common.sh.
#
# Output: the KEY=value lines above on stdout, progress on stderr. Exit 1
# when a step fails (not when a reported value is unexpected: the caller
# judges those), 77 when podman is missing.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="run-systemd"
# shellcheck source=scripts/lib.sh
. "$HERE/../../scripts/lib.sh"
# shellcheck source=tests/container/common.sh
. "$HERE/common.sh"

UNIT_FILE="$REPO_DIR/scripts/booking-worker.service"
ENV_TEMPLATE="$REPO_DIR/scripts/booking-worker.env"
UNIT=booking-worker.service
CONTAINER="${SYSTEMD_CONTAINER:-booking-worker-systemd}"
BINARY="${BINARY:-$REPO_DIR/target/release/booking-worker}"
START_TIMEOUT="${START_TIMEOUT:-90}"

# The paths the unit names.
EXEC_PATH="$(sed -n 's/^ExecStart=[-@:+!]*\([^ ]*\).*/\1/p' "$UNIT_FILE" | head -n 1)"
ENV_PATH="$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$UNIT_FILE" | head -n 1)"
[[ -n "$EXEC_PATH" && -n "$ENV_PATH" ]] || die "no ExecStart= or EnvironmentFile= in $UNIT_FILE"

usage() {
    die "usage: tests/container/run-systemd.sh up|start|status|state|dropin NAME [SETTING...]|wait-restart|main-pid|kill9|stop|bad-config|journal|memorymax|down"
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
[[ "$cmd" == dropin || $# -eq 0 ]] || usage
require_podman

in_ctr() {
    podman exec "$CONTAINER" "$@"
}

require_up() {
    [[ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null || true)" == true ]] ||
        die "container $CONTAINER is not running (tests/container/run-systemd.sh up)"
}

# prop NAME: one property of the unit (systemctl show --value).
prop() {
    in_ctr systemctl show --property "$1" --value "$UNIT"
}

metrics_addr() {
    in_ctr sed -n 's/^METRICS_ADDR=//p' "$ENV_PATH" | tail -n 1
}

journal_tail() {
    in_ctr journalctl --unit "$UNIT" --no-pager --lines 20 >&2 || true
}

# render_env NAMES: scripts/booking-worker.env with NAME=value for each name
# (values from the environment): the first line of the name, commented out
# or not, is replaced, a later one dropped, a name without a line appended.
# Values that are not plain are double-quoted, as systemd reads them.
render_env() {
    awk -v names="$1" '
        # Inside double quotes systemd takes \\ and \" as \ and ".
        function quote(v,    out, i, c) {
            if (v ~ /^[A-Za-z0-9_.:,\/@+=-]*$/) return v
            out = ""
            for (i = 1; i <= length(v); i++) {
                c = substr(v, i, 1)
                if (c == "\\" || c == "\"") out = out "\\"
                out = out c
            }
            return "\"" out "\""
        }
        BEGIN { n = split(names, list, " "); for (i = 1; i <= n; i++) want[list[i]] = 1 }
        match($0, /^#?[A-Z][A-Z0-9_]*=/) {
            name = substr($0, 1, RLENGTH - 1); sub(/^#/, "", name)
            if (name in want) {
                if (!(name in done)) print name "=" quote(ENVIRON[name])
                done[name] = 1
                next
            }
        }
        { print }
        END {
            for (i = 1; i <= n; i++)
                if (!(list[i] in done)) print list[i] "=" quote(ENVIRON[list[i]])
        }' "$ENV_TEMPLATE"
}

cmd_up() {
    require_env KAFKA_BROKERS DB_HOST DB_PORT DB_USER DB_PASSWORD DB_NAME
    podman image exists "$SYSTEMD_IMAGE" || die "no image $SYSTEMD_IMAGE (build it: scripts/container-image.sh systemd)"
    [[ -f "$BINARY" && -x "$BINARY" ]] || die "no executable binary at $BINARY (set BINARY)"
    ! podman container exists "$CONTAINER" || die "container $CONTAINER exists already (tests/container/run-systemd.sh down)"
    local t0 state port names stage out
    t0="$(now)"
    # --cgroupns=private: on a cgroup v1 (hybrid) host podman's default is
    # the host's cgroup namespace, where /proc/<pid>/cgroup names paths that
    # the container's cgroup mounts do not have; systemd then puts no unit
    # into a memory cgroup and MemoryMax is not applied. With a namespace of
    # its own it is, as on a VM.
    log "podman run --systemd=always --privileged --cgroupns=private --network host --name $CONTAINER $SYSTEMD_IMAGE /sbin/init"
    podman run --detach --name "$CONTAINER" --systemd=always --privileged --cgroupns=private \
        --network host "$SYSTEMD_IMAGE" /sbin/init >/dev/null || die "podman run failed"
    # running, or degraded when a unit that does not matter here failed;
    # until systemd's bus is up, systemctl answers offline or nothing.
    while :; do
        state="$(timeout 60 podman exec "$CONTAINER" systemctl is-system-running --wait 2>/dev/null || true)"
        case "$state" in
            running | degraded) break ;;
        esac
        past "$t0" 60 && break
        sleep 0.2
    done
    case "$state" in
        running) ;;
        degraded) warn "systemd in $CONTAINER is degraded: $(in_ctr systemctl --failed --plain --no-legend | tr '\n' ';')" ;;
        *) die "systemd in $CONTAINER did not finish booting (state: ${state:-none})" ;;
    esac
    log "systemd booted in $(elapsed "$t0") s"

    port="${METRICS_PORT:-$(free_port)}"
    export METRICS_ADDR="127.0.0.1:$port"
    names="$(worker_environment | sed 's/=.*//' | tr '\n' ' ')METRICS_ADDR"
    stage="/run/booking-worker-install"
    in_ctr mkdir -p "$stage"
    podman cp "$BINARY" "$CONTAINER:$stage/booking-worker"
    podman cp "$UNIT_FILE" "$CONTAINER:$stage/booking-worker.service"
    render_env "$names" | podman exec --interactive "$CONTAINER" sh -c "cat > $stage/booking-worker.env"
    # The install commands of the unit's header, at the unit's own paths.
    in_ctr install -m 0755 "$stage/booking-worker" "$EXEC_PATH"
    in_ctr install -d -m 0755 "$(dirname "$ENV_PATH")"
    in_ctr install -m 0600 -o root -g root "$stage/booking-worker.env" "$ENV_PATH"
    in_ctr install -m 0644 "$stage/booking-worker.service" "/etc/systemd/system/$UNIT"
    in_ctr rm -rf "$stage"
    if out="$(in_ctr systemd-analyze verify "/etc/systemd/system/$UNIT" 2>&1)"; then
        log "systemd-analyze verify /etc/systemd/system/$UNIT: ok${out:+ ($out)}"
    else
        die "systemd-analyze verify /etc/systemd/system/$UNIT: $out"
    fi
    in_ctr systemctl daemon-reload
    in_ctr systemctl enable "$UNIT" 2>&1 | sed 's/^/  /' >&2
    log "installed $EXEC_PATH, /etc/systemd/system/$UNIT and $ENV_PATH (${names// /, })"
    echo "CONTAINER=$CONTAINER"
    echo "METRICS_ADDR=$METRICS_ADDR"
    echo "UP_SECONDS=$(elapsed "$t0")"
}

# wait_active START [NOT_PID]: until the unit is active with a main PID other
# than NOT_PID and /healthz answers 200 (and /readyz, with WAIT_READY=1); dies
# when it fails or after START_TIMEOUT seconds.
wait_active() {
    local t0="$1" not_pid="${2:-0}" addr active pid
    addr="$(metrics_addr)"
    [[ -n "$addr" ]] || die "no METRICS_ADDR in $ENV_PATH"
    while :; do
        active="$(prop ActiveState)"
        pid="$(prop MainPID)"
        if [[ "$active" == active && "$pid" != 0 && "$pid" != "$not_pid" &&
            "$(worker_status "$addr")" == 200 ]]; then
            return 0
        fi
        if [[ "$active" == failed ]]; then
            journal_tail
            die "$UNIT failed ($(prop Result), status $(prop ExecMainStatus))"
        fi
        if past "$t0" "$START_TIMEOUT"; then
            journal_tail
            die "$UNIT not active with /healthz 200 within ${START_TIMEOUT}s (state $active, main PID $pid)"
        fi
        sleep 0.2
    done
}

cmd_start() {
    require_up
    local t0 starter starting="" active_after
    t0="$(now)"
    log "systemctl start $UNIT"
    # Type=notify: systemctl start returns once the worker sent READY=1. Meanwhile the unit is
    # activating, and its StatusText says what the worker is waiting for.
    in_ctr systemctl start "$UNIT" &
    starter=$!
    while kill -0 "$starter" 2>/dev/null; do
        if [[ -z "$starting" && "$(prop ActiveState)" == activating ]]; then
            starting="$(prop StatusText)"
        fi
        sleep 0.1
    done
    wait "$starter" || {
        journal_tail
        die "systemctl start $UNIT failed"
    }
    active_after="$(prop ActiveState)"
    wait_active "$t0"
    local pid
    pid="$(prop MainPID)"
    echo "ACTIVE_STATE=$(prop ActiveState)"
    echo "MAIN_PID=$pid"
    # DynamicUser=yes: a uid systemd allocates (61184-65519), not root.
    echo "MAIN_UID=$(in_ctr cat "/proc/$pid/status" | awk '$1 == "Uid:" { print $3 }')"
    echo "START_SECONDS=$(elapsed "$t0")"
    echo "STARTING_STATUS=$starting"
    echo "ACTIVE_AFTER_START=$active_after"
    echo "STATUS_TEXT=$(prop StatusText)"
}

cmd_state() {
    require_up
    echo "ACTIVE_STATE=$(prop ActiveState)"
    echo "SUB_STATE=$(prop SubState)"
    echo "RESULT=$(prop Result)"
    echo "MAIN_PID=$(prop MainPID)"
    echo "NRESTARTS=$(prop NRestarts)"
    echo "STATUS_TEXT=$(prop StatusText)"
    echo "TYPE=$(prop Type)"
    echo "NOTIFY_ACCESS=$(prop NotifyAccess)"
    echo "WATCHDOG_SEC=$(in_ctr systemctl cat "$UNIT" | sed -n 's/^WatchdogSec=//p' | tail -n 1)"
    echo "WATCHDOG_USEC=$(prop WatchdogUSec)"
}

# cmd_dropin NAME [SETTING...]
cmd_dropin() {
    require_up
    [[ "${1:-}" =~ ^[a-z0-9-]+$ ]] || usage
    local dir="/etc/systemd/system/$UNIT.d" name="$1"
    shift
    if [[ $# -eq 0 ]]; then
        in_ctr rm -f "$dir/$name.conf"
        log "removed the drop-in $dir/$name.conf"
    else
        in_ctr mkdir -p "$dir"
        printf '[Service]\n' | podman exec --interactive "$CONTAINER" sh -c "cat > $dir/$name.conf"
        printf '%s\n' "$@" | podman exec --interactive "$CONTAINER" sh -c "cat >> $dir/$name.conf"
        log "drop-in $dir/$name.conf: $*"
    fi
    in_ctr systemctl daemon-reload
}

cmd_wait_restart() {
    require_up
    local old t0 result seen="" addr
    old="$(prop MainPID)"
    [[ "$old" =~ ^[1-9][0-9]*$ ]] || die "$UNIT has no main PID (start it first)"
    addr="$(metrics_addr)"
    t0="$(now)"
    log "waiting for systemd to restart $UNIT (main PID $old)"
    while :; do
        result="$(prop Result)"
        [[ -n "$seen" || "$result" == success ]] || seen="$result"
        if [[ "$(prop MainPID)" != "$old" && "$(prop ActiveState)" == active && "$(worker_status "$addr")" == 200 ]]; then
            break
        fi
        if past "$t0" "$START_TIMEOUT"; then
            journal_tail
            die "$UNIT not restarted within ${START_TIMEOUT}s (state $(prop ActiveState), result $result)"
        fi
        sleep 0.2
    done
    echo "OLD_MAIN_PID=$old"
    echo "MAIN_PID=$(prop MainPID)"
    echo "NRESTARTS=$(prop NRestarts)"
    echo "SEEN_RESULT=$seen"
    echo "WATCHDOG_TIMEOUTS=$(in_ctr journalctl --unit "$UNIT" --no-pager -o cat | grep -c 'Watchdog timeout' || true)"
    echo "RESTART_SECONDS=$(elapsed "$t0")"
}

cmd_kill9() {
    require_up
    local old t0
    old="$(prop MainPID)"
    [[ "$old" =~ ^[1-9][0-9]*$ ]] || die "$UNIT has no main PID (start it first)"
    t0="$(now)"
    log "kill -9 $old (main PID of $UNIT)"
    in_ctr bash -c "kill -9 $old"
    wait_active "$t0" "$old"
    echo "OLD_MAIN_PID=$old"
    echo "MAIN_PID=$(prop MainPID)"
    echo "NRESTARTS=$(prop NRestarts)"
    echo "RESTART_SECONDS=$(elapsed "$t0")"
}

cmd_stop() {
    require_up
    local t0
    t0="$(now)"
    log "systemctl stop $UNIT"
    in_ctr systemctl stop "$UNIT"
    echo "RESULT=$(prop Result)"
    # si_code of the exit: CLD_EXITED 1, CLD_KILLED 2, CLD_DUMPED 3.
    case "$(prop ExecMainCode)" in
        1) echo "EXEC_MAIN_CODE=exited" ;;
        2) echo "EXEC_MAIN_CODE=killed" ;;
        3) echo "EXEC_MAIN_CODE=dumped" ;;
        *) echo "EXEC_MAIN_CODE=$(prop ExecMainCode)" ;;
    esac
    echo "EXEC_MAIN_STATUS=$(prop ExecMainStatus)"
    echo "ACTIVE_STATE=$(prop ActiveState)"
    echo "STOP_SECONDS=$(elapsed "$t0")"
    echo "STATUS_TEXT=$(prop StatusText)"
}

# Seconds of the unit's RestartSec (systemctl prints e.g. 5s or 1min 30s).
restart_secs() {
    local v total=0 part
    v="$(prop RestartUSec)"
    for part in $v; do
        case "$part" in
            *ms) ;;
            *min) total=$((total + ${part%min} * 60)) ;;
            *s) total=$((total + ${part%s})) ;;
        esac
    done
    echo "$total"
}

cmd_bad_config() {
    require_up
    [[ "$(prop ActiveState)" != active ]] || die "$UNIT is active: stop it first"
    local t0 observe active
    observe=$(($(restart_secs) + 5))
    in_ctr cp -p "$ENV_PATH" "$ENV_PATH.orig"
    in_ctr sed -i 's/^#\{0,1\}DB_PORT=.*/DB_PORT=notaport/' "$ENV_PATH"
    in_ctr grep -q '^DB_PORT=notaport$' "$ENV_PATH" || die "could not set DB_PORT=notaport in $ENV_PATH"
    in_ctr systemctl reset-failed "$UNIT" 2>/dev/null || true
    t0="$(now)"
    log "DB_PORT=notaport; systemctl start $UNIT"
    in_ctr systemctl start "$UNIT" || true
    while :; do
        active="$(prop ActiveState)"
        [[ "$active" != failed && "$active" != inactive ]] || break
        if past "$t0" 30; then
            in_ctr mv "$ENV_PATH.orig" "$ENV_PATH"
            die "$UNIT still $active 30 s after a start with DB_PORT=notaport"
        fi
        sleep 0.2
    done
    log "$UNIT is $active after $(elapsed "$t0") s; watching ${observe}s for a restart"
    sleep "$observe"
    echo "RESULT=$(prop Result)"
    echo "EXEC_MAIN_STATUS=$(prop ExecMainStatus)"
    echo "NRESTARTS=$(prop NRestarts)"
    echo "ACTIVE_STATE=$(prop ActiveState)"
    echo "MESSAGE=$(in_ctr journalctl "_SYSTEMD_UNIT=$UNIT" -o cat --no-pager --lines 1)"
    in_ctr mv "$ENV_PATH.orig" "$ENV_PATH"
    in_ctr systemctl reset-failed "$UNIT" 2>/dev/null || true
    log "restored $ENV_PATH"
}

# cgroup_path PID CONTROLLER: the process's cgroup in that v1 hierarchy, or
# in the v2 one (CONTROLLER empty).
cgroup_path() {
    if [[ -n "$2" ]]; then
        in_ctr cat "/proc/$1/cgroup" | awk -F: -v c="$2" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }'
    else
        in_ctr cat "/proc/$1/cgroup" | awk -F: '$1 == "0" { print $3 }'
    fi
}

# enforced UNIT_VALUE CGROUP_VALUE: enforced when the cgroup holds the unit's
# limit (a number of bytes), else not-enforced.
enforced() {
    if [[ "$1" =~ ^[0-9]+$ && "$2" == "$1" ]]; then
        echo enforced
    else
        echo not-enforced
    fi
}

cmd_memorymax() {
    require_up
    local pid want_max want_high path file limit high_file high=""
    pid="$(prop MainPID)"
    [[ "$pid" =~ ^[1-9][0-9]*$ ]] || die "$UNIT is not running (start it first)"
    want_max="$(prop MemoryMax)"
    want_high="$(prop MemoryHigh)"
    path="$(cgroup_path "$pid" memory)"
    if [[ -n "$path" ]] && in_ctr test -d "/sys/fs/cgroup/memory$path"; then
        # cgroup v1 (the hybrid layout): systemd maps MemoryMax to
        # memory.limit_in_bytes; there is no memory.high.
        file="/sys/fs/cgroup/memory$path/memory.limit_in_bytes"
        high_file=""
    else
        path="$(cgroup_path "$pid" "")"
        file="/sys/fs/cgroup$path/memory.max"
        high_file="/sys/fs/cgroup$path/memory.high"
    fi
    limit="$(in_ctr cat "$file" 2>/dev/null || echo absent)"
    if [[ -n "$high_file" ]]; then
        high="$(in_ctr cat "$high_file" 2>/dev/null || echo absent)"
    fi
    echo "UNIT_MEMORYMAX=$want_max"
    echo "MEMORY_CGROUP=$path"
    echo "MEMORY_LIMIT_FILE=$file"
    echo "MEMORY_LIMIT=$limit"
    echo "MEMORYMAX=$(enforced "$want_max" "$limit")"
    # Does the kernel hold a unit to that limit here? A transient unit with
    # the same MemoryMax, in the same slice, grows a shell string past it.
    local probe="booking-worker-memory-probe-$$" mib
    mib=$(((${want_max//[!0-9]/} + 0) / 1048576 + 128))
    if [[ "$want_max" =~ ^[0-9]+$ ]]; then
        in_ctr systemd-run --quiet --wait --unit "$probe" --slice "$(prop Slice)" \
            --property "MemoryMax=$want_max" \
            bash -c "x=\$(head -c ${mib}M /dev/zero | tr '\\0' a); echo \${#x}" >/dev/null 2>&1 || true
        case "$(in_ctr systemctl show --property ExecMainStatus --value "$probe" 2>/dev/null || true)" in
            9) echo "MEMORYMAX_PROBE=killed (a unit with MemoryMax=$want_max allocating ${mib} MiB was SIGKILLed)" ;;
            0) echo "MEMORYMAX_PROBE=survived (a unit with MemoryMax=$want_max allocated ${mib} MiB)" ;;
            *) echo "MEMORYMAX_PROBE=unknown ($(in_ctr systemctl show --property Result --property ExecMainStatus "$probe" 2>/dev/null | tr '\n' ' '))" ;;
        esac
        in_ctr systemctl reset-failed "$probe" 2>/dev/null || true
    fi
    echo "UNIT_MEMORYHIGH=$want_high"
    echo "MEMORY_HIGH_FILE=${high_file:-none (cgroup v1 has no memory.high)}"
    echo "MEMORY_HIGH=${high:-none}"
    echo "MEMORYHIGH=$(enforced "$want_high" "$high")"
}

case "$cmd" in
    up) cmd_up ;;
    start) cmd_start ;;
    state) cmd_state ;;
    dropin) cmd_dropin "$@" ;;
    wait-restart) cmd_wait_restart ;;
    status)
        require_up
        in_ctr systemctl show --property ActiveState --property SubState --property Result \
            --property MainPID --property ExecMainCode --property ExecMainStatus --property NRestarts "$UNIT"
        ;;
    main-pid)
        require_up
        echo "MAIN_PID=$(prop MainPID)"
        ;;
    kill9) cmd_kill9 ;;
    stop) cmd_stop ;;
    bad-config) cmd_bad_config ;;
    journal)
        require_up
        in_ctr journalctl "_SYSTEMD_UNIT=$UNIT" -o cat --no-pager
        ;;
    memorymax) cmd_memorymax ;;
    down)
        podman rm --force --ignore --time 10 "$CONTAINER" >/dev/null
        log "removed $CONTAINER"
        ;;
    *) usage ;;
esac
