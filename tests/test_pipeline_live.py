"""The live pipeline on the real broker, Redis and chDB agrees with `metering rate`, also
across kill -9 at chosen lines and duplicate delivery."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import pytest

from metering.config import Settings
from metering.local_services import ensure_started
from metering.simulate import produce_traffic
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from wallet_debiter.redis_store import RedisWalletStore, connect

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
pytestmark = pytest.mark.integration


@pytest.fixture()
def live(tmp_path: Path):  # noqa: ANN201
    ep = ensure_started()
    db = 1 + uuid.uuid4().int % 14
    env = {**os.environ, **ep.as_env(), "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{db}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"g{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
           "METERING_ACCOUNTS": str(ACCOUNTS), "METERING_METRICS_PORT": "0", "METERING_BATCH_SIZE": "2000"}
    connect(env["METERING_REDIS_URL"]).flushdb()
    subprocess.run([sys.executable, "-m", "metering.cli", "setup"], env=env, check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "import", str(ACCOUNTS)], env=env, check=True, cwd=ROOT)
    return env


def _run(env: dict[str, str], **extra: str) -> int:
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "run", "--until-idle", "3"],
                          env={**env, **extra}, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc.returncode


def _offline(count: int, seed: int, dup: float, bad: float, now: datetime):  # noqa: ANN202
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    rater = Rater(cat, accs, MemoryWalletStore(accs))
    events = list(generate_events(load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS), count=count,
                                  seed=seed, start=now.replace(hour=0), duplicate_rate=dup,
                                  malformed_rate=bad, now=now))
    rows = []
    for i in range(0, len(events), 5000):
        rows += rater.rate_batch([(v, f"x:{i + n}") for n, (_, v) in enumerate(events[i:i + 5000])], now).rows
    return rater, rows


def _check_equal(env: dict[str, str], rater: Rater, rows: list) -> None:  # noqa: ANN001
    want = {(r[1], r[0]): (r[14], r[10], r[15], r[12]) for r in rows if r[2] == "rated"}
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        got_rows = client.query(
            "SELECT account_id, event_id, toInt64(charge * 1000000), covered_s, toInt64(balance_after * 1000000), package_id "
            "FROM metering.rated_usage FINAL").result_rows
        rejected = client.query("SELECT count() FROM metering.rejected_events FINAL").result_rows[0][0]
    finally:
        client.close()
    got = {(a, e): (c, cov, b, p) for a, e, c, cov, b, p in got_rows}
    assert len(got) == len(want)
    assert got == want
    assert rejected == sum(1 for r in rows if r[2] == "rejected")
    store = RedisWalletStore(connect(env["METERING_REDIS_URL"]))
    live_bal = store.balances(rater.accounts)
    offline_bal = {a: rater.store.wallet(a).balance for a in rater.accounts}  # type: ignore[attr-defined]
    assert live_bal == offline_bal


def test_live_pipeline_matches_offline_rating(live: dict[str, str]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    produce_traffic(settings, count=20_000, seed=11, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(20_000, 11, 0.05, 0.01, now)
    assert _run(live) == 0
    _check_equal(live, rater, rows)


@pytest.mark.parametrize("point", ["after_redis", "mid_insert", "after_clickhouse", "before_commit"])
def test_kill_9_at_a_line_then_restart_changes_nothing(live: dict[str, str], point: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    produce_traffic(settings, count=8_000, seed=5, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(8_000, 5, 0.05, 0.01, now)
    assert _run(live, METERING_CRASH_POINT=point, METERING_CRASH_AFTER="1") == -9  # killed on batch 1
    assert _run(live, METERING_CRASH_POINT=point, METERING_CRASH_AFTER="2") in (-9, 0)  # again, later
    assert _run(live) == 0
    _check_equal(live, rater, rows)
