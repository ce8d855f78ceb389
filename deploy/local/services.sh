#!/usr/bin/env bash
# Local Kafka (KRaft, single node) and Redis for development, tests and the demo.
#
#   deploy/local/services.sh start|stop|status|restart [kafka|redis|redis-cluster|kfake|all]
#     (`all`, the default, is kafka + redis; the Redis Cluster and kfake start only when named.
#     kfake is a second, independent Kafka-protocol broker (franz-go's, in Go) that the tests
#     run the pipeline on too; it is built from deploy/local/kfake with `go build` once.)
#   deploy/local/services.sh wipe-redis-cluster   # stop the cluster and delete its state
#   deploy/local/services.sh fetch      # download the Kafka jars once (no server)
#   deploy/local/services.sh env        # print export lines for the endpoints
#   deploy/local/services.sh logs [service ...]  # the last METERING_LOG_LINES (40) lines of each
#                                       # service's log files, each headed by its path
#   deploy/local/services.sh wipe       # stop, then delete all local state (not the jar cache)
#
# Environment (all optional):
#   METERING_STATE_DIR   state and logs       (default <repo>/.state)
#   METERING_CACHE       jar cache            (default ~/.cache/metering)
#   METERING_KAFKA_PORT  broker port          (default 19092)
#   METERING_KAFKA_CONTROLLER_PORT            (default 19093)
#   METERING_REDIS_PORT  redis port           (default 16379)
#   METERING_KFAKE_PORT  kfake broker port    (default 19192)
#   METERING_REDIS_CLUSTER_PORTS  the cluster's masters (default "17001 17002 17003"; each
#                        also uses port+10000 for the cluster bus)
#   METERING_KAFKA_VERSION                    (default 4.1.1)
#   METERING_KAFKA_HEAP  JVM heap flags       (default "-Xms256m -Xmx1g")
#   METERING_START_TIMEOUT  seconds to wait for health (default 90)
#   METERING_PYTHON      python with confluent_kafka for the health check
#   deploy/local/services.sh help       # this usage (also -h, --help)
# Exit codes: 0 ok; 1 error; 2 usage (an unknown command or service, or a service named to
# fetch|env|wipe|wipe-redis-cluster, which take none: `wipe kafka` deleted every state);
# 3 `status` found a requested service down.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${METERING_STATE_DIR:-$REPO_ROOT/.state}"
CACHE_DIR="${METERING_CACHE:-$HOME/.cache/metering}"
KAFKA_VERSION="${METERING_KAFKA_VERSION:-4.1.1}"
SCALA_VERSION=2.13
LOG4J_VERSION=2.24.3 # matches log4j-core pulled in by Kafka 4.1
DEP_PLUGIN_VERSION=3.8.1
KAFKA_PORT="${METERING_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${METERING_KAFKA_CONTROLLER_PORT:-19093}"
REDIS_PORT="${METERING_REDIS_PORT:-16379}"
KFAKE_PORT="${METERING_KFAKE_PORT:-19192}"
read -r -a CLUSTER_PORTS <<<"${METERING_REDIS_CLUSTER_PORTS:-17001 17002 17003}"
KAFKA_HEAP="${METERING_KAFKA_HEAP:--Xms256m -Xmx1g}"
START_TIMEOUT="${METERING_START_TIMEOUT:-90}"
HOST=127.0.0.1

KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_STATE="$STATE_DIR/kafka"
REDIS_STATE="$STATE_DIR/redis"
LOG_DIR="$STATE_DIR/logs"
KAFKA_PID="$KAFKA_STATE/kafka.pid"
REDIS_PID="$REDIS_STATE/redis.pid"
CLUSTER_STATE="$STATE_DIR/redis-cluster"
KFAKE_SRC="$REPO_ROOT/deploy/local/kfake"
KFAKE_STATE="$STATE_DIR/kfake"
KFAKE_PID="$KFAKE_STATE/kfake.pid"

if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi
PYTHON="${METERING_PYTHON:-$(command -v python3 || command -v python || true)}"

