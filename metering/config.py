"""Runtime settings: environment variables (METERING_*) with CLI overrides.

Every worker, the demo and the API read the same names, so a docker-compose file or a
Kubernetes ConfigMap configures them all the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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


class ConfigError(ValueError):
    """A setting that cannot work, named by its environment variable."""


# (lowest, highest) allowed for the numeric settings; a batch of 0 or a negative timeout
# would spin or never return, a message limit of 0 would reject every event.
_RANGES: dict[str, tuple[float, float]] = {
    "partitions": (1, 10_000),
    "batch_size": (1, 1_000_000),
    "batch_timeout_s": (0.001, 60),
    "max_message_bytes": (64, 16 * 1024 * 1024),
    "metrics_port": (0, 65_535),
    "catalog_check_s": (0.1, 3_600),
    "progress_s": (0, 86_400),
    "api_port": (1, 65_535),
    "hold_ttl_s": (1, 30 * 86_400),
}


def _range_errors(values: dict[str, Any], source: Callable[[str], str]) -> list[str]:
    """One message per value of `values` outside its _RANGES, naming its `source(setting)`."""
    errors = []
    for name, value in values.items():
        low, high = _RANGES[name]
        if not low <= value <= high:
            errors.append(f"{name}={value} ({source(name)}): expected {low:,} to {high:,}")
    return errors


def env_name(setting: str) -> str:
    """The environment variable of a setting (METERING_CATALOG for catalog_path...)."""
    special = {"catalog_path": "METERING_CATALOG", "accounts_path": "METERING_ACCOUNTS"}
    return special.get(setting, f"METERING_{setting.upper()}")


# Settings not read from a variable of their own: the topic names come from
# METERING_TOPIC_PREFIX (a variable named after the `topics` field was once read as a string in
# place of the Topics, and every command then died with a traceback).
_NOT_FROM_ENV = {"topics"}


def env_names() -> list[str]:
    """Every METERING_* variable Settings.from_env reads, besides METERING_TOPIC_PREFIX."""
    return [env_name(f.name) for f in fields(Settings) if f.name not in _NOT_FROM_ENV]


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
    progress_s: float = 10.0  # workers log a progress line this often while they work (0: never)
    # Kafka static membership (group.instance.id): a restarted worker with the same id gets its
    # partitions back at once instead of after the session timeout (k8s: the pod name).
    instance_id: str = ""
    # the dialer API (`metering serve-api`)
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    hold_ttl_s: int = 7200  # grace after the longest call a hold allows

    def __post_init__(self) -> None:
        errors = _range_errors({name: getattr(self, name) for name in _RANGES}, env_name)
        if errors:
            raise ConfigError("; ".join(errors))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, options: dict[str, str] | None = None,
                 **overrides: Any) -> Settings:
        """The settings from `env` (default os.environ), then `overrides` (not None: given on
        the command line). An error names where a bad value came from: the variable, or for an
        override the option `options` maps its setting to (`{"api_port": "--port"}`)."""
        env = dict(os.environ if env is None else env)
        given = {k for k, v in overrides.items() if v is not None}

        def source(setting: str) -> str:
            if setting in given:
                return (options or {}).get(setting, "--" + setting.replace("_", "-"))
            return env_name(setting)
        ep = endpoints(env)
        values: dict[str, Any] = {
            "kafka_bootstrap": ep.kafka_bootstrap,
            "redis_url": ep.redis_url,
            "clickhouse_dsn": ep.clickhouse_dsn,
        }
        ints = {"partitions", "batch_size", "max_message_bytes", "metrics_port", "api_port", "hold_ttl_s"}
        floats = {"batch_timeout_s", "catalog_check_s", "progress_s"}
        unreadable = []  # every bad setting in one error, with the out-of-range ones below
        for f in fields(cls):
            name = env_name(f.name)
            if name in env and f.name not in values and f.name not in _NOT_FROM_ENV:
                raw = env[name]
                try:
                    values[f.name] = int(raw) if f.name in ints else float(raw) if f.name in floats else raw
                except ValueError:
                    kind = "a whole number" if f.name in ints else "a number"
                    unreadable.append(f"{name}={raw!r}: expected {kind}")
        prefix = env.get("METERING_TOPIC_PREFIX", "")
        if prefix:  # isolated topic sets on a shared broker (tests, staging)
            values["topics"] = Topics(*(prefix + getattr(Topics(), f.name) for f in fields(Topics)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unreadable += _range_errors({k: v for k, v in values.items() if k in _RANGES}, source)
        if unreadable:
            raise ConfigError("; ".join(unreadable))
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
