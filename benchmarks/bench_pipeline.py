"""End to end on this box: Kafka -> rating -> Redis wallets -> ClickHouse (chDB) -> commit,
with the broker, Redis and chDB on the same machine as the pipeline.

    bash deploy/local/services.sh start            # Kafka (KRaft) + Redis, idempotent
    python benchmarks/bench_pipeline.py            # 300 000 events; 20 000 events/s for 30 s
    python benchmarks/bench_pipeline.py --count 50000 --rate 5000 --seconds 10 --json

Phase 1 (throughput): `--count` events (realistic mix from metering.traffic: calls, SMS,
meters, 1 % duplicates, 0.5 % malformed) are produced first, then
  (a) bare confluent-kafka `consume(batch)` + msgspec decode (schemas.events) of the whole
      topic with a throwaway group: the raw baseline, measured in the same run;
  (b) the real `metering.workers.pipeline.Pipeline` (what `metering run` runs), in this
      process, from offset 0: sustained events/s = events after the first batch / time from
      the end of the first batch to the end of the last (the wall time including the
      consumer-group join is printed too), and the ratio to (a).
Phase 2 (latency): a producer *process* (switches are other machines; a thread would fight the
pipeline for the GIL) sends `--rate` events/s for `--seconds` s while the pipeline runs.
Produce-to-queryable latency of an event = the moment its batch's ClickHouse inserts returned
minus its Kafka CreateTime (stamped by librdkafka at produce()): `Progress.last_latencies`.
If the producer could not keep up with `--rate`, the achieved rate says so.
Both phases end with a check that ClickHouse holds exactly the expected rated rows (the
generator's labels), so the benchmark never times a no-op, and print a CPU budget
(benchmarks/cpu_budget.py): microseconds of CPU per event of each component (this process's
Python, librdkafka and chDB threads, Redis, the local broker, phase 2's producer process)
from the phase's start to its last batch, their sum, and the events/s this box's cores could
carry at that cost: the ceiling of any throughput target here.

Isolation: fresh topics (unique METERING_TOPIC_PREFIX / METERING_GROUP_PREFIX, deleted at
the end unless --keep-topics), Redis database `--redis-db` (default 15, which the tests
never pick; it is FLUSHED), a chDB directory under a temp dir (one database per phase), the
example catalog and 10 000 generated accounts with large balances (as bench_rating.py).
Progress goes to stderr; the table (or --json) to stdout. Targets (issue): >= 100 k events/s
sustained; p99 < 1 s at 20 k events/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_pipeline.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bench_rating import accounts_10k  # noqa: E402 - the same 10 k accounts as the rating benchmark
from cpu_budget import Snapshot, local_kafka_pid, per_event_us, report_lines, snapshot  # noqa: E402

from metering import kafka_io  # noqa: E402
from metering.config import Settings  # noqa: E402
from metering.gc_tuning import tune_for_batches  # noqa: E402
from metering.local_services import ensure_started, state_dir  # noqa: E402
from metering.storage.clickhouse_sink import ClickHouseSink  # noqa: E402
from metering.traffic import generate_labeled_events, load_accounts_list, load_catalog_dict  # noqa: E402
from metering.workers.pipeline import Pipeline, Progress  # noqa: E402
from rating.accounts import parse_accounts  # noqa: E402
from rating.catalog import load_catalog  # noqa: E402
from schemas.events import event_decoder  # noqa: E402
from wallet_debiter.redis_store import RedisWalletStore, connect  # noqa: E402

CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
DUPLICATE_RATE = 0.01
MALFORMED_RATE = 0.005
PACE_TICK_S = 0.005  # the paced load generator sends in ticks of this length (see paced_producer)


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * q))]


# ---------------------------------------------------------------------------- environment


CREATED: list[Settings] = []  # topic sets to delete at the end


def make_settings(args: argparse.Namespace, run_id: str, phase: str, chdb_dir: str) -> Settings:
    ep = ensure_started()
    env = {
        **os.environ, **ep.as_env(),
        "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{args.redis_db}",
        "METERING_CLICKHOUSE_DSN": f"chdb://{chdb_dir}",
        "METERING_TOPIC_PREFIX": f"bench{run_id}.{phase}.",
        "METERING_GROUP_PREFIX": f"bench{run_id}-{phase}",
    }
    settings = Settings.from_env(env, partitions=args.partitions, batch_size=args.batch_size,
                                 batch_timeout_s=args.batch_timeout, metrics_port=0,
                                 catalog_path=str(CATALOG), clickhouse_database=f"bench_{phase}")
    CREATED.append(settings)
    return settings


def fresh_redis(settings: Settings, accounts_list: list[dict]) -> None:  # type: ignore[type-arg]
    """FLUSHDB the benchmark's Redis database, then import the accounts (= `metering accounts import`)."""
    client = connect(settings.redis_url)
    client.flushdb()
    accs = parse_accounts({"accounts": accounts_list}, load_catalog(CATALOG))
    RedisWalletStore(client).import_accounts(accs.values())
    client.close()