log() { printf '[services] %s\n' "$*"; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# pid from a pidfile if that process is alive and its command line contains $2.
live_pid() {
  local pidfile=$1 marker=$2 pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(tr -dc '0-9' <"$pidfile")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker" || return 1
  echo "$pid"
}
kafka_pid() { live_pid "$KAFKA_PID" "-Dmetering.state=$STATE_DIR"; }
redis_pid() { live_pid "$REDIS_PID" "redis-server"; }
kfake_pid() { live_pid "$KFAKE_PID" "kfake-broker -port $KFAKE_PORT"; }
cluster_node_pid() { live_pid "$CLUSTER_STATE/$1/redis.pid" "redis-server $HOST:$1"; }

# --- Kafka jars ---------------------------------------------------------------
fetch_kafka() {
  [[ -f "$KAFKA_HOME/.complete" ]] && return 0
  command -v mvn >/dev/null || die "mvn not found (run deploy/local/install.sh or apt-get install -y maven)"
  mkdir -p "$KAFKA_HOME"
  exec 8>"$KAFKA_HOME/.fetch.lock"
  flock -w 600 8 || die "timed out waiting for another jar fetch"
  if [[ ! -f "$KAFKA_HOME/.complete" ]]; then
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central (one time) into $KAFKA_LIBS"
    cat >"$KAFKA_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.metering</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$SCALA_VERSION</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- slf4j 1.x -> log4j2 binding, so the broker's slf4j logging reaches log4j2 -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$DEP_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
    rm -rf "$KAFKA_LIBS.tmp"
    if ! mvn -B -q -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS.tmp" >"$KAFKA_HOME/fetch.log" 2>&1; then
      tail -n 30 "$KAFKA_HOME/fetch.log" >&2
      die "Maven could not fetch Kafka $KAFKA_VERSION (full log: $KAFKA_HOME/fetch.log)"
    fi
    [[ -f "$KAFKA_LIBS.tmp/kafka_$SCALA_VERSION-$KAFKA_VERSION.jar" ]] || die "kafka jar missing after fetch"
    rm -rf "$KAFKA_LIBS"
    mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
    (cd "$KAFKA_LIBS" && ls -1 -- *.jar) >"$KAFKA_HOME/artifacts.txt"
    touch "$KAFKA_HOME/.complete"
    log "fetched $(wc -l <"$KAFKA_HOME/artifacts.txt") jars"
  fi
  flock -u 8
  exec 8>&-
}

# --- Kafka --------------------------------------------------------------------
write_kafka_config() {
  mkdir -p "$KAFKA_STATE/data" "$LOG_DIR/kafka"
  cat >"$KAFKA_STATE/server.properties" <<EOF
# Generated by deploy/local/services.sh; rewritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_STATE/data
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=168
EOF
  cat >"$KAFKA_STATE/log4j2.properties" <<'EOF'
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

# A CI run once got an empty id from python3 (the pyenv shim, right after install.sh's pip
# install) and the format failed: fall back to Kafka's own tool, and say so if both fail.
new_cluster_id() {
  local id=""
  if [[ -n "$PYTHON" ]]; then
    id=$("$PYTHON" -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))' 2>/dev/null || true)
  fi
  [[ -n "$id" ]] || id=$("$JAVA" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null || true)
  [[ -n "$id" ]] || die "could not make a Kafka cluster id (neither $PYTHON nor kafka-storage random-uuid answered)"
  echo "$id"
}

# Waits until a metadata request succeeds. Exit: 0 ok, 2 process died, 3 timeout, 4 no client.
kafka_health() {
  local pid=$1 port=${2:-$KAFKA_PORT}
  [[ -n "$PYTHON" ]] || return 4
  "$PYTHON" - "$HOST:$port" "$pid" "$START_TIMEOUT" <<'EOF'
import logging, os, sys, time
try:
    from confluent_kafka.admin import AdminClient
except ImportError:
    sys.exit(4)
bootstrap, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
quiet = logging.getLogger("metering.services.health")
quiet.addHandler(logging.NullHandler())
quiet.propagate = False
admin = AdminClient({"bootstrap.servers": bootstrap, "logger": quiet})
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(2)
    try:
        if admin.list_topics(timeout=2).brokers:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(3)
EOF
}

# Fallback when no python with confluent_kafka: port open and the startup line logged.
kafka_health_fallback() {
  local pid=$1 deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    [[ -d "/proc/$pid" ]] || return 2
    if port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$LOG_DIR/kafka/server.log" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  return 3
}

start_kafka() {
  local t0 pid rc=0
  t0="$(now)"
  if pid="$(kafka_pid)"; then
    log "kafka: already running (pid $pid, bootstrap $HOST:$KAFKA_PORT)"
    return 0
  fi
  rm -f "$KAFKA_PID"
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is in use by another process (set METERING_KAFKA_PORT)"
  port_open "$CONTROLLER_PORT" && die "port $CONTROLLER_PORT is in use by another process (set METERING_KAFKA_CONTROLLER_PORT)"
  command -v "$JAVA" >/dev/null || die "java not found (run deploy/local/install.sh)"
  fetch_kafka
  write_kafka_config
  local log4j="-Dlog4j2.configurationFile=$KAFKA_STATE/log4j2.properties"
  if [[ ! -f "$KAFKA_STATE/data/meta.properties" ]]; then
    log "kafka: formatting storage in $KAFKA_STATE/data"
    local cluster_id
    cluster_id=$(new_cluster_id) || exit 1
    "$JAVA" "$log4j" -Dkafka.logs.dir="$LOG_DIR/kafka" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format \
      --config "$KAFKA_STATE/server.properties" --cluster-id "$cluster_id" --ignore-formatted \
      >"$LOG_DIR/kafka/format.log" 2>&1 || { cat "$LOG_DIR/kafka/format.log" >&2; die "kafka storage format failed"; }
  fi
  log "kafka: starting $KAFKA_VERSION on $HOST:$KAFKA_PORT (controller $CONTROLLER_PORT)"
  # setsid: own session, so the caller's Ctrl-C or pipes don't reach the broker.
  # shellcheck disable=SC2086
  setsid "$JAVA" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true "$log4j" -Dkafka.logs.dir="$LOG_DIR/kafka" -Dmetering.state="$STATE_DIR" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_STATE/server.properties" \
    </dev/null >"$LOG_DIR/kafka/stdout.log" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$KAFKA_PID"
  kafka_health "$pid" || rc=$?
  if ((rc == 4)); then
    log "kafka: python confluent_kafka not available; waiting for the startup log line instead"
    rc=0
    kafka_health_fallback "$pid" || rc=$?
  fi
  case $rc in
    0) log "kafka: up in $(elapsed "$t0") s (pid $pid); logs: $LOG_DIR/kafka/server.log" ;;
    2)
      tail -n 40 "$LOG_DIR/kafka/server.log" "$LOG_DIR/kafka/stdout.log" >&2 2>/dev/null || true
      rm -f "$KAFKA_PID"
      die "kafka exited during startup (logs: $LOG_DIR/kafka/)"
      ;;
    *)
      tail -n 40 "$LOG_DIR/kafka/server.log" >&2 2>/dev/null || true
      die "kafka not healthy after ${START_TIMEOUT}s (pid $pid still running; logs: $LOG_DIR/kafka/)"
      ;;
  esac
}

