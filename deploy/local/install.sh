#!/usr/bin/env bash
# Installs what this project needs on a fresh Debian machine: redis-server (and Java/Maven if
# missing), the Python package in editable mode with dev extras, and the Kafka jars.
# Idempotent; prints nothing but a final line when everything is already in place.
#
#   METERING_PYTHON  interpreter to install into (default: python3 on PATH)
#   METERING_CACHE   cache for the Kafka jars and install stamps (default ~/.cache/metering)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${METERING_PYTHON:-$(command -v python3 || command -v python)}"
CACHE_DIR="${METERING_CACHE:-$HOME/.cache/metering}"
did=0

log() { printf '[install] %s\n' "$*"; }

# 1. System packages (Debian).
pkgs=()
command -v redis-server >/dev/null || pkgs+=(redis-server)
command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || pkgs+=(maven)
if ((${#pkgs[@]})); then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  log "apt-get install ${pkgs[*]}"
  "${sudo[@]}" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  did=1
fi

# 2. The Python package, editable with dev extras. Skipped when this interpreter already has
#    this checkout installed from the same pyproject.toml (stamp keyed by interpreter + repo).
key="$("$PYTHON" -c 'import sys; print(sys.prefix)')|$REPO_ROOT"
stamp="$CACHE_DIR/install-stamps/$(printf '%s' "$key" | sha256sum | cut -c1-16)"
want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-64)"
installed_here() {
  (cd / && "$PYTHON" -c 'import metering, sys; print(metering.__file__)' 2>/dev/null) |
    grep -qF "$REPO_ROOT/metering/"
}
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! installed_here; then
  log "pip install -e '.[dev]' into $PYTHON"
  (cd "$REPO_ROOT" && "$PYTHON" -m pip install -q --root-user-action=ignore -e '.[dev]')
  mkdir -p "$(dirname "$stamp")"
  echo "$want" >"$stamp"
  did=1
fi

# 3. Kafka jars (prints only when it downloads).
out="$(METERING_PYTHON="$PYTHON" bash "$REPO_ROOT/deploy/local/services.sh" fetch)"
if [[ -n "$out" ]]; then
  echo "$out"
  did=1
fi

if ((did)); then log "done"; else log "already installed"; fi
