"""Why faust-streaming stays off the hot path: consume + msgspec decode of the same usage
events on the real broker, bare confluent-kafka batches against a faust-streaming agent.

    python benchmarks/bench_faust.py --count 200000

Produces `--count` realistic usage events (metering.traffic, lz4 like the pipeline) to a fresh
topic, then reads them back three ways, each with its own consumer group, each decoding every
value with msgspec into the `usage.events` schema:

  confluent     Consumer.consume(num_messages=--batch) loop (what the pipeline does)
  aiokafka      bare AIOKafkaConsumer.getmany(max_records=--batch) (Faust's client, no Faust)
  faust         an agent `async for value in stream` (value_serializer='raw'), Faust defaults
  faust-take    the same agent reading `stream.take(--batch, within=0.5)` batches

Rates are events/s from the first message to the last (group join and start-up excluded);
`wall` also counts start-up. Each Faust run is a separate process (a Faust worker owns its
event loop and signal handlers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metering import kafka_io  # noqa: E402
from metering.config import Settings  # noqa: E402
from schemas.events import event_decoder  # noqa: E402


class Result(msgspec.Struct):
    mode: str
    events: int
    decode_errors: int
    seconds: float  # first message -> last message
    wall: float  # process/consumer start -> last message

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def bench_confluent(settings: Settings, topic: str, count: int, batch: int) -> Result:
    decoder = event_decoder()
    began = time.perf_counter()
    consumer = kafka_io.make_consumer(settings, f"bench-ck-{uuid.uuid4().hex[:8]}", [topic])
    n = errors = 0
    first = 0.0
    try:
        while n < count:
            msgs = consumer.consume(num_messages=batch, timeout=0.5)
            if msgs and not first:
                first = time.perf_counter()
            for m in msgs:
                if m.error():
                    continue
                n += 1
                try:
                    decoder.decode(m.value() or b"")
                except msgspec.DecodeError:
                    errors += 1
        end = time.perf_counter()
    finally:
        consumer.close()
    return Result("confluent", n, errors, end - first, end - began)


def bench_aiokafka(settings: Settings, topic: str, count: int, batch: int) -> Result:
    import asyncio

    from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

    decoder = event_decoder()

    async def run() -> Result:
        began = time.perf_counter()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                    group_id=f"bench-aio-{uuid.uuid4().hex[:8]}",
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        n = errors = 0
        first = 0.0
        try:
            while n < count:
                got = await consumer.getmany(timeout_ms=500, max_records=batch)
                if got and not first:
                    first = time.perf_counter()
                for msgs in got.values():
                    for m in msgs:
                        n += 1
                        try:
                            decoder.decode(m.value)
                        except msgspec.DecodeError:
                            errors += 1
            end = time.perf_counter()
        finally:
            await consumer.stop()
        return Result("aiokafka", n, errors, end - first, end - began)

    return asyncio.run(run())


def bench_faust(settings: Settings, topic: str, count: int, batch: int, take: bool) -> Result:
    """Runs in its own process: a Faust worker until `count` events are decoded."""
    import faust

    from metering.workers.alerts import broker_urls

    began = time.perf_counter()
    decoder = event_decoder()
    app = faust.App(f"bench-faust-{uuid.uuid4().hex[:8]}", broker=broker_urls(settings.kafka_bootstrap),
                    datadir=f"/tmp/bench-faust-{os.getpid()}", web_enabled=False,
                    topic_partitions=settings.partitions, consumer_auto_offset_reset="earliest")
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    state: dict[str, Any] = {"n": 0, "errors": 0, "first": 0.0, "end": 0.0}

    def seen(values: list[bytes]) -> None:
        if not state["first"]:
            state["first"] = time.perf_counter()
        for v in values:
            try:
                decoder.decode(v)
            except msgspec.DecodeError:
                state["errors"] += 1
        state["n"] += len(values)
        if state["n"] >= count and not state["end"]:
            state["end"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGTERM)  # graceful stop, not timed

    if take:
        @app.agent(source)
        async def consume_batches(stream: Any) -> None:
            async for values in stream.take(batch, within=0.5):
                seen(values)
    else:
        @app.agent(source)
        async def consume_events(stream: Any) -> None:
            async for value in stream:
                seen([value])

    worker = faust.Worker(app, loglevel="WARNING", override_logging=False)
    with contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    return Result("faust-take" if take else "faust", state["n"], state["errors"],
                  state["end"] - state["first"], state["end"] - began)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--skip-take", action="store_true", help="do not run the faust-take variant")
    ap.add_argument("--_faust", choices=["events", "take"], help=argparse.SUPPRESS)
    ap.add_argument("--_topic", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._faust:  # child process: one Faust measurement, result as JSON on stdout
        settings = Settings.from_env()
        r = bench_faust(settings, args._topic, args.count, args.batch, take=args._faust == "take")
        sys.stdout.write(msgspec.json.encode(r).decode() + "\n")
        return

    from metering.local_services import ensure_started
    from metering.simulate import produce_traffic

    ensure_started(("kafka",))
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    env = {**os.environ, "METERING_TOPIC_PREFIX": prefix, "METERING_METRICS_PORT": "0"}
    settings = Settings.from_env(env)
    kafka_io.ensure_topics(settings)
    topic = settings.topics.events
    t = time.perf_counter()
    sent = produce_traffic(settings, count=args.count, seed=7)
    print(f"produced {sent:,} usage events to {topic} ({settings.partitions} partitions, lz4) "
          f"in {time.perf_counter() - t:.1f} s")

    results = [bench_confluent(settings, topic, args.count, args.batch),
               bench_aiokafka(settings, topic, args.count, args.batch)]
    for mode in ["events"] + ([] if args.skip_take else ["take"]):
        proc = subprocess.run(
            [sys.executable, __file__, "--count", str(args.count), "--batch", str(args.batch),
             "--_faust", mode, "--_topic", topic],
            env=env, capture_output=True, text=True, timeout=1800,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"faust run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(msgspec.json.decode(lines[-1], type=Result))

    base = results[0].rate
    for r in results:
        print(f"{r.mode:11s} {r.events:>9,} events  {r.rate:>10,.0f} events/s  "
              f"({r.seconds:.2f} s first->last, wall {r.wall:.2f} s, decode errors {r.decode_errors})"
              f"  ratio vs confluent {r.rate / base:.2f}")


if __name__ == "__main__":
    main()
