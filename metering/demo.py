"""`metering demo`: the whole product on the local stack, in about a minute.

Starts Kafka and Redis (deploy/local/services.sh), creates fresh topics and a chDB database,
imports the example accounts and charges their monthly fees, then streams realistic CDR
traffic (with duplicates and poison) through the live pipeline while a progress line shows
events/s, lag, rejects, blocked wallets and top-ups. Around the engine, as in production, a
dialer refuses blocked wallets' outbound calls and a payment provider pays requested auto
top-ups (`metering.demo_actors`). Ends with an operator summary and the analyst report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from metering import kafka_io, metrics
from metering.config import ConfigError, Settings
from metering.demo_actors import DialerGate, TopupPayer
from metering.gc_tuning import tune_for_batches
from metering.local_services import ensure_started, state_dir
from metering.report import print_report
from metering.simulate import produce_traffic
from metering.storage.clickhouse_sink import ClickHouseSink
from metering.wallet_ops import charge_fees, produce_openings
from metering.workers.pipeline import Pipeline, Progress
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.money import format_micros
from wallet_debiter.redis_store import RedisWalletStore, connect


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def progress_line(elapsed: float, produced: int, p: Progress, *, topups_requested: int, topups_paid: int,
                  p99: float) -> str:
    """The live line. Top-ups requested and paid count the same requests (fees' and usage's,
    as the payer reads them from wallet.events), so paid never exceeds requested."""
    return (f"[{elapsed:5.0f} s] produced {produced:>8,}  consumed {p.consumed:>8,} "
            f"({p.consumed / max(elapsed, 1e-9):>6,.0f}/s)  lag {p.lag:>6,}  rejected {p.rejected:>5,}  "
            f"duplicates {p.duplicates:>5,}  blocked by usage {p.blocked:>3}  "
            f"top-ups requested {topups_requested:>3} (paid {topups_paid:>3})  "
            f"p99 {p99:.2f} s")


DEMO_REDIS_DB = 15  # the demo empties this database; `metering run` and the tests use 0


def demo_redis_url(url: str) -> str:
    """The demo's own database on the Redis of `url`: it is flushed at every start, so it must
    not be the one a local `metering run` keeps its wallets in."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"the demo needs a standalone redis:// URL (it uses database {DEMO_REDIS_DB} of it "
                          f"and empties it), got METERING_REDIS_URL={url!r}")
    # redis-py lets ?db= win over the path: drop it, or `?db=0` would empty database 0
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "db"])
    return urlunsplit(parts._replace(path=f"/{DEMO_REDIS_DB}", query=query))


