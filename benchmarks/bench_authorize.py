"""Dialer authorize API: requests/s and latency percentiles on loopback, bounded.

    python benchmarks/bench_authorize.py [--requests 20000] [--concurrency 32]
        [--redis-url redis://127.0.0.1:16379/15] [--url http://127.0.0.1:PORT]

Without --url an API process is started on a free loopback port (`python -m wallet_debiter.api`,
one process, the example catalog) and stopped afterwards. The example accounts are imported into
the Redis database of --redis-url (existing wallets keep their balances; nothing is flushed).
Requests go to random example accounts and random numbers under the catalog's destination
prefixes, from one asyncio client process. Only loopback targets are accepted. Prints
requests/s, latency p50/p90/p99/max (client-side, end to end), CPU time per request of the
API process, Redis and this client (on a small machine they share the cores, so the CPU split
says more than requests/s), and the answers' reasons.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rating.accounts import load_accounts  # noqa: E402
from rating.catalog import load_catalog  # noqa: E402
from wallet_debiter.redis_store import RedisWalletStore, connect  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _numbers(catalog_path: Path, n: int, rng: random.Random) -> list[str]:
    prefixes = [d["prefix"] for d in yaml.safe_load(catalog_path.read_text())["destinations"]]
    out = []
    for _ in range(n):
        p = rng.choice(prefixes)
        out.append("+" + p + "".join(rng.choice("0123456789") for _ in range(max(0, 11 - len(p)))))
    return out


async def _wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"API at {url} not ready after {timeout:.0f} s")


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _run(url: str, account_ids: list[str], numbers: list[str], requests: int,
               concurrency: int, warmup: int, seed: int, server_pid: int | None,
               redis_client: redis.Redis) -> None:
    rng = random.Random(seed)
    paths = [f"/v1/accounts/{rng.choice(account_ids)}/authorize?to={rng.choice(numbers)}"
             for _ in range(requests + warmup)]
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_ready(session, url)
        latencies: list[float] = []
        statuses: collections.Counter[int] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        async def worker(jobs: Iterator[tuple[int, str]]) -> None:
            for i, path in jobs:
                t0 = time.perf_counter()
                async with session.get(url + path) as resp:
                    doc = await resp.json()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    latencies.append(dt)
                    statuses[resp.status] += 1
                    reasons[doc.get("reason") or doc.get("error", "?")] += 1

        # warm-up first (connections, route caches), then the measured run
        warm = iter(list(enumerate(paths))[:warmup])
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        measured = iter(list(enumerate(paths))[warmup:])
        cpu0 = (_cpu_s(server_pid), _redis_cpu_s(redis_client), time.process_time())
        start = time.perf_counter()
        await asyncio.gather(*(worker(measured) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu1 = (_cpu_s(server_pid), _redis_cpu_s(redis_client), time.process_time())

    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    print(f"authorize: {len(latencies)} requests, concurrency {concurrency}, {elapsed:.2f} s")
    print(f"  throughput  {len(latencies) / elapsed:,.0f} requests/s")
    print(f"  latency ms  p50 {q[49] * 1e3:.2f}  p90 {q[89] * 1e3:.2f}  p99 {q[98] * 1e3:.2f}  "
          f"max {latencies[-1] * 1e3:.2f}")
    n = len(latencies)
    api_cpu = None if cpu0[0] is None or cpu1[0] is None else (cpu1[0] - cpu0[0]) / n * 1e6
    print("  cpu us/req  api " + ("?" if api_cpu is None else f"{api_cpu:.0f}")
          + f"  redis {(cpu1[1] - cpu0[1]) / n * 1e6:.0f}  client {(cpu1[2] - cpu0[2]) / n * 1e6:.0f}"
          + ("" if not api_cpu else f"  (one API core: ~{1e6 / api_cpu:,.0f} requests/s)"))
    print(f"  statuses    {dict(statuses)}")
    print(f"  reasons     {dict(reasons.most_common())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--redis-url", default="redis://127.0.0.1:16379/15")
    p.add_argument("--catalog", type=Path, default=ROOT / "deploy/examples/catalog.yaml")
    p.add_argument("--accounts", type=Path, default=ROOT / "deploy/examples/accounts.yaml")
    p.add_argument("--url", help="an API already running on loopback (default: start one)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 1024:
        raise SystemExit("--requests must be 1..1000000 and --concurrency 1..1024")
    redis_host = urlsplit(args.redis_url).hostname
    if redis_host not in LOOPBACK or (args.url and urlsplit(args.url).hostname not in LOOPBACK):
        raise SystemExit("loopback targets only")

    catalog = load_catalog(args.catalog)
    accounts = load_accounts(args.accounts, catalog)
    redis_client = connect(args.redis_url)
    RedisWalletStore(redis_client).import_accounts(accounts.values())
    numbers = _numbers(args.catalog, 2000, random.Random(args.seed))

    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "wallet_debiter.api", "--host", "127.0.0.1", "--port", str(port),
             "--catalog", str(args.catalog), "--redis-url", args.redis_url, "--log-level", "WARNING"],
            cwd=ROOT,
        )
    try:
        asyncio.run(_run(url.rstrip("/"), sorted(accounts), numbers, args.requests,
                         args.concurrency, args.warmup, args.seed,
                         None if proc is None else proc.pid, redis_client))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
