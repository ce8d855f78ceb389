#!/usr/bin/env bash
# README command 1: install what is missing, then `metering demo`: start the local stack
# (Kafka KRaft + Redis; chDB embedded), stream realistic CDR traffic through the whole pipeline
# (Kafka -> rating -> Redis wallets -> ClickHouse) for about a minute with a live progress line,
# then print the operator summary and the analyst report. Options: --seconds, --rate, --seed,
# --metrics-port (see `metering demo --help`). Services keep running afterwards;
# `bash deploy/local/services.sh stop` stops them.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
bash deploy/local/install.sh
exec python3 -m metering.cli demo "$@"
