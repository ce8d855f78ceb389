"""README command 1 (`metering demo`), shortened: it streams through the real stack and prints
an operator summary whose counts add up, and the analyst report from ClickHouse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metering.demo import DEMO_REDIS_DB, demo_redis_url
from metering.local_services import ensure_started
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from wallet_debiter.redis_store import RedisWalletStore, connect

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_demo_streams_traffic_and_prints_summary_and_report(tmp_path: Path) -> None:
    ep = ensure_started()
    env = {**os.environ, **ep.as_env(), "METERING_STATE_DIR": str(tmp_path)}
    env.pop("METERING_CLICKHOUSE_DSN")
    # the demo empties a database of its own, never the one `metering run` keeps wallets in
    sentinel = f"sentinel:{tmp_path.name}"
    main_db = connect(ep.redis_url)
    main_db.set(sentinel, b"kept")
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "demo", "--seconds", "3", "--rate", "2000",
                           "--metrics-port", "0"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert main_db.get(sentinel) == b"kept"
    main_db.delete(sentinel)
    demo_url = demo_redis_url(ep.redis_url)
    assert demo_url.endswith(f"/{DEMO_REDIS_DB}") and demo_url in out
    assert RedisWalletStore(connect(demo_url)).wallet("acc-000001") is not None

    def number(label: str) -> int:
        m = re.search(rf"^\s+{label}\s+([\d,]+)", out, re.M)
        assert m, f"{label!r} missing from:\n{out}"
        return int(m.group(1).replace(",", ""))

    consumed = number("events consumed")
    # 6000 attempts: what the dialer refused (blocked wallets' outbound calls) never became a CDR
    assert consumed + number("refused by dialer") == 6000
    assert number("rated") + number("rejected") + number("duplicates ignored") == consumed
    catalog = load_catalog(ROOT / "deploy/examples/catalog.yaml")
    with_fee = [a for a in load_accounts(ROOT / "deploy/examples/accounts.yaml", catalog).values()
                if catalog.plans[a.plan_id].monthly_fee_pico > 0]
    assert number("monthly fees") == len(with_fee) > 0
    assert re.search(rf"^\s*recurring\s+{len(with_fee)}\s", out, re.M), out  # the fees, in ClickHouse
    # every requested top-up (by usage or by a fee) was paid once; Redis holds one credit per payment
    requested = re.search(r"top-ups requested.*\(([\d,]+) in all", out)
    assert requested, out
    paid = number("top-ups paid")
    assert paid == int(requested.group(1).replace(",", "")) > 0
    demo_redis = connect(demo_url)
    payments = [ref for key in demo_redis.scan_iter(match="c:*") for ref in demo_redis.hkeys(key)
                if ref.startswith(b"auto-topup:")]
    assert len(payments) == paid
    assert number("rejected") > 0 and number("duplicates ignored") > 0
    for section in ("Usage and revenue by country and package", "Top accounts by spend",
                    "Rejected input by reason", "Wallet events"):
        assert f"== {section}" in out
    assert re.search(r"^\s+us-domestic\s+\d+\s+\d", out, re.M), out  # package usage row
    assert "consumed" in proc.stderr  # the progress line


def test_progress_line_top_ups_paid_never_exceed_requested_and_blocks_say_by_usage() -> None:
    # seen live: `blocked   2  top-ups   1 (paid   4)`: the pipeline's count of usage-caused
    # requests next to the payer's count of every paid request (3 were caused by the monthly
    # fees), and `blocked 2` while 13 wallets were blocked (14 by the fees at the start)
    from metering.demo import progress_line
    from metering.workers.pipeline import Progress

    p = Progress(consumed=3000, rated=2900, rejected=30, duplicates=70, blocked=2, topups=1, lag=5)
    line = progress_line(6.0, 3000, p, topups_requested=4, topups_paid=4, p99=0.5)
    m = re.search(r"top-ups requested\s+([\d,]+) \(paid\s+([\d,]+)\)", line)
    assert m, line
    assert (int(m.group(1)), int(m.group(2))) == (4, 4)
    assert re.search(r"blocked by usage\s+2\b", line), line
    assert re.search(r"consumed\s+3,000 \(\s*500/s\)", line), line