# --- Redis --------------------------------------------------------------------
redis_ping() {
  local reply="" port=${1:-$REDIS_PORT}
  exec 3<>"/dev/tcp/$HOST/$port" || return 1
  printf 'PING\r\n' >&3
  read -r -t 2 reply <&3 || true
  exec 3>&-
  [[ "$reply" == "+PONG"* ]]
}

ensure_redis_installed() {
  command -v redis-server >/dev/null && return 0
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    log "redis: installing redis-server with apt-get"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install -y redis-server)"
}

start_redis() {
  local t0 pid deadline
  t0="$(now)"
  if pid="$(redis_pid)"; then
    log "redis: already running (pid $pid, redis://$HOST:$REDIS_PORT/0)"
    return 0
  fi
  rm -f "$REDIS_PID"
  port_open "$REDIS_PORT" && die "port $REDIS_PORT is in use by another process (set METERING_REDIS_PORT)"
  ensure_redis_installed
  mkdir -p "$REDIS_STATE" "$LOG_DIR"
  cat >"$REDIS_STATE/redis.conf" <<EOF
# Generated by deploy/local/services.sh; rewritten on every start.
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $REDIS_PID
logfile $LOG_DIR/redis.log
dir $REDIS_STATE
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
EOF
  log "redis: starting on $HOST:$REDIS_PORT"
  redis-server "$REDIS_STATE/redis.conf" </dev/null >>"$LOG_DIR/redis.log" 2>&1 9>&- ||
    { tail -n 20 "$LOG_DIR/redis.log" >&2; die "redis-server failed to start"; }
  deadline=$((SECONDS + START_TIMEOUT))
  until redis_ping 2>/dev/null; do
    ((SECONDS < deadline)) || { tail -n 20 "$LOG_DIR/redis.log" >&2; die "redis did not answer PING"; }
    sleep 0.2
  done
  pid="$(redis_pid)" || die "redis answers PING but its pidfile is missing"
  log "redis: up in $(elapsed "$t0") s (pid $pid); logs: $LOG_DIR/redis.log"
}