def delete_topics(settings: Settings) -> None:
    t = settings.topics
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for fut in admin.delete_topics([getattr(t, f.name) for f in fields(t)], operation_timeout=30).values():
        try:
            fut.result()
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            err(f"warning: topic deletion failed: {exc}")


def labeled_events(accounts_list: list[dict], count: int, seed: int) -> list[tuple[str, bytes, str]]:  # type: ignore[type-arg]
    now = datetime.now(UTC)
    return list(generate_labeled_events(load_catalog_dict(CATALOG), accounts_list, count=count, seed=seed,
                                        start=now - timedelta(days=2), duplicate_rate=DUPLICATE_RATE,
                                        malformed_rate=MALFORMED_RATE, now=now))


def produce_all(settings: Settings, events: list[tuple[str, bytes, str]]) -> float:
    """Flat out, in this process; returns events/s (until every message is acknowledged)."""
    producer = kafka_io.make_producer(settings)
    delivery = kafka_io.DeliveryCheck()
    topic = settings.topics.events
    t = time.perf_counter()
    for i, (key, value, _) in enumerate(events):
        kafka_io.produce(producer, topic, value, key.encode(), delivery)
        if i % 5000 == 0:
            producer.poll(0)
    kafka_io.flush(producer)
    delivery.raise_if_failed()
    return len(events) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------- phase 1 (a)


def bare_consume(settings: Settings, total: int, batch: int) -> dict[str, Any]:
    """confluent-kafka consume(batch) + msgspec decode of the whole topic (a throwaway group)."""
    consumer = kafka_io.make_consumer(settings, f"bare-{uuid.uuid4().hex[:8]}", [settings.topics.events])
    decoder = event_decoder()
    started = time.perf_counter()
    first_at = last_at = 0.0
    first_n = n = bad = 0
    deadline = started + 120
    try:
        while n < total and time.perf_counter() < deadline:
            msgs = consumer.consume(batch, 1.0)
            for m in msgs:
                if m.error() is not None:
                    continue
                n += 1
                try:
                    decoder.decode(m.value() or b"")
                except (msgspec.DecodeError, UnicodeDecodeError):
                    bad += 1
            if msgs:
                last_at = time.perf_counter()
                if not first_at:
                    first_at, first_n = last_at, n
    finally:
        consumer.close()
    return {"events": n, "undecodable": bad, "wall_s": last_at - started,
            "events_per_s": (n - first_n) / max(last_at - first_at, 1e-9)}


# ---------------------------------------------------------------------------- pipeline runner


