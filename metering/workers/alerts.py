"""`wallet.events` -> customer notifications, exactly one per distinct alert (faust-streaming).

The pipeline emits wallet events at least once: a replay after a crash re-emits the very same
event (same account, type, cause event id, package, percent). This worker turns them into
customer notifications on `notifications` and drops the repeats with a Faust Table whose
changelog topic (`<app id>-alerts-sent-changelog`) is recovered on every start, so a restarted
or rebalanced worker still knows what was already sent.

Why Faust here and not on the hot path: this is a low-volume (a few events per account per
day), stateful, per-key stream where a changelog-backed table is exactly the model we want;
the rating/debit path stays on confluent-kafka batches (see benchmarks/bench_faust.py).

Guarantee: repeats of an alert are dropped at once (in memory) and across restarts (the table
is rebuilt from its changelog). Default `exactly_once`: the notification, the table's
changelog write and the source offsets commit in one Kafka transaction (every ~2.8 s, Faust's
commit interval), so a kill -9 between sending and recording does not double-send (one gap is
left: a periodic commit landing between the notification's send and the table write's flush,
two awaits apart, followed by a kill before the next commit, repeats that one notification);
readers of `notifications` must use isolation.level=read_committed (librdkafka's default;
aiokafka's is not). `at_least_once` sends at once but may repeat one notification after a crash.

Run: `run_alerts_worker(Settings.from_env())` (or `python -m metering.workers.alerts`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import msgspec

from metering import metrics
from metering.config import ConfigError, Settings
from metering.local_services import state_dir
from metering.logs import log
from schemas.messages import Notification, WalletEventOut

LOG = logging.getLogger("metering.alerts")
NOTIFICATIONS = "notifications"
TABLE = "alerts-sent"

_decode_event = msgspec.json.Decoder(WalletEventOut).decode
_encode = msgspec.json.Encoder().encode


def alert_key(e: WalletEventOut) -> str:
    """Deterministic identity of an alert: a replayed wallet event gets the same key."""
    pct = "" if e.percent is None else str(e.percent)
    return f"{e.account_id}|{e.type}|{e.event_id or ''}|{e.package_id or ''}|{pct}"


def notification_text(e: WalletEventOut) -> str:
    if e.type == "blocked":
        return f"Outbound calls are blocked: your balance is {e.balance}."
    if e.type == "unblocked":
        return f"Outbound calls are allowed again: your balance is {e.balance}."
    if e.type == "topup_requested":
        return f"An automatic top-up was requested: your balance is {e.balance}."
    if e.type == "low_balance":
        return f"Your balance is low: {e.balance}."
    if e.type == "usage_threshold":
        return f"You have used {e.percent}% of package {e.package_id}."
    return f"Wallet event {e.type}: your balance is {e.balance}."


def to_notification(e: WalletEventOut, key: str) -> Notification:
    return Notification(
        notification_id=hashlib.blake2b(key.encode(), digest_size=16).hexdigest(),
        account_id=e.account_id, type=e.type, text=notification_text(e), balance=e.balance,
        at=e.at.isoformat(), event_id=e.event_id, package_id=e.package_id, percent=e.percent,
    )


def notifications_topic(settings: Settings) -> str:
    """`notifications` with the same prefix (METERING_TOPIC_PREFIX) as `wallet.events`."""
    base = "wallet.events"
    name = settings.topics.wallet_events
    prefix = name[: -len(base)] if name.endswith(base) else ""
    return prefix + NOTIFICATIONS


def broker_urls(bootstrap: str) -> list[str]:
    """`host:port,host:port` -> Faust's `kafka://host:port` list."""
    return [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]


@dataclass
class AlertStats:
    received: int = 0
    notified: int = 0
    duplicates: int = 0
    invalid: int = 0
    ready_at: float | None = None  # table recovery done (monotonic)
    last_event_at: float = field(default_factory=time.monotonic)