def run_demo(*, seconds: float, rate: float, seed: int, metrics_port: int | None,
             echo: Callable[[str], None] = print) -> int:
    first = Settings.from_env(dict(os.environ), metrics_port=metrics_port)
    port = first.metrics_port
    # bad files and a port in use stop the demo before any service starts
    catalog = load_catalog(first.catalog_path)
    accounts = load_accounts(first.accounts_path, catalog)
    health = metrics.serve_metrics(port)
    echo("== starting local services (Kafka KRaft + Redis) ...")
    eps = ensure_started()
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    env = {**eps.as_env(),
           "METERING_TOPIC_PREFIX": f"demo{stamp}.", "METERING_GROUP_PREFIX": f"demo{stamp}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{state_dir()}/clickhouse-demo-{stamp}",
           "METERING_REDIS_URL": demo_redis_url(eps.redis_url)}
    settings = Settings.from_env({**os.environ, **env}, metrics_port=port)

    created, _ = kafka_io.ensure_topics(settings)
    with ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database) as sink:
        sink.ensure_schema()
    redis = connect(settings.redis_url)
    redis.flushdb()  # the demo's own database (DEMO_REDIS_DB): start from the example balances
    store = RedisWalletStore(redis)
    imported = store.import_wallets(accounts.values())
    delivery = kafka_io.DeliveryCheck()  # a refused movement leaves the queue too: not a success
    producer = kafka_io.make_producer(settings, on_delivery=delivery)
    produce_openings(settings, producer, imported.openings)
    fees = charge_fees(settings, store, producer, catalog, datetime.now(UTC), echo)
    kafka_io.flush(producer, delivery=delivery)
    blocked_at_start = sum(1 for a in accounts if (store.wallet(a) or {}).get("blocked") == "1")
    count = int(seconds * rate)
    echo(f"   kafka {settings.kafka_bootstrap}: {len(created)} topics ({settings.topics.events}, ...)")
    echo(f"   redis {settings.redis_url}: {len(accounts)} wallets imported; monthly fees charged to "
         f"{fees.charged} ({format_micros(fees.total)} {catalog.currency}); {blocked_at_start} blocked")
    echo(f"   clickhouse {settings.clickhouse_dsn}")
    echo(f"   catalog {catalog.version}: {sum(len(t) for t in catalog.raw_rates.values()):,} rates, "
         f"{len(catalog.packages)} packages")
    if settings.metrics_port:
        echo(f"   metrics: http://127.0.0.1:{settings.metrics_port}/metrics  health: /healthz /readyz")
    echo(f"== streaming {count:,} call/SMS/meter attempts at {rate:,.0f}/s for ~{seconds:.0f} s "
         f"(2 % re-sent duplicates, 1 % malformed; the dialer refuses blocked wallets' outbound calls, "
         f"requested top-ups are paid after 1 s)")

    pipeline = Pipeline(settings)
    metrics.set_ready(health, pipeline.readiness)
    tune_for_batches()  # as `metering run`
    gate = DialerGate(store, accounts)
    payer = TopupPayer(settings, store, accounts, delay_s=1.0)
    payer.start()
    produced = [0]
    producer_done = threading.Event()

    def produce() -> None:
        try:
            produce_traffic(settings, count=count, per_second=rate, seed=seed, duplicate_rate=0.02,
                            malformed_rate=0.01, start=datetime.now(UTC) - timedelta(hours=6),
                            on_sent=lambda n: produced.__setitem__(0, n), stop=pipeline.stop,
                            gate=gate.allows)
        finally:
            producer_done.set()

    threading.Thread(target=produce, name="simulate", daemon=True).start()
    latencies: list[float] = []
    last_print = [0.0]
    tty = sys.stderr.isatty()

    def on_batch(p: Progress) -> None:
        latencies.extend(p.last_latencies[:: max(1, len(p.last_latencies) // 50)])
        now = time.monotonic()
        if now - last_print[0] < 1.0:
            return
        last_print[0] = now
        line = progress_line(now - p.started, produced[0], p, topups_requested=payer.requested,
                             topups_paid=payer.paid, p99=_pct(latencies[-2000:], 0.99))
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        progress = pipeline.run(max_idle_s=4, on_batch=on_batch)
    except KeyboardInterrupt:
        pipeline.stop.set()
        raise
    finally:
        payer.stop()
    if tty:
        print(file=sys.stderr)
    producer_done.wait(30)
    if payer.error is not None:
        raise payer.error
    elapsed = progress.last_message - progress.started

    blocked_now = sum(1 for a in accounts if (store.wallet(a) or {}).get("blocked") == "1")
    balances = store.balances(a for a, acc in accounts.items() if acc.billing == "prepaid")
    lowest = sorted(balances.items(), key=lambda kv: kv[1])[:5]
    echo("\n== operator summary")
    echo(f"   events consumed      {progress.consumed:>12,}   ({progress.consumed / max(elapsed, 1e-9):,.0f}/s "
         f"over {elapsed:.0f} s)")
    echo(f"   rated                {progress.rated:>12,}")
    echo(f"   rejected             {progress.rejected:>12,}   (sent byte for byte to {settings.topics.rejected})")
    echo(f"   duplicates ignored   {progress.duplicates:>12,}   (never charged twice)")
    echo(f"   revenue charged      {format_micros(progress.charged_micros):>12} {catalog.currency}")
    echo(f"   monthly fees         {fees.charged:>12,}   accounts charged {format_micros(fees.total)} "
         f"{catalog.currency} before the traffic ({blocked_at_start} wallets blocked at the start)")
    echo(f"   wallets blocked      {progress.blocked:>12,}   by usage (now blocked: {blocked_now})")
    echo(f"   refused by dialer    {gate.refused:>12,}   outbound call/SMS attempts of blocked wallets "
         f"(never became CDRs)")
    echo(f"   top-ups requested    {progress.topups:>12,}   by usage ({payer.requested:,} in all, fees included)")
    echo(f"   top-ups paid         {payer.paid:>12,}   {format_micros(payer.paid_micros)} {catalog.currency}; "
         f"{payer.unblocked:,} wallets unblocked by them")
    echo(f"   produce->queryable   p50 {_pct(latencies, 0.5):.3f} s   p99 {_pct(latencies, 0.99):.3f} s")
    echo("   lowest prepaid       " + ", ".join(f"{a} {format_micros(b)}" for a, b in lowest))
    echo("\n== analyst report (ClickHouse: rated_usage, wallet_events, rejected_events and views)")
    print_report(settings.clickhouse_dsn, settings.clickhouse_database, echo)
    echo(f"\nThe data stays in {settings.clickhouse_dsn}; query it with `METERING_CLICKHOUSE_DSN="
         f"{settings.clickhouse_dsn} metering report`;\nthe wallets stay in {settings.redis_url} (the demo's "
         f"database, emptied at its next start): `METERING_REDIS_URL={settings.redis_url} metering accounts show "
         f"{lowest[0][0] if lowest else 'ACCOUNT'}`.")
    return 0
