#!/usr/bin/env bash
# README command 2: the full test suite on real Kafka, Redis and chDB, from a fresh machine.
# Installs what is missing, starts the local services, runs pytest, stops what it started.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
bash deploy/local/install.sh
# Services already up (a demo, a developer's session on the same state dir) are used and left
# running; the ones this run starts are stopped at the end. The tests start the 3-master Redis
# Cluster and the second broker (kfake) themselves.
already=" "
for s in kafka redis redis-cluster kfake; do
  if bash deploy/local/services.sh status "$s" >/dev/null 2>&1; then already+="$s "; fi
done
stop_started() {
  for s in kafka redis redis-cluster kfake; do
    [[ $already == *" $s "* ]] || bash deploy/local/services.sh stop "$s" >/dev/null 2>&1 || true
  done
}
trap stop_started EXIT
bash deploy/local/services.sh start
set +e
python3 -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc
