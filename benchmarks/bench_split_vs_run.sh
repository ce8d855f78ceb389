#!/usr/bin/env bash
# `metering run` (one process) vs split mode (2x `worker rating`, `worker debit`, `worker sink`)
# on the same pre-produced stream, on the local stack. Prints rated rows in ClickHouse and the
# wall time from start to the last process exiting (includes start-up and the idle exits:
# 3 s for run; 3/6/9 s for rating/debit/sink, so each stage waits for the one before it).
#
#   bash benchmarks/bench_split_vs_run.sh [events]      (default 200000; flushes Redis db 15)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-200000}
python3 -c "from metering.local_services import ensure_started; ensure_started()" >/dev/null

one() {
  local mode=$1
  export METERING_TOPIC_PREFIX="sb${RANDOM}${RANDOM}." METERING_GROUP_PREFIX="sb${RANDOM}${RANDOM}"
  export METERING_REDIS_URL=redis://127.0.0.1:${METERING_REDIS_PORT:-16379}/15 METERING_METRICS_PORT=0
  export METERING_CLICKHOUSE_DSN="chdb://$(mktemp -d)/ch"
  redis-cli -p "${METERING_REDIS_PORT:-16379}" -n 15 flushdb >/dev/null
  metering setup >/dev/null
  metering accounts import deploy/examples/accounts.yaml >/dev/null
  metering simulate --count "$N" --seed 3 --duplicates 0.01 --malformed 0.005 >/dev/null
  local t0 t1
  t0=$(date +%s.%N)
  if [[ $mode == run ]]; then
    metering run --until-idle 3 2>/dev/null
  else
    metering worker rating --until-idle 3 2>/dev/null &
    metering worker rating --until-idle 3 2>/dev/null &
    metering worker debit --until-idle 6 2>/dev/null &
    metering worker sink --until-idle 9 2>/dev/null &
    wait
  fi
  t1=$(date +%s.%N)
  python3 - "$mode" "$t0" "$t1" <<'PY'
import os, sys
import clickhouse_connect
mode, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
c = clickhouse_connect.get_client(dsn=os.environ["METERING_CLICKHOUSE_DSN"])
n = c.query("SELECT count() FROM metering.rated_usage FINAL").result_rows[0][0]
print(f"{mode:6} rated rows {n:,}  wall {t1 - t0:.1f} s")
PY
}
one run
one split
