#!/usr/bin/env bash
# README command 2: the full test suite on real Kafka, Redis and chDB, from a fresh machine.
# Installs what is missing, starts the local services, runs pytest, stops what it started.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
bash deploy/local/install.sh
bash deploy/local/services.sh start
# tests/test_redis_cluster.py starts the 3-master Redis Cluster itself; stopped here too
trap 'bash deploy/local/services.sh stop >/dev/null 2>&1 || true; bash deploy/local/services.sh stop redis-cluster >/dev/null 2>&1 || true' EXIT
set +e
python3 -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc
