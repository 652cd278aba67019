#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller) for local development
# and tests of booking-worker. The broker jars come from Maven Central and are
# cached, so only the first start needs Maven.
#
# Listeners, all on 127.0.0.1:
#   PLAINTEXT       KAFKA_PORT: clients and inter-broker traffic
#   SASL_PLAINTEXT  KAFKA_SASL_PORT: SASL mechanism PLAIN, one user
#                   `booking-worker` with password `booking-worker-secret`
#                   (fixed TEST-ONLY credentials, in the clear on purpose;
#                   no authorizer, so the user may do anything), for tests of
#                   the worker's KAFKA_PROP_SASL_* settings
#   CONTROLLER      KAFKA_CONTROLLER_PORT: KRaft controller (PLAINTEXT)
#
# Usage: scripts/kafka.sh start|stop|restart|status
#
#   start    start a broker (or reuse the running one); a broker stopped with
#            KAFKA_KEEP_DATA=1 is started again on its data and ports
#   stop     stop it and delete its data (KAFKA_KEEP_DATA=1: keep the data,
#            so that the next `start` brings the same broker back)
#   restart  stop keeping the data, then start again (offsets, topics and
#            records survive; used by the reliability tests)
#   status   say whether it runs
#
# A kept broker (KAFKA_KEEP_DATA=1, `restart`) comes back on the ports it had.
#
# Environment:
#   KAFKA_PORT              broker port on 127.0.0.1 (default 9092)
#   KAFKA_CONTROLLER_PORT   KRaft controller port (default KAFKA_PORT+1, or a
#                           free port if that one is taken)
#   KAFKA_SASL_PORT         SASL_PLAINTEXT listener port (default KAFKA_PORT+2,
#                           or a free port if that one is taken)
#   KAFKA_DATA_DIR          throwaway dir for data, config and logs (default:
#                           a new mktemp dir under /tmp); deleted by `stop`
#   KAFKA_KEEP_DATA         1: `stop` keeps the data dir and state for a later
#                           `start` (default 0)
#   KAFKA_STATE_DIR         where pid/state are kept
#                           (default /tmp/booking-worker-kafka-$KAFKA_PORT)
#   KAFKA_NUM_PARTITIONS    partitions of auto-created topics (default 4)
#   KAFKA_START_TIMEOUT     seconds to wait for the broker (default 120)
#   KAFKA_STOP_TIMEOUT      seconds to wait for a clean exit (default 30)
#   KAFKA_VERSION           org.apache.kafka:kafka_2.13 version (default 4.1.2)
#   KAFKA_HEAP_OPTS         JVM heap flags (default -Xms256m -Xmx512m)
#   KAFKA_JVM_OPTS          extra JVM flags
#   BOOKING_WORKER_CACHE    jar cache root (default ~/.cache/booking-worker)
#
# Output: progress goes to stderr. On success `start` prints
# `KAFKA_SASL_BROKERS=127.0.0.1:<sasl port>` and then
# `KAFKA_BROKERS=127.0.0.1:<port>` as its last stdout line; `status` prints
# the same lines when a broker answers (exit 0), else exits 1. The
# KAFKA_SASL_BROKERS line is left out for a broker this script did not start
# (something else answering on KAFKA_PORT), whose listeners it does not know.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="kafka"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

KAFKA_VERSION="${KAFKA_VERSION:-4.1.2}"
# log4j version that kafka_2.13 4.1.2 depends on; the slf4j binding must match.
KAFKA_LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.25.3}"
MAVEN_DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_NUM_PARTITIONS="${KAFKA_NUM_PARTITIONS:-4}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"

CACHE_ROOT="${BOOKING_WORKER_CACHE:-$HOME/.cache/booking-worker}"
KAFKA_HOME="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIB_DIR="$KAFKA_HOME/libs"
LIB_MARKER="$KAFKA_HOME/.libs-complete"

STATE_DIR="${KAFKA_STATE_DIR:-/tmp/booking-worker-kafka-$KAFKA_PORT}"
STATE_FILE="$STATE_DIR/state"

HOST=127.0.0.1
BROKERS="$HOST:$KAFKA_PORT"

[[ "$KAFKA_PORT" =~ ^[0-9]+$ ]] || die "KAFKA_PORT must be a number, got '$KAFKA_PORT'"
[[ -z "${KAFKA_SASL_PORT:-}" || "$KAFKA_SASL_PORT" =~ ^[0-9]+$ ]] \
    || die "KAFKA_SASL_PORT must be a number, got '$KAFKA_SASL_PORT'"

# --------------------------------------------------------------------------
# Jars

