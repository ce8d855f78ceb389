#!/usr/bin/env bash
# README command 1: start the local stack, stream realistic CDR traffic through the whole
# pipeline (Kafka -> rating -> Redis wallets -> ClickHouse) and print what operators and
# analysts look at. Env: DEMO_EVENTS (default 200000), DEMO_RATE (events/s, default 4000).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
bash deploy/local/install.sh
bash deploy/local/services.sh start
export METERING_STATE_DIR="${METERING_STATE_DIR:-$REPO_ROOT/.state}"
export METERING_TOPIC_PREFIX="demo$(date +%s)."
export METERING_GROUP_PREFIX="demo$(date +%s)"
export METERING_CLICKHOUSE_DSN="chdb://$METERING_STATE_DIR/clickhouse-demo-$(date +%s)"
export METERING_METRICS_PORT="${METERING_METRICS_PORT:-9100}"
redis-cli -p "${METERING_REDIS_PORT:-16379}" -n 0 flushdb >/dev/null
metering setup
metering accounts import deploy/examples/accounts.yaml
echo "== streaming ${DEMO_EVENTS:-200000} events at ${DEMO_RATE:-4000}/s (metrics on :$METERING_METRICS_PORT/metrics)"
metering simulate --count "${DEMO_EVENTS:-200000}" --rate "${DEMO_RATE:-4000}" --seed "$(date +%s)" \
  --duplicates 0.02 --malformed 0.01 &
sim=$!
metering run --until-idle 5 2> >(python3 -c '
import sys, json
for line in sys.stdin:
    try: d = json.loads(line)
    except ValueError: sys.stderr.write(line); continue
    if d.get("level") in ("warning", "error"): sys.stderr.write(line)
' ) &
run=$!
while kill -0 "$run" 2>/dev/null; do
  sleep 5
  python3 -m metering.progress "$METERING_METRICS_PORT" || true
done
wait "$sim" || true
wait "$run"
metering report
