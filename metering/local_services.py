"""Local Kafka and Redis for tests and the demo, driven by ``deploy/local/services.sh``.

ClickHouse needs no server locally: the default DSN points at an embedded chDB folder.

Environment overrides (read by :func:`endpoints`):
  METERING_KAFKA_BOOTSTRAP, METERING_REDIS_URL, METERING_CLICKHOUSE_DSN: use these endpoints;
    a service whose endpoint is overridden is not started locally by :func:`ensure_started`.
  METERING_KAFKA_PORT (19092), METERING_REDIS_PORT (16379), METERING_STATE_DIR (<repo>/.state):
    shared with services.sh.
  METERING_REDIS_CLUSTER_URL (redis+cluster://127.0.0.1:17001/), METERING_REDIS_CLUSTER_PORTS
    ("17001 17002 17003"): the optional 3-master Redis Cluster, service "redis-cluster". It is
    started only when asked for (``ensure_started(("redis-cluster",))``), never by default.
  METERING_KFAKE_BOOTSTRAP (127.0.0.1:19192), METERING_KFAKE_PORT: service "kfake", a second,
    independent Kafka-protocol broker (franz-go's kfake, built with Go) that the tests run the
    pipeline on as well; also started only when asked for.
  METERING_SERVICES_SCRIPT: path to services.sh when the package is not run from a checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Endpoints",
    "ServiceError",
    "endpoints",
    "ensure_started",
    "services_script",
    "state_dir",
    "status",
    "stop",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SERVER_SERVICES = ("kafka", "redis", "redis-cluster", "kfake")
_KNOWN_SERVICES = (*_SERVER_SERVICES, "clickhouse")
_OVERRIDE_VARS = {
    "kafka": "METERING_KAFKA_BOOTSTRAP",
    "redis": "METERING_REDIS_URL",
    "redis-cluster": "METERING_REDIS_CLUSTER_URL",
    "kfake": "METERING_KFAKE_BOOTSTRAP",
    "clickhouse": "METERING_CLICKHOUSE_DSN",
}
_DEFAULT_CLUSTER_PORTS = "17001 17002 17003"


class ServiceError(RuntimeError):
    """services.sh failed; the message carries the tail of its output."""


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    redis_url: str
    clickhouse_dsn: str
    # the optional local Redis Cluster (a worker uses it when METERING_REDIS_URL is set to it)
    redis_cluster_url: str = "redis+cluster://127.0.0.1:17001/"
    # the optional second Kafka-protocol broker (a worker uses it through METERING_KAFKA_BOOTSTRAP)
    kfake_bootstrap: str = "127.0.0.1:19192"

    def as_env(self) -> dict[str, str]:
        """The endpoints as the METERING_* variables the workers read (the cluster URL is not
        one of them: point METERING_REDIS_URL at it to run on the cluster)."""
        return {
            "METERING_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "METERING_REDIS_URL": self.redis_url,
            "METERING_CLICKHOUSE_DSN": self.clickhouse_dsn,
        }


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("METERING_STATE_DIR") or _REPO_ROOT / ".state")


def endpoints(env: Mapping[str, str] | None = None) -> Endpoints:
    """Endpoints of the local services, or the ones set in the environment."""
    env = os.environ if env is None else env
    kafka_port = env.get("METERING_KAFKA_PORT") or "19092"
    redis_port = env.get("METERING_REDIS_PORT") or "16379"
    cluster_port = (env.get("METERING_REDIS_CLUSTER_PORTS") or _DEFAULT_CLUSTER_PORTS).split()[0]
    return Endpoints(
        kafka_bootstrap=env.get("METERING_KAFKA_BOOTSTRAP") or f"127.0.0.1:{kafka_port}",
        redis_url=env.get("METERING_REDIS_URL") or f"redis://127.0.0.1:{redis_port}/0",
        clickhouse_dsn=env.get("METERING_CLICKHOUSE_DSN")
        or f"chdb://{state_dir(env) / 'clickhouse'}",
        redis_cluster_url=env.get("METERING_REDIS_CLUSTER_URL") or f"redis+cluster://127.0.0.1:{cluster_port}/",
        kfake_bootstrap=env.get("METERING_KFAKE_BOOTSTRAP")
        or f"127.0.0.1:{env.get('METERING_KFAKE_PORT') or '19192'}",
    )


def services_script() -> Path:
    script = Path(
        os.environ.get("METERING_SERVICES_SCRIPT") or _REPO_ROOT / "deploy/local/services.sh"
    )
    if not script.is_file():
        raise ServiceError(
            f"{script} not found: local services need a source checkout "
            "(or set METERING_SERVICES_SCRIPT)"
        )
    return script


def _run(args: list[str], *, stream: bool = True) -> int:
    """Run services.sh, echoing its lines to stderr; raise ServiceError on exit codes other than 0/3."""
    cmd = ["bash", str(services_script()), *args]
    env = {**os.environ, "METERING_PYTHON": os.environ.get("METERING_PYTHON") or sys.executable}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if stream:
                sys.stderr.write(line)
                sys.stderr.flush()
        rc = proc.wait()
    if rc not in (0, 3):
        raise ServiceError(f"{' '.join(cmd)} exited with {rc}:\n{''.join(tail)}")
    return rc


def _select(services: Iterable[str]) -> list[str]:
    chosen = list(services)
    unknown = sorted(set(chosen) - set(_KNOWN_SERVICES))
    if unknown:
        raise ValueError(f"unknown services {unknown}; known: {list(_KNOWN_SERVICES)}")
    return chosen


def ensure_started(services: Iterable[str] = ("kafka", "redis")) -> Endpoints:
    """Start the local services that are not running yet and return all endpoints.

    A service whose endpoint is overridden in the environment is left alone.
    "clickhouse" only creates the chDB folder (embedded, no server). "redis-cluster" (three
    masters on 17001-17003) starts only when listed.
    """
    chosen = _select(services)
    for name in _SERVER_SERVICES:
        if name in chosen and not os.environ.get(_OVERRIDE_VARS[name]):
            _run(["start", name])
    eps = endpoints()
    if "clickhouse" in chosen and eps.clickhouse_dsn.startswith("chdb://"):
        Path(eps.clickhouse_dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return eps


def stop(services: Iterable[str] = ("kafka", "redis")) -> None:
    """Stop the local services (SIGTERM, then SIGKILL after a grace period)."""
    for name in _select(services):
        if name in _SERVER_SERVICES:
            _run(["stop", name])


def status(services: Iterable[str] = ("kafka", "redis")) -> dict[str, bool]:
    """Whether each local server is up."""
    return {
        name: _run(["status", name], stream=False) == 0
        for name in _select(services)
        if name in _SERVER_SERVICES
    }