class PipelineRun:
    """The real Pipeline in a thread; stops once it has consumed `target` events."""

    def __init__(self, settings: Settings, sink: ClickHouseSink, label: str, profile: str | None = None) -> None:
        self.pipeline = Pipeline(settings, sink=sink)
        tune_for_batches()  # what `metering run` does once its pipeline is built
        self.label = label
        self.profile = profile
        self.target: int | None = None
        self.marks: list[tuple[float, int]] = []  # (end of batch, consumed so far)
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.cpu: tuple[float, float] = (0.0, 0.0)
        # CPU snapshots (cpu_budget): before the phase starts (phase 1: before the pipeline joins
        # its group; phase 2: when the producer is told to go) and at the batch that reaches
        # `target`, while the pipeline's threads are alive (an ended thread's CPU is no longer
        # listed per thread) and before the final ClickHouse checks
        self.take_snapshot: Callable[[], Snapshot] | None = None
        self.cpu_before: Snapshot | None = None
        self.cpu_after: Snapshot | None = None
        self.thread = threading.Thread(target=self._run, name=f"pipeline-{label}", daemon=True)

    def _on_batch(self, p: Progress) -> None:
        self.marks.append((time.perf_counter(), p.consumed))
        self.latencies.extend(p.last_latencies)
        if self.target is not None and p.consumed >= self.target:
            if self.take_snapshot is not None and self.cpu_after is None:
                self.cpu_after = self.take_snapshot()
            self.pipeline.stop.set()

    def _run(self) -> None:
        start = resource.getrusage(resource.RUSAGE_THREAD)
        prof = None
        if self.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        try:
            self.pipeline.run(on_batch=self._on_batch)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            if prof is not None and self.profile:
                prof.disable()
                prof.dump_stats(self.profile)
            end = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu = (end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime)

    def start(self) -> float:
        self.started = time.perf_counter()
        self.thread.start()
        return self.started

    def wait_assigned(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.pipeline.consumer.assignment():
            if self.error or time.monotonic() > deadline:
                raise RuntimeError(f"pipeline never got its partitions: {self.error!r}")
            time.sleep(0.05)

    def wait(self, timeout_s: float, extra_status: Any = None) -> None:
        """Until `target` is consumed (or the timeout); progress on stderr every 2 s."""
        deadline = time.monotonic() + timeout_s
        shown = time.monotonic()
        while self.thread.is_alive():
            p = self.pipeline.progress
            if self.target is not None and p.consumed >= self.target:
                self.pipeline.stop.set()
            if time.monotonic() > deadline:
                err(f"\n{self.label}: timeout after {timeout_s:.0f} s, stopping")
                self.pipeline.stop.set()
            if time.monotonic() - shown >= 2:
                shown = time.monotonic()
                rate = self.rate(last_s=4)
                more = f" | {extra_status()}" if extra_status else ""
                err(f"  [{self.label}] consumed {p.consumed:>9,} ({rate:>8,.0f}/s last 4 s), "
                    f"rated {p.rated:,}, lag {p.lag:,}{more}")
            self.thread.join(0.2)
        if self.error is not None:
            raise RuntimeError(f"pipeline failed: {self.error!r}") from self.error

    def rate(self, last_s: float | None = None) -> float:
        marks = self.marks
        if len(marks) < 2:
            return 0.0
        if last_s is not None:
            cut = marks[-1][0] - last_s
            window = [m for m in marks if m[0] >= cut]
            first = marks[max(0, len(marks) - len(window) - 1)]
        else:
            first = marks[0]
        dt = marks[-1][0] - first[0]
        return (marks[-1][1] - first[1]) / dt if dt > 0 else 0.0


def clickhouse_counts(sink: ClickHouseSink) -> dict[str, int]:
    db = sink.database
    q = sink.client.query
    return {"rated_rows": int(q(f"SELECT count() FROM {db}.rated_usage FINAL").result_rows[0][0]),
            "rejected_rows": int(q(f"SELECT count() FROM {db}.rejected_events FINAL").result_rows[0][0])}


def expected_counts(labels: Counter[str]) -> dict[str, int]:
    ok, dup = labels.get("ok", 0), labels.get("duplicate", 0)
    return {"rated": ok, "duplicate": dup, "rejected": sum(labels.values()) - ok - dup}


# ---------------------------------------------------------------------------- phase 2 producer


def paced_producer(conn: Any, settings: Settings, accounts_list: list[dict], count: int, seed: int,  # type: ignore[type-arg]
                   rate: float) -> None:
    """Child process: generate first, then on "go" send `count` events at `rate` events/s."""
    events = labeled_events(accounts_list, count, seed)
    labels = Counter(label for _, _, label in events)
    producer = kafka_io.make_producer(settings)
    delivery = kafka_io.DeliveryCheck()
    topic = settings.topics.events
    conn.send(("ready", len(events)))
    conn.recv()  # go
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    i, n = 0, len(events)
    worst_behind = 0.0
    while i < n:
        elapsed = time.monotonic() - t0
        due = min(n, int(elapsed * rate) + 1)
        worst_behind = max(worst_behind, (due - i) / rate)
        while i < due:
            key, value, _ = events[i]
            kafka_io.produce(producer, topic, value, key.encode(), delivery)
            i += 1
        producer.poll(0)
        # Sleep at least a tick: waking up for every event or two cost the load generator
        # ~14 us of CPU per event at 20 k/s (on the cores the pipeline is measured on), ~4 us
        # with 5 ms ticks (100 events each at 20 k/s; each event still stamped when produced).
        time.sleep(max(i / rate - (time.monotonic() - t0), PACE_TICK_S))
    last = time.monotonic() - t0
    kafka_io.flush(producer)
    delivery.raise_if_failed()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    conn.send(("done", {"produced": n, "produce_s": last, "acked_s": time.monotonic() - t0, "cpu_s": cpu_s,
                        "worst_behind_s": worst_behind, "labels": dict(labels)}))


# ---------------------------------------------------------------------------- phases


def phase1(args: argparse.Namespace, run_id: str, chdb_dir: str, accounts_list: list[dict]) -> dict[str, Any]:  # type: ignore[type-arg]
    settings = make_settings(args, run_id, "p1", chdb_dir)
    kafka_io.ensure_topics(settings)
    fresh_redis(settings, accounts_list)
    err(f"phase 1: generating {args.count:,} events")
    events = labeled_events(accounts_list, args.count, seed=42)
    labels = Counter(label for _, _, label in events)
    err("phase 1: producing them")
    produce_rate = produce_all(settings, events)
    del events
    err(f"phase 1: produced at {produce_rate:,.0f}/s; bare consume + decode")
    bare = bare_consume(settings, args.count, args.batch_size)
    err(f"phase 1: bare {bare['events_per_s']:,.0f}/s; running the pipeline")
    sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
    redis = connect(settings.redis_url)  # for the CPU snapshots (INFO cpu)
    try:
        run = PipelineRun(settings, sink, "phase 1", profile=args.profile)
        run.target = args.count
        kafka_pid = local_kafka_pid(state_dir())
        run.take_snapshot = lambda: snapshot(redis, kafka_pid)
        run.cpu_before = run.take_snapshot()
        t0 = run.start()
        run.wait(timeout_s=args.timeout)
        p = run.pipeline.progress
        budget = per_event_us(run.cpu_before, run.cpu_after or run.take_snapshot(), p.consumed)
        ch = clickhouse_counts(sink)
    finally:
        redis.close()
        sink.close()
    marks = run.marks
    sustained = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) > 1 else 0.0
    want = expected_counts(labels)
    return {
        "settings": settings, "events": args.count, "produce_events_per_s": produce_rate, "bare": bare,
        "pipeline": {"consumed": p.consumed, "rated": p.rated, "rejected": p.rejected,
                     "duplicates": p.duplicates, "batches": p.batches,
                     "events_per_s": sustained, "wall_s": marks[-1][0] - t0 if marks else 0.0,
                     "cpu_user_s": run.cpu[0], "cpu_sys_s": run.cpu[1]},
        "cpu_budget": budget,
        "ratio": sustained / bare["events_per_s"] if bare["events_per_s"] else 0.0,
        "expected": want, "clickhouse": ch,
        "check_ok": ch["rated_rows"] == want["rated"] == p.rated and ch["rejected_rows"] == want["rejected"],
    }