# --- Redis Cluster (3 masters, no replicas; only when named) -------------------
cluster_cli() { redis-cli -h "$HOST" -p "$1" "${@:2}"; }
cluster_info_field() { cluster_cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }

start_cluster_node() {
  local port=$1 dir="$CLUSTER_STATE/$1" pid deadline
  if pid="$(cluster_node_pid "$port")"; then return 0; fi
  rm -f "$dir/redis.pid"
  port_open "$port" && die "port $port is in use by another process (set METERING_REDIS_CLUSTER_PORTS)"
  port_open $((port + 10000)) && die "cluster bus port $((port + 10000)) is in use by another process"
  mkdir -p "$dir" "$LOG_DIR"
  cat >"$dir/redis.conf" <<CONF
# Generated by deploy/local/services.sh; rewritten on every start (nodes.conf is Redis's own).
bind $HOST
port $port
protected-mode yes
daemonize yes
pidfile $dir/redis.pid
logfile $LOG_DIR/redis-cluster-$port.log
dir $dir
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 5000
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
CONF
  redis-server "$dir/redis.conf" </dev/null >>"$LOG_DIR/redis-cluster-$port.log" 2>&1 9>&- ||
    { tail -n 20 "$LOG_DIR/redis-cluster-$port.log" >&2; die "redis-server (cluster node $port) failed to start"; }
  deadline=$((SECONDS + START_TIMEOUT))
  until redis_ping "$port" 2>/dev/null; do
    ((SECONDS < deadline)) || { tail -n 20 "$LOG_DIR/redis-cluster-$port.log" >&2; die "cluster node $port did not answer PING"; }
    sleep 0.2
  done
}

# Every node: state ok, all 16384 slots served, and it knows every other node.
cluster_ok() {
  local port
  for port in "${CLUSTER_PORTS[@]}"; do
    [[ "$(cluster_info_field "$port" cluster_state)" == ok ]] || return 1
    [[ "$(cluster_info_field "$port" cluster_slots_ok)" == 16384 ]] || return 1
    [[ "$(cluster_info_field "$port" cluster_known_nodes)" == "${#CLUSTER_PORTS[@]}" ]] || return 1
  done
}