# Fetch kafka_2.13 and its runtime dependencies (plus the slf4j->log4j2
# binding, which the Kafka distribution ships but the pom does not declare)
# into $LIB_DIR, unless a previous run completed that already.
ensure_libs() {
    if [[ -f "$LIB_MARKER" ]]; then
        return 0
    fi
    mkdir -p "$KAFKA_HOME"
    # Serialise concurrent first runs (parallel test.sh invocations).
    exec 9>"$KAFKA_HOME/.lock"
    if have flock; then
        flock 9
    fi
    if [[ -f "$LIB_MARKER" ]]; then
        exec 9>&-
        return 0
    fi
    ensure_maven

    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/booking-worker-kafka-fetch.XXXXXX")"
    log "fetching Kafka $KAFKA_VERSION jars with Maven (one-time, cached in $LIB_DIR)"
    cat >"$work/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.booking-worker</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$KAFKA_LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    if ! mvn --batch-mode --no-transfer-progress -q -f "$work/pom.xml" \
        "$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
        -DincludeScope=runtime -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1; then
        tail -n 50 "$work/mvn.log" >&2 || true
        rm -rf "$work"
        die "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION"
    fi
    if [[ ! -f "$work/libs/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
        rm -rf "$work"
        die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing"
    fi
    rm -rf "$LIB_DIR"
    mv "$work/libs" "$LIB_DIR"
    rm -rf "$work"
    touch "$LIB_MARKER"
    exec 9>&-
    log "cached $(find "$LIB_DIR" -name '*.jar' | wc -l) jars in $LIB_DIR"
}

# --------------------------------------------------------------------------
# State

# Our broker's pid if it is alive, else empty.
running_pid() {
    local pid
    pid="$(state_get "$STATE_FILE" pid)"
    if pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'; then
        echo "$pid"
    fi
}

# Remove what a previous start left behind (process already gone).
remove_state() {
    local data_dir
    data_dir="$(state_get "$STATE_FILE" data_dir)"
    if [[ -n "$data_dir" && "$data_dir" != "/" && -d "$data_dir" ]]; then
        rm -rf "$data_dir"
    fi
    rm -rf "$STATE_DIR"
}

# True if a broker was stopped with KAFKA_KEEP_DATA=1 and its data is still
# there to start it again.
kept_state() {
    local data_dir
    [[ "$(state_get "$STATE_FILE" kept)" == 1 ]] || return 1
    data_dir="$(state_get "$STATE_FILE" data_dir)"
    [[ -n "$data_dir" && -f "$data_dir/server.properties" ]]
}

new_cluster_id() {
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without
    # padding; like Kafka's own Uuid.randomUuid, avoid a leading '-'.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        if [[ "$id" != -* ]]; then
            echo "$id"
            return 0
        fi
    done
}

# Print the stdout lines of our broker: KAFKA_SASL_BROKERS=... (unless its
# state has no SASL port: a broker kept by an older version of this script),
# then KAFKA_BROKERS=... last, which callers take with `sed | tail -n 1`.
print_brokers() {
    local sasl_port
    sasl_port="$(state_get "$STATE_FILE" sasl_port)"
    if [[ -n "$sasl_port" ]]; then
        echo "KAFKA_SASL_BROKERS=$HOST:$sasl_port"
    fi
    echo "KAFKA_BROKERS=$BROKERS"
}

# Print the broker's log(s) tail to stderr.
show_log_tail() {
    local data_dir="$1" f
    for f in "$data_dir/logs/server.log" "$data_dir/logs/kafka.out"; do
        if [[ -s "$f" ]]; then
            printf -- '---- last 50 lines of %s ----\n' "$f" >&2
            tail -n 50 "$f" >&2
        fi
    done
}

# Wait until the broker logged "Kafka Server started" and its client ports
# accept connections. Returns 1 on timeout or if the process died.
wait_ready() {
    local pid="$1" data_dir="$2" deadline now next_note sasl_port
    sasl_port="$(state_get "$STATE_FILE" sasl_port)"
    deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    next_note=$((SECONDS + 10))
    while :; do
        if grep -q 'Kafka Server started' "$data_dir/logs/server.log" 2>/dev/null \
            && port_open "$HOST" "$KAFKA_PORT" \
            && { [[ -z "$sasl_port" ]] || port_open "$HOST" "$sasl_port"; }; then
            return 0
        fi
        if ! pid_alive "$pid"; then
            warn "broker process $pid exited during startup"
            return 1
        fi
        now=$SECONDS
        if ((now >= deadline)); then
            warn "broker not ready after ${KAFKA_START_TIMEOUT}s"
            return 1
        fi
        if ((now >= next_note)); then
            log "still waiting for the broker ($((deadline - now))s left)"
            next_note=$((now + 10))
        fi
        sleep 0.5
    done
}

# launch DATA_DIR [format]: (formats the storage, then) starts the broker of
# DATA_DIR/server.properties in the background, records its pid and waits
# until it is ready. Prints KAFKA_SASL_BROKERS=... and KAFKA_BROKERS=... on
# success.
launch() {
    local data_dir="$1" format="${2:-}" pid
    local props="$data_dir/server.properties" log4j="$data_dir/log4j2.properties"
    local -a jvm
    # Word splitting of the *_OPTS variables is intended.
    # shellcheck disable=SC2206
    jvm=($KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
        "-Dlog4j2.configurationFile=$log4j" "-Dkafka.logs.dir=$data_dir/logs"
        $KAFKA_JVM_OPTS -cp "$LIB_DIR/*")

    if [[ "$format" == format ]]; then
        log "formatting storage in $data_dir"
        if ! java "${jvm[@]}" kafka.tools.StorageTool format --standalone \
            -t "$(new_cluster_id)" -c "$props" >"$data_dir/logs/format.log" 2>&1; then
            cat "$data_dir/logs/format.log" >&2
            remove_state
            die "kafka storage format failed"
        fi
    fi

    local sasl_note=""
    if [[ -n "$(state_get "$STATE_FILE" sasl_port)" ]]; then
        sasl_note=", SASL_PLAINTEXT $HOST:$(state_get "$STATE_FILE" sasl_port)"
    fi
    log "starting Kafka $KAFKA_VERSION on $BROKERS (controller $HOST:$(state_get "$STATE_FILE" controller_port)$sasl_note, data $data_dir)"
    # setsid + nohup: the broker outlives this script and its terminal; no
    # stdio is inherited, so `$(kafka.sh start)` returns once we exit.
    setsid nohup java "${jvm[@]}" kafka.Kafka "$props" \
        </dev/null >>"$data_dir/logs/kafka.out" 2>&1 &
    pid=$!
    echo "pid=$pid" >>"$STATE_FILE"

    if ! wait_ready "$pid" "$data_dir"; then
        show_log_tail "$data_dir"
        kill -KILL "$pid" 2>/dev/null || true
        die "Kafka did not start; logs kept in $data_dir/logs (next start cleans up)"
    fi
    log "Kafka is ready on $BROKERS (pid $pid) after ${SECONDS}s"
    print_brokers
}

# Starts again a broker stopped with KAFKA_KEEP_DATA=1, on its own data and
# ports.
start_kept() {
    local data_dir port sasl_port
    data_dir="$(state_get "$STATE_FILE" data_dir)"
    port="$(state_get "$STATE_FILE" port)"
    sasl_port="$(state_get "$STATE_FILE" sasl_port)"
    [[ "$port" == "$KAFKA_PORT" ]] || die "the kept broker in $STATE_DIR listened on $port, not KAFKA_PORT=$KAFKA_PORT"
    if port_open "$HOST" "$KAFKA_PORT"; then
        die "cannot start the kept broker: something else answers on $BROKERS"
    fi
    if [[ -n "$sasl_port" ]] && port_open "$HOST" "$sasl_port"; then
        die "cannot start the kept broker: something else answers on its SASL_PLAINTEXT port $HOST:$sasl_port"
    fi
    ensure_java
    ensure_libs
    # The last start marker would make wait_ready succeed at once.
    if [[ -f "$data_dir/logs/server.log" ]]; then
        mv "$data_dir/logs/server.log" "$data_dir/logs/server.log.$(date +%s%N)"
    fi
    sed -i '/^kept=/d; /^pid=/d' "$STATE_FILE"
    log "starting the broker stopped earlier, on its kept data"
    launch "$data_dir"
}

# --------------------------------------------------------------------------
# Commands

cmd_start() {
    local pid data_dir
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        data_dir="$(state_get "$STATE_FILE" data_dir)"
        if port_open "$HOST" "$KAFKA_PORT"; then
            log "broker already running on $BROKERS (pid $pid)"
        else
            log "broker (pid $pid) is starting; waiting"
            if ! wait_ready "$pid" "$data_dir"; then
                show_log_tail "$data_dir"
                die "broker on $BROKERS did not become ready"
            fi
        fi
        print_brokers
        return 0
    fi
    if kept_state; then
        start_kept
        return 0
    fi
    if [[ -f "$STATE_FILE" ]]; then
        log "removing stale state of a broker that is gone ($STATE_DIR)"
        remove_state
    fi
    if port_open "$HOST" "$KAFKA_PORT"; then
        log "something already answers on $BROKERS (not started by this script); using it"
        echo "KAFKA_BROKERS=$BROKERS"
        return 0
    fi

    ensure_java
    ensure_libs

    local cport="${KAFKA_CONTROLLER_PORT:-}" sport="${KAFKA_SASL_PORT:-}"
    if [[ -z "$cport" ]]; then
        cport=$((KAFKA_PORT + 1))
        if [[ "$cport" == "$sport" ]] || port_in_use "$cport"; then
            cport="$(free_port "$KAFKA_PORT" "$sport")"
        fi
    elif port_in_use "$cport"; then
        die "KAFKA_CONTROLLER_PORT $cport is already in use"
    fi
    if [[ -z "$sport" ]]; then
        sport=$((KAFKA_PORT + 2))
        if [[ "$sport" == "$cport" ]] || port_in_use "$sport"; then
            sport="$(free_port "$KAFKA_PORT" "$cport")"
        fi
    elif [[ "$sport" == "$KAFKA_PORT" || "$sport" == "$cport" ]]; then
        die "KAFKA_SASL_PORT $sport is the same as the broker or controller port"
    elif port_in_use "$sport"; then
        die "KAFKA_SASL_PORT $sport is already in use"
    fi

    if [[ -n "${KAFKA_DATA_DIR:-}" ]]; then
        data_dir="$KAFKA_DATA_DIR"
        if [[ -d "$data_dir" && -n "$(ls -A "$data_dir")" ]]; then
            die "KAFKA_DATA_DIR $data_dir is not empty (it is deleted by stop, so it must be a throwaway dir)"
        fi
        mkdir -p "$data_dir"
        data_dir="$(cd "$data_dir" && pwd)"
    else
        data_dir="$(mktemp -d /tmp/booking-worker-kafka-data.XXXXXX)"
    fi
    mkdir -p "$STATE_DIR" "$data_dir/logs" "$data_dir/kraft-logs"
    {
        echo "port=$KAFKA_PORT"
        echo "controller_port=$cport"
        echo "sasl_port=$sport"
        echo "data_dir=$data_dir"
        echo "version=$KAFKA_VERSION"
    } >"$STATE_FILE"

    local props="$data_dir/server.properties" log4j="$data_dir/log4j2.properties"
    cat >"$props" <<EOF
# Written by scripts/kafka.sh: throwaway single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_PLAINTEXT://$HOST:$sport,CONTROLLER://$HOST:$cport
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_PLAINTEXT://$HOST:$sport
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
# SASL/PLAIN on the SASL_PLAINTEXT listener only, with one test-only user.
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_TEST_SASL_USERNAME="$KAFKA_TEST_SASL_PASSWORD";
controller.quorum.bootstrap.servers=$HOST:$cport
log.dirs=$data_dir/kraft-logs
auto.create.topics.enable=true
num.partitions=$KAFKA_NUM_PARTITIONS
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# The consumer group protocol (KIP-848) keeps its session and heartbeat on the broker: short ones,
# so that tests see a killed member leave within seconds, as they do with the classic protocol.
group.consumer.min.session.timeout.ms=3000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=500
num.network.threads=2
num.io.threads=4
EOF
    cat >"$log4j" <<EOF
# Written by scripts/kafka.sh: all broker logging goes to one file.
status = warn
name = booking-worker-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $data_dir/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF

    launch "$data_dir" format
}

cmd_stop() {
    local pid keep="${KAFKA_KEEP_DATA:-0}"
    [[ "$keep" == 0 || "$keep" == 1 ]] || die "KAFKA_KEEP_DATA must be 0 or 1, got '$keep'"
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        if [[ "$keep" == 1 ]] && kept_state; then
            log "broker already stopped; its data is kept in $(state_get "$STATE_FILE" data_dir)"
        elif [[ -f "$STATE_FILE" ]]; then
            log "broker already gone; removing its files"
            remove_state
        elif port_open "$HOST" "$KAFKA_PORT"; then
            log "a broker on $BROKERS was not started by this script; leaving it alone"
        else
            log "no broker running on $BROKERS"
        fi
        return 0
    fi
    log "stopping broker pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while pid_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.5
    done
    if pid_alive "$pid"; then
        warn "broker did not exit within ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while pid_alive "$pid"; do sleep 0.2; done
    fi
    if [[ "$keep" == 1 ]]; then
        sed -i '/^pid=/d; /^kept=/d' "$STATE_FILE"
        echo "kept=1" >>"$STATE_FILE"
        log "stopped; data kept in $(state_get "$STATE_FILE" data_dir) for the next start"
        return 0
    fi
    remove_state
    log "stopped"
}

cmd_restart() {
    KAFKA_KEEP_DATA=1 cmd_stop
    cmd_start
}

cmd_status() {
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        log "running: pid $pid, $BROKERS, data $(state_get "$STATE_FILE" data_dir)"
        print_brokers
        return 0
    fi
    if port_open "$HOST" "$KAFKA_PORT"; then
        log "something answers on $BROKERS (not started by this script)"
        echo "KAFKA_BROKERS=$BROKERS"
        return 0
    fi
    if kept_state; then
        log "stopped, data kept in $(state_get "$STATE_FILE" data_dir) (start brings it back)"
        return 1
    fi
    log "not running on $BROKERS"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_restart ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|restart|status" >&2
        exit 2
        ;;
esac