def phase2(args: argparse.Namespace, run_id: str, chdb_dir: str, accounts_list: list[dict]) -> dict[str, Any]:  # type: ignore[type-arg]
    settings = make_settings(args, run_id, "p2", chdb_dir)
    kafka_io.ensure_topics(settings)
    fresh_redis(settings, accounts_list)
    count = int(args.rate * args.seconds)
    err(f"phase 2: producer process generating {count:,} events")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=paced_producer, args=(child, settings, accounts_list, count, 7, args.rate),
                       daemon=True)
    proc.start()
    sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
    redis = connect(settings.redis_url)  # for the CPU snapshots (INFO cpu)
    try:
        run = PipelineRun(settings, sink, "phase 2")
        run.start()
        run.wait_assigned()
        kind, n = parent.recv()
        assert kind == "ready" and n == count, (kind, n)
        err(f"phase 2: pipeline assigned; producing {args.rate:,.0f} events/s for {args.seconds:g} s")
        kafka_pid = local_kafka_pid(state_dir())
        run.take_snapshot = lambda: snapshot(redis, kafka_pid)
        run.cpu_before = run.take_snapshot()
        parent.send("go")
        t_go = time.perf_counter()
        done: dict[str, Any] = {}

        def watch_producer() -> None:
            kind, info = parent.recv()
            done.update(info)
            run.target = info["produced"]

        watcher = threading.Thread(target=watch_producer, daemon=True)
        watcher.start()
        run.wait(timeout_s=args.seconds + args.timeout,
                 extra_status=lambda: "producer done" if done else
                 f"producing ({time.perf_counter() - t_go:.0f}/{args.seconds:g} s)")
        watcher.join(30)
        proc.join(30)
        p = run.pipeline.progress
        budget = per_event_us(run.cpu_before, run.cpu_after or run.take_snapshot(), p.consumed,
                              extra={"load generator (producer process)": done.get("cpu_s", 0.0)})
        ch = clickhouse_counts(sink)
    finally:
        redis.close()
        sink.close()
        if proc.is_alive():
            proc.kill()
    lat = sorted(run.latencies)
    want = expected_counts(Counter(done.get("labels", {})))
    produced = done.get("produced", 0)
    # consumption rate while the producer was sending (from the first batch to the last)
    return {
        "settings": settings, "offered_rate": args.rate, "seconds": args.seconds, "events": produced,
        "achieved_rate": produced / done["produce_s"] if done.get("produce_s") else 0.0,
        "producer_worst_behind_s": done.get("worst_behind_s"),
        "pipeline": {"consumed": p.consumed, "rated": p.rated, "batches": p.batches,
                     "mean_batch": p.consumed / max(p.batches, 1),
                     "cpu_user_s": run.cpu[0], "cpu_sys_s": run.cpu[1]},
        "cpu_budget": budget,
        "latency_s": {"n": len(lat), "p50": pct(lat, 0.50), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99),
                      "max": lat[-1] if lat else float("nan")},
        "expected": want, "clickhouse": ch,
        "check_ok": ch["rated_rows"] == want["rated"] == p.rated and ch["rejected_rows"] == want["rejected"]
                    and p.consumed == produced,
    }


