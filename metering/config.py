"""Runtime settings: environment variables (METERING_*) with CLI overrides.

Every worker, the demo and the API read the same names, so a docker-compose file or a
Kubernetes ConfigMap configures them all the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from metering.local_services import endpoints

_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Topics:
    events: str = "usage.events"  # CDRs from switches, key = account_id
    rejected: str = "usage.rejected"  # original bytes + reason headers
    wallet_events: str = "wallet.events"  # blocked, top-up requested, usage alerts...
    priced: str = "usage.priced"  # rating worker -> debit worker (split mode)
    rated: str = "usage.rated"  # debit worker -> sink worker (split mode)
    movements: str = "wallet.movements"  # operator credits / top-ups -> ClickHouse


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str
    redis_url: str
    clickhouse_dsn: str
    clickhouse_database: str = "metering"
    catalog_path: str = str(_REPO / "deploy/examples/catalog.yaml")
    accounts_path: str = str(_REPO / "deploy/examples/accounts.yaml")
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4
    group_prefix: str = "metering"
    batch_size: int = 5000  # messages per consume() call
    batch_timeout_s: float = 0.2  # max wait to fill a batch
    max_message_bytes: int = 64 * 1024  # larger values are poison (rejected, not rated)
    metrics_port: int = 9100  # 0: no metrics/health server
    catalog_check_s: float = 2.0  # how often the catalog file's mtime is checked
    # Kafka static membership (group.instance.id): a restarted worker with the same id gets its
    # partitions back at once instead of after the session timeout (k8s: the pod name).
    instance_id: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        ep = endpoints(env)
        values: dict[str, Any] = {
            "kafka_bootstrap": ep.kafka_bootstrap,
            "redis_url": ep.redis_url,
            "clickhouse_dsn": ep.clickhouse_dsn,
        }
        ints = {"partitions", "batch_size", "max_message_bytes", "metrics_port"}
        floats = {"batch_timeout_s", "catalog_check_s"}
        for f in fields(cls):
            name = f"METERING_{f.name.upper()}"
            if f.name == "catalog_path":
                name = "METERING_CATALOG"
            elif f.name == "accounts_path":
                name = "METERING_ACCOUNTS"
            if name in env and f.name not in values:
                raw = env[name]
                try:
                    values[f.name] = int(raw) if f.name in ints else float(raw) if f.name in floats else raw
                except ValueError:
                    raise SystemExit(f"error: {name}={raw!r} is not a number") from None
        prefix = env.get("METERING_TOPIC_PREFIX", "")
        if prefix:  # isolated topic sets on a shared broker (tests, staging)
            values["topics"] = Topics(*(prefix + getattr(Topics(), f.name) for f in fields(Topics)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