start_redis_cluster() {
  local t0 port assigned=0 n deadline addrs=()
  t0="$(now)"
  ensure_redis_installed
  command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install -y redis-tools)"
  for port in "${CLUSTER_PORTS[@]}"; do start_cluster_node "$port"; addrs+=("$HOST:$port"); done
  if cluster_ok; then
    log "redis-cluster: already running (masters ${addrs[*]}, redis+cluster://$HOST:${CLUSTER_PORTS[0]}/)"
    return 0
  fi
  for port in "${CLUSTER_PORTS[@]}"; do
    n="$(cluster_info_field "$port" cluster_slots_assigned)"
    if ((${n:-0} > 0)); then assigned=$((assigned + 1)); fi
  done
  if ((assigned == 0)); then
    log "redis-cluster: creating (${#CLUSTER_PORTS[@]} masters, no replicas)"
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes \
      >"$LOG_DIR/redis-cluster-create.log" 2>&1 ||
      { tail -n 30 "$LOG_DIR/redis-cluster-create.log" >&2; die "redis-cli --cluster create failed"; }
  fi
  # A restarted cluster re-forms from each node's nodes.conf; a new one converges after create.
  deadline=$((SECONDS + START_TIMEOUT))
  until cluster_ok; do
    if ((SECONDS >= deadline)); then
      for port in "${CLUSTER_PORTS[@]}"; do cluster_cli "$port" cluster info 2>&1 | head -n 7 >&2; done
      die "redis-cluster not ok after ${START_TIMEOUT}s (half-created? $0 wipe-redis-cluster, then start)"
    fi
    sleep 0.2
  done
  log "redis-cluster: up in $(elapsed "$t0") s (masters ${addrs[*]}, redis+cluster://$HOST:${CLUSTER_PORTS[0]}/); logs: $LOG_DIR/redis-cluster-*.log"
}

stop_redis_cluster() {
  local port pid any=0
  for port in "${CLUSTER_PORTS[@]}"; do
    if pid="$(cluster_node_pid "$port")"; then stop_pid "redis-cluster:$port" "$pid" 30; any=1; fi
    rm -f "$CLUSTER_STATE/$port/redis.pid"
  done
  ((any)) || log "redis-cluster: not running"
}

status_redis_cluster() {
  local port pid pids=()
  for port in "${CLUSTER_PORTS[@]}"; do
    pid="$(cluster_node_pid "$port")" || { echo "redis-cluster: down (node $port not running)"; return 3; }
    pids+=("$pid")
  done
  if cluster_ok; then
    echo "redis-cluster: up (pids ${pids[*]}, redis+cluster://$HOST:${CLUSTER_PORTS[0]}/, logs $LOG_DIR/redis-cluster-*.log)"
  else
    echo "redis-cluster: down (nodes running, cluster not ok)"
    return 3
  fi
}

wipe_redis_cluster() {
  stop_redis_cluster
  if [[ -e "$CLUSTER_STATE" ]]; then rm -rf "${CLUSTER_STATE:?}"; fi
  log "redis-cluster: state deleted ($CLUSTER_STATE)"
}