# ---------------------------------------------------------------------------- report


def report(r1: dict[str, Any] | None, r2: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    out = [f"metering end-to-end benchmark: {meta['cores']} cores, broker + Redis + chDB on this box",
           f"  partitions {meta['partitions']}, batch {meta['batch_size']} (timeout {meta['batch_timeout']} s), "
           f"{meta['accounts']:,} accounts, example catalog, 1 % duplicates, 0.5 % malformed",
           f"  load average {meta['load_before']} before, {meta['load_after']} after", ""]
    if r1:
        b, p = r1["bare"], r1["pipeline"]
        cpu = p["cpu_user_s"] + p["cpu_sys_s"]
        out += [
            f"Phase 1: throughput, {r1['events']:,} pre-produced events",
            f"  produce (confluent-kafka, flat out)          {r1['produce_events_per_s']:>10,.0f} events/s",
            f"  bare consume + msgspec decode                {b['events_per_s']:>10,.0f} events/s",
            f"  pipeline (rate, Redis, chDB, commit)         {p['events_per_s']:>10,.0f} events/s sustained "
            f"(wall incl. group join {p['wall_s']:.1f} s)",
            f"  ratio pipeline / bare                        {r1['ratio']:>10.3f}",
            f"  pipeline thread CPU                          {cpu:>10.1f} s "
            f"({cpu / max(p['consumed'], 1) * 1e6:.0f} us/event), {p['batches']} batches",
            f"  ClickHouse rated / rejected rows             {r1['clickhouse']['rated_rows']:>10,} / "
            f"{r1['clickhouse']['rejected_rows']:,} (expected {r1['expected']['rated']:,} / "
            f"{r1['expected']['rejected']:,}) {'OK' if r1['check_ok'] else 'MISMATCH'}",
            *report_lines(r1["cpu_budget"], "the pipeline ran"),
            "",
        ]
    if r2:
        lat, p = r2["latency_s"], r2["pipeline"]
        short = r2["achieved_rate"] < 0.98 * r2["offered_rate"]
        out += [
            f"Phase 2: latency at a fixed offered load, {r2['offered_rate']:,.0f} events/s for {r2['seconds']:g} s",
            f"  achieved produce rate                        {r2['achieved_rate']:>10,.0f} events/s "
            f"({r2['events']:,} events){'  PRODUCER FELL BEHIND' if short else ''}",
            f"  produce-to-queryable p50                     {lat['p50'] * 1000:>10,.0f} ms",
            f"  produce-to-queryable p95                     {lat['p95'] * 1000:>10,.0f} ms",
            f"  produce-to-queryable p99                     {lat['p99'] * 1000:>10,.0f} ms",
            f"  produce-to-queryable max                     {lat['max'] * 1000:>10,.0f} ms",
            f"  batches                                      {p['batches']:>10,} (mean {p['mean_batch']:,.0f} events)",
            f"  ClickHouse rated / rejected rows             {r2['clickhouse']['rated_rows']:>10,} / "
            f"{r2['clickhouse']['rejected_rows']:,} (expected {r2['expected']['rated']:,} / "
            f"{r2['expected']['rejected']:,}) {'OK' if r2['check_ok'] else 'MISMATCH'}",
            *report_lines(r2["cpu_budget"], "the producer sent and the pipeline ran"),
            "",
        ]
    out.append("Targets (issue)")
    if r1:
        v = r1["pipeline"]["events_per_s"]
        out.append(f"  {'>= 100 000 events/s sustained':<45}{'met' if v >= 100_000 else 'NOT met'} ({v:,.0f})")
    if r2:
        v = r2["latency_s"]["p99"]
        label = f"p99 < 1 s at {r2['offered_rate']:,.0f} events/s"
        out.append(f"  {label:<45}{'met' if v < 1 else 'NOT met'} ({v:.2f} s)")
    return "\n".join(out)


def jsonable(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    r = dict(r)
    s = r.pop("settings")
    r["topics_prefix"] = s.topics.events.rsplit(".", 2)[0]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300_000, help="phase 1 events (default 300 000)")
    ap.add_argument("--rate", type=float, default=20_000, help="phase 2 offered load, events/s (default 20 000)")
    ap.add_argument("--seconds", type=float, default=30, help="phase 2 duration (default 30)")
    ap.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4)")
    ap.add_argument("--batch-size", type=int, default=5000, help="METERING_BATCH_SIZE (default 5000)")
    ap.add_argument("--batch-timeout", type=float, default=0.2, help="METERING_BATCH_TIMEOUT_S (default 0.2)")
    ap.add_argument("--redis-db", type=int, default=15, help="Redis database to FLUSH and use (default 15)")
    ap.add_argument("--phase", choices=["1", "2", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=600, help="give up on a phase after this long (s)")
    ap.add_argument("--profile", help="write a cProfile (pstats) of the phase-1 pipeline thread here")
    ap.add_argument("--keep-topics", action="store_true", help="do not delete the benchmark topics")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()

    run_id = uuid.uuid4().hex[:8]
    accounts_list = accounts_10k(load_accounts_list(ACCOUNTS))
    meta = {"cores": os.cpu_count(), "partitions": args.partitions, "batch_size": args.batch_size,
            "batch_timeout": args.batch_timeout, "accounts": len(accounts_list),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    r1 = r2 = None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        chdb_dir = f"{tmp}/ch"  # one chDB path per process: both phases share it (one database each)
        try:
            if args.phase in ("1", "both"):
                r1 = phase1(args, run_id, chdb_dir, accounts_list)
            if args.phase in ("2", "both"):
                r2 = phase2(args, run_id, chdb_dir, accounts_list)
        finally:
            if not args.keep_topics:
                for settings in CREATED:
                    delete_topics(settings)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        print(json.dumps({"meta": meta, "phase1": jsonable(r1), "phase2": jsonable(r2)}, indent=2, default=str))
    else:
        print(report(r1, r2, meta))


if __name__ == "__main__":
    main()
