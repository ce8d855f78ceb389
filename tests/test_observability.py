"""What an operator watches, checked on the real broker, Redis and chDB: /metrics values equal
what happened (and every known series exists from the start), /readyz follows the services a
worker needs (Redis and ClickHouse), progress and stop lines in the JSON logs, and label
cardinality stays bounded (no per-account or per-event labels)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from metering import metrics
from metering.config import Settings
from metering.local_services import ensure_started
from metering.simulate import produce_traffic
from metering.storage.clickhouse_sink import ClickHouseSink
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict
from metering.workers.pipeline import Pipeline
from metering.workers.split import SinkWorker
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from schemas.records import REJECT_REASONS, WALLET_EVENT_TYPES
from tests.helpers import free_port, http_get
from wallet_debiter.redis_store import connect

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
pytestmark = pytest.mark.integration

# Every label name a worker's metrics may carry: none of them is per account or per event.
BOUNDED_LABELS = {"stage", "kind", "reason", "conflict", "topic", "partition", "where", "type", "version", "outcome", "le"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture()
def stack(tmp_path: Path) -> dict[str, str]:
    """Isolated topics, consumer groups, Redis database and chDB folder; accounts imported."""
    ep = ensure_started(("kafka", "redis"))
    db = 1 + uuid.uuid4().int % 14
    env = {**os.environ, **ep.as_env(), "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{db}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"o{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"o{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
           "METERING_ACCOUNTS": str(ACCOUNTS), "METERING_METRICS_PORT": "0", "METERING_BATCH_SIZE": "500"}
    connect(env["METERING_REDIS_URL"]).flushdb()
    for args in (["setup"], ["accounts", "import", str(ACCOUNTS)]):
        subprocess.run([sys.executable, "-m", "metering.cli", *args], env=env, check=True, cwd=ROOT,
                       capture_output=True)
    return env


def _samples(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200, status
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _offline(count: int, seed: int, dup: float, bad: float, now: datetime) -> tuple[list, list]:  # type: ignore[type-arg]
    """`metering rate`'s engine on the same stream: its rows and wallet events."""
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    rater = Rater(cat, accs, MemoryWalletStore(accs))
    events = list(generate_events(load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS), count=count, seed=seed,
                                  start=now.replace(hour=0), duplicate_rate=dup, malformed_rate=bad, now=now))
    rows, wallet_events = [], []
    for i in range(0, len(events), 5000):
        result = rater.rate_batch([(v, f"x:{i + n}") for n, (_, v) in enumerate(events[i:i + 5000])], now)
        rows += result.rows
        wallet_events += result.wallet_events
    return rows, wallet_events