def make_app(settings: Settings, *, data_dir: str | Path | None = None,
             guarantee: str = "exactly_once",
             until_idle_s: float | None = None) -> tuple[faust.App, AlertStats]:
    """The Faust app: one agent on `wallet.events`, one dedupe table, one output topic.

    `until_idle_s`: stop (gracefully, via SIGTERM to this process) once the tables are
    recovered and no wallet event arrived for that many seconds (tests, backfills).
    """
    app_id = f"{settings.group_prefix}-alerts"
    datadir = Path(data_dir) if data_dir else state_dir() / "faust"
    try:  # Faust creates only the last folder, at start: a state dir not made yet stopped it (exit 1)
        datadir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "--data-dir" if data_dir else "METERING_STATE_DIR"
        raise ConfigError(f"worker alerts: cannot create its Faust data folder {datadir} ({where}): "
                          f"{exc.strerror or exc}") from None
    app = faust.App(
        app_id,
        broker=broker_urls(settings.kafka_bootstrap),
        datadir=str(datadir),
        store="memory://",  # rebuilt from the changelog topic on start
        processing_guarantee=guarantee,
        topic_partitions=settings.partitions,  # table changelog co-partitioned with the source
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
    )
    stats = AlertStats()
    source = app.topic(settings.topics.wallet_events, partitions=settings.partitions,
                       key_serializer="raw", value_serializer="raw")
    out = app.topic(notifications_topic(settings), partitions=settings.partitions,
                    key_serializer="raw", value_serializer="raw")
    # alert key -> notification id; written from the source partition being processed, and
    # wallet events are keyed by account_id, so an alert always lands in the same partition.
    sent = app.Table(TABLE, default=None, partitions=settings.partitions,
                     key_type=str, value_type=str)

    @app.agent(source)
    async def notify(stream: Any) -> None:
        await out.maybe_declare()  # Faust only creates the topics it consumes
        async for value in stream:
            stats.received += 1
            stats.last_event_at = time.monotonic()
            try:
                event = _decode_event(value)
            except (msgspec.DecodeError, TypeError) as exc:
                stats.invalid += 1
                metrics.ALERTS.labels(outcome="invalid").inc()
                log(LOG, logging.WARNING, "invalid wallet event skipped", error=str(exc))
                continue
            key = alert_key(event)
            if sent.get(key) is not None:
                stats.duplicates += 1
                metrics.ALERTS.labels(outcome="duplicate").inc()
                continue
            note = to_notification(event, key)
            await out.send(key=event.account_id.encode(), value=_encode(note))
            sent[key] = note.notification_id
            # A table write is only queued (Faust's producer buffer, drained by a background
            # task); hand it to the partition's transactional producer now, so it commits in
            # the same transaction as the notification and never after the offsets.
            await app.producer.buffer.flush()
            stats.notified += 1
            metrics.ALERTS.labels(outcome="notified").inc()

    @app.timer(interval=0.5)  # type: ignore[untyped-decorator]
    async def watch() -> None:
        now = time.monotonic()
        if stats.ready_at is None:
            if app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
                stats.ready_at = now
                log(LOG, logging.INFO, "alerts worker ready", app_id=app_id,
                    source=settings.topics.wallet_events, out=notifications_topic(settings))
            return
        if until_idle_s is not None and now - max(stats.last_event_at, stats.ready_at) >= until_idle_s:
            log(LOG, logging.INFO, "idle, stopping", idle_s=until_idle_s)
            await app.producer.buffer.flush()  # queued table writes join the last transaction
            await app.consumer.commit()  # Faust commits on stop too; this one is not racing it
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's graceful shutdown path

    return app, stats


def run_alerts_worker(settings: Settings, *, data_dir: str | Path | None = None,
                      guarantee: str = "exactly_once", until_idle_s: float | None = None,
                      loglevel: str = "WARNING") -> AlertStats:
    """Run the alerts worker in this process until SIGTERM/SIGINT (or idle, if asked), with
    /metrics, /healthz and /readyz on METERING_METRICS_PORT (ready once the dedupe table is
    recovered from its changelog: before that it could send a notification twice).

    Must be called from the main thread (Faust installs signal handlers). Returns the counts
    once stopped.
    """
    health = metrics.serve_metrics(settings.metrics_port)
    app, stats = make_app(settings, data_dir=data_dir, guarantee=guarantee, until_idle_s=until_idle_s)
    metrics.set_ready(health, lambda: stats.ready_at is not None)  # the table recovered
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False, quiet=True)
    worker.spinner = None  # its terminal escapes went to stdout even when not a terminal; "Ready" is logged instead
    log(LOG, logging.INFO, "alerts worker starting", app_id=app.conf.id,
        kafka=settings.kafka_bootstrap, guarantee=guarantee)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    log(LOG, logging.INFO, "alerts worker stopped", received=stats.received,
        notified=stats.notified, duplicates=stats.duplicates, invalid=stats.invalid)
    return stats


def main(argv: list[str] | None = None) -> int:
    import argparse

    from metering import logs

    p = argparse.ArgumentParser(prog="python -m metering.workers.alerts")
    p.add_argument("--until-idle", type=float, default=None, help="stop after N s without events")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--guarantee", choices=["at_least_once", "exactly_once"], default="exactly_once")
    args = p.parse_args(argv)
    logs.setup()
    run_alerts_worker(Settings.from_env(), data_dir=args.data_dir, guarantee=args.guarantee,
                      until_idle_s=args.until_idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
