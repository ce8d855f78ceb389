"""Prometheus metrics and the /healthz, /readyz endpoints every worker serves."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

from schemas.records import REJECT_REASONS, WALLET_EVENT_TYPES

CONSUMED = Counter("metering_consumed_total", "Messages consumed", ["stage"])
RATED = Counter("metering_rated_total", "Events rated", ["kind"])
REJECTED = Counter("metering_rejected_total", "Events rejected", ["reason"])
DUPLICATES = Counter("metering_duplicates_total", "Duplicate events (not charged)", ["conflict"])
CHARGED_MICROS = Counter("metering_charged_micros_total", "Money charged, micros")
BATCH_SECONDS = Histogram(
    "metering_batch_seconds", "Wall time to process one batch", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram("metering_batch_events", "Events per batch", ["stage"],
                       buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000))
CONSUMER_LAG = Gauge("metering_consumer_lag", "Messages behind the log end", ["stage", "topic", "partition"])
REDIS_ERRORS = Counter("metering_redis_errors_total", "Redis errors (retried)")
CLICKHOUSE_ERRORS = Counter("metering_clickhouse_errors_total", "ClickHouse errors (retried)")
KAFKA_ERRORS = Counter("metering_kafka_errors_total", "Kafka errors", ["where"])
WALLET_EVENTS = Counter("metering_wallet_events_total", "Wallet events emitted", ["type"])
ALERTS = Counter("metering_alerts_total", "Wallet events read by the alerts worker, by what became of "
                 "them (notified, duplicate: already notified, invalid: unreadable)", ["outcome"])
WALLETS_BLOCKED = Counter("metering_wallets_blocked_total", "Wallets that became blocked")
TOPUPS_REQUESTED = Counter("metering_topups_requested_total", "Auto top-ups requested")
CATALOG_VERSION = Gauge("metering_catalog_info", "Loaded catalog version", ["version"])
END_TO_END_SECONDS = Histogram(
    "metering_end_to_end_seconds",
    "Kafka produce timestamp to queryable in ClickHouse, per event", ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30),
)

# Every label value known in advance is exported at 0 from the start: a series that first
# appears at 5 looks like "no change" to rate()/increase(), so the first rejects of a reason,
# the first duplicates, the first blocked wallets would never show in an alert.
for _reason in REJECT_REASONS:
    REJECTED.labels(reason=_reason)
for _kind in ("call", "sms", "meter"):
    RATED.labels(kind=_kind)
for _conflict in ("false", "true"):
    DUPLICATES.labels(conflict=_conflict)
for _type in WALLET_EVENT_TYPES:
    WALLET_EVENTS.labels(type=_type)
for _outcome in ("notified", "duplicate", "invalid"):
    ALERTS.labels(outcome=_outcome)


def init_stage(stage: str) -> None:
    """Export a worker stage's per-stage series at 0 before its first batch."""
    CONSUMED.labels(stage=stage)
    BATCH_SECONDS.labels(stage=stage)
    BATCH_SIZE.labels(stage=stage)


STORE_REWINDS = Counter("metering_store_rewinds_total",
                        "Partitions replayed because Redis held less than Kafka had committed", ["stage"])
STALE_RETRIES = Counter("metering_stale_snapshot_total", "Batches re-settled after a concurrent write")


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request: a slow /readyz must not hold /healthz or /metrics back."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


# What /readyz asks the worker: True/False, or a mapping with "ready" and what is wrong
# (e.g. {"ready": False, "redis": True, "waiting": ["clickhouse insert"]}), shown when not ready.
Readiness = Callable[[], bool | Mapping[str, Any]]


class HealthServer:
    """/metrics, /healthz (alive) and /readyz (`ready()`, False until the worker sets it) on
    0.0.0.0:port, served from a thread. Bound before the worker starts, so a port in use is a
    one-line start-up error and not a half-started process."""

    def __init__(self, port: int) -> None:
        from metering.config import ConfigError

        self.ready: Readiness = lambda: False
        metrics_app = make_wsgi_app(REGISTRY)

        def app(environ, start_response):  # type: ignore[no-untyped-def]
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "application/json")])
                return [b'{"status":"ok"}']
            if path == "/readyz":
                state = self.ready()
                ok = state if isinstance(state, bool) else bool(state.get("ready"))
                body = {"ready": ok} if ok or isinstance(state, bool) else {**state, "ready": False}
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [json.dumps(body, separators=(",", ":")).encode()]
            return metrics_app(environ, start_response)

        try:
            self.server = make_server("0.0.0.0", port, app, server_class=_ThreadingServer, handler_class=_Quiet)
        except OSError as exc:
            raise ConfigError(f"metrics port {port}: {exc.strerror} (another worker on it?); set "
                              f"METERING_METRICS_PORT or --metrics-port, 0 turns it off") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"metrics:{port}", daemon=True)
        self.thread.start()


def serve_metrics(port: int, ready: Readiness | None = None) -> HealthServer | None:
    """Start the health/metrics server on `port` (0: none)."""
    if not port:
        return None
    server = HealthServer(port)
    if ready is not None:
        server.ready = ready
    return server


def set_ready(server: HealthServer | None, ready: Readiness) -> None:
    if server is not None:
        server.ready = ready
