"""Decode + rate throughput of the engine on one core, against a bare msgspec decode of the
same bytes measured in the same run (the raw baseline).

    python benchmarks/bench_rating.py --count 1000000

Uses the example catalog and 10 000 generated accounts; the stream is a realistic mix
(calls, SMS, meters, 1 % duplicates, 0.5 % malformed) from metering.traffic.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from metering.gc_tuning import tune_for_batches
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict
from rating.accounts import Account, parse_accounts
from rating.catalog import Catalog, load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from schemas.events import event_decoder

ROOT = Path(__file__).resolve().parents[1]


def accounts_10k(base: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for i in range(10_000):
        a = dict(base[i % len(base)])
        a["id"] = f"bench-{i:05d}"
        a["balance"] = "1000000.00" if a.get("billing", "prepaid") == "prepaid" else "0"
        out.append(a)
    return out


def bench_stream(count: int, now: datetime) -> tuple[Catalog, dict[str, Account], list[bytes]]:
    """The example catalog, 10 000 accounts and `count` events of the realistic mix (1 %
    duplicates, 0.5 % malformed) from two days before `now`: what the engine benchmarks rate."""
    cat_path = ROOT / "deploy/examples/catalog.yaml"
    catalog = load_catalog(cat_path)
    accounts_list = accounts_10k(load_accounts_list(ROOT / "deploy/examples/accounts.yaml"))
    accounts = parse_accounts({"accounts": accounts_list}, catalog)
    values = [v for _, v in generate_events(load_catalog_dict(cat_path), accounts_list, count=count, seed=42,
                                            start=now - timedelta(days=2), duplicate_rate=0.01,
                                            malformed_rate=0.005, now=now)]
    return catalog, accounts, values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    now = datetime.now(UTC)
    t = time.perf_counter()
    catalog, accounts, values = bench_stream(args.count, now)
    print(f"generated {len(values):,} events in {time.perf_counter() - t:.1f} s")

    tune_for_batches()  # as `metering rate` does once catalog and accounts are loaded (both timings below)
    decoder = event_decoder()
    t = time.perf_counter()
    for v in values:
        try:  # noqa: SIM105 (contextlib.suppress would add a context manager per event to the baseline)
            decoder.decode(v)
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
    bare = time.perf_counter() - t

    rater = Rater(catalog, accounts, MemoryWalletStore(accounts))
    items = [(v, f"0:{i}") for i, v in enumerate(values)]
    lat: list[float] = []
    t = time.perf_counter()
    for i in range(0, len(items), args.batch):
        b = time.perf_counter()
        rater.rate_batch(items[i:i + args.batch], now)
        lat.append(time.perf_counter() - b)
    full = time.perf_counter() - t
    lat.sort()
    n = len(values)
    print(f"bare msgspec decode : {n / bare:>10,.0f} events/s")
    print(f"decode + rate       : {n / full:>10,.0f} events/s  (ratio to bare decode {bare / full:.2f})")
    print(f"batch of {args.batch}: p50 {lat[len(lat) // 2] * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