def test_run_metrics_equal_what_happened_and_progress_is_logged(stack: dict[str, str]) -> None:
    """`metering run` under paced traffic: before the first event every known series is there
    at 0 (rejects per reason, duplicates, wallet events per type, the stage's batch series:
    a series born at 5 is invisible to rate()/increase(), so the first rejects of a reason
    never reached an alert); afterwards each counter equals what `metering rate` finds in the
    same stream and what ClickHouse holds, the lag is 0, no label is per account; stderr is
    JSON lines with `progress` lines while it works (before: nothing between start and stop)."""
    count, seed, dup, bad = 8_000, 71, 0.03, 0.03
    port = free_port()
    env = {**stack, "METERING_METRICS_PORT": str(port), "METERING_PROGRESS_S": "1"}
    settings = Settings.from_env(env)
    now = datetime.now(UTC).replace(microsecond=0)
    proc = subprocess.Popen([sys.executable, "-m", "metering.cli", "run"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while http_get(port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "metering run never became ready"
            time.sleep(0.2)
        before = _samples(port)
        produce_traffic(settings, count=count, per_second=2_000, seed=seed, duplicate_rate=dup,
                        malformed_rate=bad, start=now.replace(hour=0))
        deadline = time.monotonic() + 120
        while True:
            after = _samples(port)
            lags = [v for (name, _), v in after.items() if name == "metering_consumer_lag"]
            if _value(after, "metering_consumed_total", stage="debit") == count and lags and not any(lags):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the stream was not consumed"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]

    missing = [f"{name}{dict(labels)}" for name, labels in (
        *((("metering_rejected_total", (("reason", r),))) for r in REJECT_REASONS),
        *((("metering_rated_total", (("kind", k),))) for k in ("call", "sms", "meter")),
        *((("metering_duplicates_total", (("conflict", c),))) for c in ("false", "true")),
        *((("metering_wallet_events_total", (("type", t),))) for t in WALLET_EVENT_TYPES),
        ("metering_consumed_total", (("stage", "debit"),)),
        ("metering_batch_seconds_count", (("stage", "debit"),)),
        ("metering_wallets_blocked_total", ()), ("metering_topups_requested_total", ()),
    ) if before.get((name, labels)) != 0]
    assert not missing, f"not exported at 0 before the first event: {missing}"

    rows, wallet_events = _offline(count, seed, dup, bad, now)
    rated = collections.Counter(r[3] for r in rows if r[2] == "rated")
    rejected = collections.Counter(r[4] for r in rows if r[2] == "rejected")
    duplicates = collections.Counter("true" if r[6] else "false" for r in rows if r[2] == "duplicate")
    types = collections.Counter(e.type for e in wallet_events)
    assert rejected and duplicates["false"] and types["blocked"], "the seeded stream lacks what is checked"
    for kind in ("call", "sms", "meter"):
        assert _value(after, "metering_rated_total", kind=kind) == rated[kind], kind
    for reason in REJECT_REASONS:
        assert _value(after, "metering_rejected_total", reason=reason) == rejected[reason], reason
    for conflict in ("false", "true"):
        assert _value(after, "metering_duplicates_total", conflict=conflict) == duplicates[conflict], conflict
    for kind in WALLET_EVENT_TYPES:
        assert _value(after, "metering_wallet_events_total", type=kind) == types[kind], kind
    assert _value(after, "metering_wallets_blocked_total") == types["blocked"]
    assert _value(after, "metering_topups_requested_total") == types["topup_requested"]
    batches = _value(after, "metering_batch_events_count", stage="debit")
    assert batches and _value(after, "metering_batch_seconds_count", stage="debit") == batches
    assert _value(after, "metering_batch_seconds_count", stage="debit-write") == batches
    assert _value(after, "metering_batch_events_sum", stage="debit") == count
    assert _value(after, "metering_redis_errors_total") == 0
    assert _value(after, "metering_clickhouse_errors_total") == 0
    partitions = {dict(labels)["partition"] for (name, labels) in after if name == "metering_consumer_lag"}
    assert partitions == {str(p) for p in range(settings.partitions)}

    series = [labels for (name, labels) in after if name.startswith("metering_")]
    assert len(series) < 400, len(series)
    assert {k for labels in series for k, _ in labels} <= BOUNDED_LABELS
    assert not [v for labels in series for _, v in labels if v.startswith("acc-")], "a per-account label"

    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        in_ch = dict(client.query("SELECT reason, count() FROM metering.rejected_events FINAL "
                                  "GROUP BY reason").result_rows)
        topups = client.query("SELECT count() FROM metering.wallet_events FINAL "
                              "WHERE type = 'topup_requested'").result_rows[0][0]
    finally:
        client.close()
    assert in_ch == {r: n for r, n in rejected.items() if n}
    assert topups == _value(after, "metering_topups_requested_total")

    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    progress = [line for line in lines if line["msg"] == "progress"]
    assert progress, "no progress line while the stream was consumed"
    assert {"consumed", "events_per_s", "lag", "rated", "rejected", "duplicates", "wallets_blocked",
            "topups_requested"} <= progress[-1].keys()
    assert 0 < progress[-1]["consumed"] <= count
    assert [c["consumed"] for c in progress] == sorted(c["consumed"] for c in progress)
    assert lines[-1]["msg"] == "pipeline stopped" and lines[-1]["consumed"] == count


def _readiness_watch(port: int, errors_before: float, lift: str, client_dsn: str,
                     seen: dict[str, object]) -> threading.Thread:
    """Once ClickHouse has refused 3 inserts: record /readyz, lift the refusal (`lift` SQL),
    then record /readyz once it answers 200 again (or the last answer after 30 s)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while (REGISTRY.get_sample_value("metering_clickhouse_errors_total") or 0.0) < errors_before + 3:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        seen["refusing"] = http_get(port, "/readyz")
        seen["healthz"] = http_get(port, "/healthz")
        admin = clickhouse_connect.get_client(dsn=client_dsn)  # same folder, same process
        try:
            admin.command(lift)
        finally:
            admin.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen["lifted"] = http_get(port, "/readyz")
            if seen["lifted"][0] == 200:  # type: ignore[index]
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_not_ready_while_clickhouse_refuses_inserts_then_ready_again(stack: dict[str, str]) -> None:
    """ClickHouse refusing inserts (TOO_MANY_PARTS: parts_to_throw_insert lowered to 1, as in
    test_clickhouse_refusing_inserts_is_waited_out_then_nothing_is_lost): `metering run` and
    then `worker sink` answer /readyz 503 naming what they wait for while /healthz stays 200,
    and 200 again once inserts are accepted. Before, /readyz stayed 200 all along (only a Redis
    outage made a worker unready), so a probe or dashboard saw a healthy worker stuck on
    ClickHouse. In this process, because chDB lets one process open its folder."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**stack, "METERING_BATCH_SIZE": "1000", "METERING_CATALOG_CHECK_S": "60"}
    settings = Settings.from_env(env)
    produce_traffic(settings, count=5_000, seed=73, duplicate_rate=0.02, malformed_rate=0.02,
                    start=now.replace(hour=0))
    setting = "ALTER TABLE metering.{} MODIFY SETTING parts_to_throw_insert = {}, parts_to_delay_insert = {}"

    port = free_port()
    health = metrics.serve_metrics(port)
    assert health is not None
    try:
        sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
        sink.client.command(setting.format("rated_usage", 1, 1))  # the second insert is refused
        pipeline = Pipeline(settings, sink=sink)
        metrics.set_ready(health, pipeline.readiness)
        seen: dict[str, object] = {}
        watcher = _readiness_watch(port, REGISTRY.get_sample_value("metering_clickhouse_errors_total") or 0.0,
                                   setting.format("rated_usage", 3000, 1000), settings.clickhouse_dsn, seen)
        try:
            progress = pipeline.run(max_idle_s=5)
        finally:
            watcher.join()
            sink.close()
        assert progress.consumed == 5_000
        status, body = seen["refusing"]  # type: ignore[misc]
        assert status == 503, body
        assert json.loads(body) == {"ready": False, "assigned": True, "redis": True, "waiting": ["clickhouse insert"]}
        assert seen["healthz"] == (200, '{"status":"ok"}')
        assert seen["lifted"] == (200, '{"ready":true}')

        # the split sink worker: it reads usage.rejected and wallet.events, which run wrote
        admin = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
        try:
            admin.command(setting.format("rejected_events", 1, 1))  # it holds a part already
        finally:
            admin.close()
        worker = SinkWorker(settings)
        metrics.set_ready(health, worker.readiness)
        seen = {}
        watcher = _readiness_watch(port, REGISTRY.get_sample_value("metering_clickhouse_errors_total") or 0.0,
                                   setting.format("rejected_events", 3000, 1000), settings.clickhouse_dsn, seen)
        try:
            worker.run(max_idle_s=5)
        finally:
            watcher.join()
        status, body = seen["refusing"]  # type: ignore[misc]
        assert status == 503, body
        assert json.loads(body) == {"ready": False, "assigned": True, "waiting": ["clickhouse insert"]}
        assert seen["lifted"] == (200, '{"ready":true}')
        assert worker.counts["rejected_rows"] > 0
    finally:
        health.server.shutdown()
        health.server.server_close()