# --- kfake: a second Kafka-protocol broker (franz-go's kfake, Go), only when named ----------
# Built once per source version into the cache (the Go module proxy serves its modules).
build_kfake() {
  local version bin go
  go="$(command -v go || true)"
  if [[ -z "$go" && -x /usr/local/go/bin/go ]]; then go=/usr/local/go/bin/go; fi
  [[ -n "$go" ]] || die "go not found: kfake is built with the Go toolchain (https://go.dev/dl, Go >= 1.26)"
  version="$(cat "$KFAKE_SRC/go.mod" "$KFAKE_SRC/go.sum" "$KFAKE_SRC/main.go" | sha256sum | cut -c1-12)"
  bin="$CACHE_DIR/kfake-$version/kfake-broker"
  if [[ ! -x "$bin" ]]; then
    log "kfake: building $KFAKE_SRC with $("$go" version | cut -d' ' -f3) (one time) into $(dirname "$bin")" >&2
    mkdir -p "$(dirname "$bin")"
    (cd "$KFAKE_SRC" && "$go" build -o "$bin.tmp" .) >&2 || die "kfake build failed"
    mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

start_kfake() {
  local t0 pid bin rc=0
  t0="$(now)"
  if pid="$(kfake_pid)"; then
    log "kfake: already running (pid $pid, bootstrap $HOST:$KFAKE_PORT)"
    return 0
  fi
  rm -f "$KFAKE_PID"
  port_open "$KFAKE_PORT" && die "port $KFAKE_PORT is in use by another process (set METERING_KFAKE_PORT)"
  bin="$(build_kfake)"
  mkdir -p "$KFAKE_STATE/data" "$LOG_DIR"
  log "kfake: starting on $HOST:$KFAKE_PORT"
  setsid "$bin" -port "$KFAKE_PORT" -data-dir "$KFAKE_STATE/data" -partitions 4 \
    </dev/null >"$LOG_DIR/kfake.log" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$KFAKE_PID"
  kafka_health "$pid" "$KFAKE_PORT" || rc=$?
  case $rc in
    0) log "kfake: up in $(elapsed "$t0") s (pid $pid); logs: $LOG_DIR/kfake.log" ;;
    *)
      tail -n 20 "$LOG_DIR/kfake.log" >&2 2>/dev/null || true
      die "kfake not healthy (health check exit $rc; logs: $LOG_DIR/kfake.log)"
      ;;
  esac
}

stop_kfake() {
  local pid
  if pid="$(kfake_pid)"; then stop_pid kfake "$pid" 30; else log "kfake: not running"; fi
  rm -f "$KFAKE_PID"
}

status_kfake() {
  local pid
  if pid="$(kfake_pid)"; then
    echo "kfake: up (pid $pid, bootstrap $HOST:$KFAKE_PORT, logs $LOG_DIR/kfake.log)"
  else
    echo "kfake: down"
    return 3
  fi
}

# --- stop / status --------------------------------------------------------------
stop_pid() {
  local name=$1 pid=$2 grace=$3 i
  log "$name: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do
    [[ -d "/proc/$pid" ]] || { log "$name: stopped"; return 0; }
    sleep 0.2
  done
  log "$name: did not stop within ${grace}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
}

stop_kafka() {
  local pid
  if pid="$(kafka_pid)"; then stop_pid kafka "$pid" 60; else log "kafka: not running"; fi
  rm -f "$KAFKA_PID"
}

stop_redis() {
  local pid
  if pid="$(redis_pid)"; then stop_pid redis "$pid" 30; else log "redis: not running"; fi
  rm -f "$REDIS_PID"
}

status_kafka() {
  local pid
  if pid="$(kafka_pid)"; then
    echo "kafka: up (pid $pid, bootstrap $HOST:$KAFKA_PORT, logs $LOG_DIR/kafka/server.log)"
  else
    echo "kafka: down"
    return 3
  fi
}

status_redis() {
  local pid
  if pid="$(redis_pid)" && redis_ping 2>/dev/null; then
    echo "redis: up (pid $pid, redis://$HOST:$REDIS_PORT/0, logs $LOG_DIR/redis.log)"
  else
    echo "redis: down"
    return 3
  fi
}

wipe() {
  stop_kafka
  stop_redis
  stop_redis_cluster
  stop_kfake
  # Only the folders this project owns, never the state root itself (it may be user-chosen).
  local d
  # clickhouse-demo-<stamp>: one chDB folder per `metering demo`; faust: `worker alerts`' tables
  for d in kafka redis redis-cluster kfake logs clickhouse "$STATE_DIR"/clickhouse-demo-* faust; do
    d="${d##*/}"
    if [[ -e "$STATE_DIR/$d" ]]; then rm -rf "${STATE_DIR:?}/${d:?}"; fi
  done
  rm -f "$STATE_DIR/.services.lock"
  rmdir "$STATE_DIR" 2>/dev/null || true
  log "wiped state in $STATE_DIR (jar cache kept in $CACHE_DIR)"
}

USAGE="usage: $0 start|stop|status|restart|logs [kafka|redis|redis-cluster|kfake|all ...] | fetch | env | wipe | wipe-redis-cluster"

