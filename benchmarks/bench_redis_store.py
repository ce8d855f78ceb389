"""Rating against the real Redis store (no Kafka, no ClickHouse): client CPU, Redis CPU and wall
per event, and the wall time of each of the two scripts per batch.

    python benchmarks/bench_redis_store.py --count 100000

Uses the bench_rating stream (10 000 accounts, example catalog) and Redis database 12 of the
local Redis (flushed before and after). Whether redis-py uses hiredis is printed: compare by
running once with and once without `pip install hiredis`.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import redis.connection
from bench_rating import bench_stream

from metering.local_services import ensure_started
from rating.engine import Rater
from wallet_debiter.redis_store import RedisWalletStore, connect

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def redis_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--db", type=int, default=12)
    args = ap.parse_args()
    catalog, accounts, values = bench_stream(args.count, NOW)
    url = ensure_started(("redis",)).redis_url
    client = connect(f"{url.rsplit('/', 1)[0]}/{args.db}")
    redis_pid = int(client.info("server")["process_id"])
    client.flushdb()
    store = RedisWalletStore(client)
    store.import_accounts(accounts.values())
    rater = Rater(catalog, accounts, store)

    spent = {"lookup": 0.0, "apply": 0.0}  # wall per script call: transfer + Redis running it
    for name in spent:
        script = getattr(store, f"_{name}")

        def timed(*a, _script=script, _name=name, **kw):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return _script(*a, **kw)
            finally:
                spent[_name] += time.perf_counter() - t

        setattr(store, f"_{name}", timed)

    items = [(v, f"0:{i}") for i, v in enumerate(values)]
    r0, c0, w0 = redis_cpu_s(redis_pid), time.process_time(), time.perf_counter()
    for i in range(0, len(items), 5000):
        rater.rate_batch(items[i:i + 5000], NOW)
    n = len(items)
    wall, client_cpu, redis_cpu = time.perf_counter() - w0, time.process_time() - c0, redis_cpu_s(redis_pid) - r0
    client.flushdb()
    print(f"hiredis {redis.connection.HIREDIS_AVAILABLE}, {n:,} events in batches of 5000")
    print(f"  client CPU {client_cpu / n * 1e6:.1f} us/event, Redis CPU {redis_cpu / n * 1e6:.1f} us/event, "
          f"wall {wall / n * 1e6:.1f} us/event")
    print(f"  script wall: lookup {spent['lookup'] / n * 1e6:.1f} us/event, apply {spent['apply'] / n * 1e6:.1f} us/event")


if __name__ == "__main__":
    main()
