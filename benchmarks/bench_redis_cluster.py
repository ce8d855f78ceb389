"""Settle throughput: standalone Redis vs the local 3-master Redis Cluster.

    python benchmarks/bench_redis_cluster.py [--count 50000] [--batch 5000] [--rounds 3]
        [--redis-url redis://127.0.0.1:16379/13] [--cluster-url redis+cluster://127.0.0.1:17001/]

Generates `--count` seeded events (example catalog and 200 accounts, 2 % duplicates),
prices them once (not timed), then times `Settler.settle` batch by batch on each store: the
Redis lookup + apply round trips and the Python around them. Standalone runs one lookup and
one apply script per batch; the cluster one script per hash slot of the batch's accounts,
pipelined (one round trip per master). Each round starts from empty wallets: it FLUSHES the
--redis-url database and the whole cluster, so point them at scratch instances (the
defaults are the local services: `deploy/local/services.sh start redis` / `start redis-cluster`).
Prints events/s, batch p50/max, time in the store calls, slot groups per batch; for the standalone
Redis also the time one script call blocks it (INFO commandstats) and the bytes per dedupe entry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metering.traffic import generate_events, load_accounts_list, load_catalog_dict  # noqa: E402
from rating.accounts import load_accounts  # noqa: E402
from rating.catalog import load_catalog  # noqa: E402
from rating.engine import Pricer, Settler  # noqa: E402
from wallet_debiter.redis_store import RedisWalletStore, connect  # noqa: E402

CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
NOW = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)


class Timed:
    """The store with its two calls timed."""

    def __init__(self, store: RedisWalletStore) -> None:
        self.store = store
        self.seconds = 0.0
        self.groups: list[int] = []

    def lookup(self, *a: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.store.lookup(*a)
        finally:
            self.seconds += time.perf_counter() - t

    def apply(self, debits: Any, limits: Any = None) -> Any:
        if self.store.cluster:
            self.groups.append(len({self.store._slot(d[0]) for d in debits}))
        t = time.perf_counter()
        try:
            return self.store.apply(debits, limits)
        finally:
            self.seconds += time.perf_counter() - t


def run(name: str, url: str, priced: list[Any], rounds: int, count: int) -> dict[str, float]:
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    best: dict[str, float] = {}
    for _ in range(rounds):
        client = connect(url)
        if name == "cluster":
            client.flushall()
        else:
            client.flushdb()
        store = RedisWalletStore(client)
        store.import_accounts(accs.values())
        timed = Timed(store)
        settler = Settler(cat, timed)  # type: ignore[arg-type]
        if name != "cluster":
            client.config_resetstat()
        lat: list[float] = []
        t0 = time.perf_counter()
        for batch in priced:
            t = time.perf_counter()
            settler.settle(batch)
            lat.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        res = {"events_s": count / total, "p50_ms": statistics.median(lat) * 1000, "max_ms": max(lat) * 1000,
               "store_s": timed.seconds, "total_s": total,
               "groups": statistics.mean(timed.groups) if timed.groups else 1.0}
        if name != "cluster":  # how long one script blocks Redis; what the dedupe entries weigh
            res["script_ms"] = client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"] / 1000
            keys = list(client.scan_iter("d:*", count=1000))
            res["dedupe_b"] = (sum(client.memory_usage(k, samples=0) or 0 for k in keys)
                               / max(1, sum(client.hlen(k) for k in keys)))
        if not best or res["events_s"] > best["events_s"]:
            best = res
        client.close()
    print(f"{name:10} {best['events_s']:>9,.0f} events/s  batch p50 {best['p50_ms']:6.1f} ms  max "
          f"{best['max_ms']:6.1f} ms  store calls {best['store_s']:.2f} of {best['total_s']:.2f} s  "
          f"script calls/batch {best['groups']:.0f}")
    if "script_ms" in best:
        print(f"{'':10} Redis time per script call {best['script_ms']:.1f} ms (INFO commandstats), "
              f"dedupe entries {best['dedupe_b']:.0f} bytes per event (MEMORY USAGE)")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3, help="best of N (fresh wallets each)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:16379/13")
    p.add_argument("--cluster-url", default="redis+cluster://127.0.0.1:17001/")
    args = p.parse_args()
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    events = [v for _, v in generate_events(load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS),
                                            count=args.count, seed=3, start=NOW.replace(hour=0),
                                            duplicate_rate=0.02, now=NOW)]
    pricer = Pricer(cat, accs)
    priced = [pricer.price([(v, f"0:{i + n}") for n, v in enumerate(events[i:i + args.batch])], NOW)
              for i in range(0, len(events), args.batch)]
    print(f"{len(events)} events, {len(priced)} batches of {args.batch}, {len(accs)} accounts; best of {args.rounds}")
    a = run("standalone", args.redis_url, priced, args.rounds, len(events))
    b = run("cluster", args.cluster_url, priced, args.rounds, len(events))
    print(f"cluster / standalone: {b['events_s'] / a['events_s']:.2f}")


if __name__ == "__main__":
    main()