# The log files of one service (those that exist), for `logs`.
log_files() {
  case $1 in
    kafka) compgen -G "$LOG_DIR/kafka/*.log" || true ;;
    redis) compgen -G "$LOG_DIR/redis.log" || true ;;
    redis_cluster) compgen -G "$LOG_DIR/redis-cluster-*.log" || true ;;
    kfake) compgen -G "$LOG_DIR/kfake.log" || true ;;
  esac
}

show_logs() {
  local f found=0 lines=${METERING_LOG_LINES:-40}
  [[ $lines =~ ^[0-9]+$ ]] || usage "METERING_LOG_LINES must be a number of lines (got: $lines)"
  while IFS= read -r f; do
    [[ -n $f ]] || continue
    found=1
    printf '==> %s <==\n' "$f"
    tail -n "$lines" "$f"
  done < <(log_files "$1")
  ((found)) || echo "${1//_/-}: no log in $LOG_DIR (never started with this METERING_STATE_DIR)"
}

# A usage error: what is wrong, the usage line, exit 2 (nothing done).
usage() {
  printf '[services] ERROR: %s\n%s\n' "$1" "$USAGE" >&2
  exit 2
}

main() {
  local cmd=${1:-} services=() s t rc=0
  shift || true
  case $cmd in
    -h | --help | help) echo "$USAGE"; return 0 ;;
    start | stop | restart | status | logs) ;;
    fetch | env | wipe | wipe-redis-cluster) # these take no service: `wipe kafka` would delete every state
      (($# == 0)) || usage "$cmd takes no service name (got: $*)" ;;
    "") usage "no command given" ;;
    *) usage "unknown command '$cmd'" ;;
  esac
  (($# > 0)) || set -- all
  for t in "$@"; do # every service named, in order (`start kafka redis`)
    case $t in
      all) # starts Kafka + Redis; stops whatever of the four runs (kfake, the cluster: tests')
        if [[ $cmd == stop || $cmd == logs ]]; then services+=(kafka redis redis_cluster kfake); else services+=(kafka redis); fi ;;
      kafka | redis) services+=("$t") ;;
      redis-cluster) services+=(redis_cluster) ;;
      kfake) services+=(kfake) ;;
      *) usage "unknown service '$t' (kafka, redis, redis-cluster, kfake or all)" ;;
    esac
  done
  case $cmd in
    start | stop | restart | wipe | wipe-redis-cluster)
      mkdir -p "$STATE_DIR"
      # One start/stop at a time (e.g. parallel test processes). Servers don't inherit fd 9.
      exec 9>"$STATE_DIR/.services.lock"
      flock -w 300 9 || die "timed out waiting for another services.sh"
      ;;
  esac
  case $cmd in
    start) for s in "${services[@]}"; do "start_$s"; done ;;
    stop) for s in "${services[@]}"; do "stop_$s"; done ;;
    restart) for s in "${services[@]}"; do "stop_$s"; "start_$s"; done ;;
    status) for s in "${services[@]}"; do "status_$s" || rc=$?; done; return "$rc" ;;
    logs) for s in "${services[@]}"; do show_logs "$s"; done ;;
    fetch) fetch_kafka ;; # silent when the jars are already cached
    env)
      echo "export METERING_KAFKA_BOOTSTRAP=$HOST:$KAFKA_PORT"
      echo "export METERING_REDIS_URL=redis://$HOST:$REDIS_PORT/0"
      echo "export METERING_CLICKHOUSE_DSN=chdb://$STATE_DIR/clickhouse"
      echo "export METERING_REDIS_CLUSTER_URL=redis+cluster://$HOST:${CLUSTER_PORTS[0]}/"
      echo "# kfake (only when started by name): METERING_KAFKA_BOOTSTRAP=$HOST:$KFAKE_PORT"
      ;;
    wipe) wipe ;;
    wipe-redis-cluster) wipe_redis_cluster ;;
  esac
}

main "$@"
