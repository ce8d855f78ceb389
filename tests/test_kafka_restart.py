"""The Kafka broker itself is SIGKILLed under a running `metering run`, stays away for a few
seconds and is restarted on the same log directory and ports: the worker rides it out and the
end state equals `metering rate`. The broker (KRaft, single node) is this test's own, started
by deploy/local/services.sh with its state under tmp_path and ports picked free at run time,
so the broker the other tests share is never touched; it is stopped whatever happens."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from metering import kafka_io
from metering.config import Settings
from metering.local_services import ensure_started
from metering.simulate import produce_traffic
from metering.workers.common import Stopping, flush_waiting
from metering.workers.pipeline import OrderedWriter
from tests.helpers import read_topic
from tests.test_pipeline_live import _check_equal, _group_offsets, _offline
from wallet_debiter.redis_store import RedisWalletStore, connect

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy/local/services.sh"
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
pytestmark = pytest.mark.integration

COUNT, SEED, DUP, BAD = 40_000, 97, 0.05, 0.01


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Broker:
    """A broker of this test's own, driven by services.sh (state dir and ports from env)."""

    env: dict[str, str]
    state: Path
    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def services(self, *args: str) -> str:
        out = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, f"services.sh {' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return out.stdout

    def pid(self) -> int:
        return int((self.state / "kafka/kafka.pid").read_text().strip())

    def kill_9(self) -> None:
        """SIGKILL the broker process (no clean shutdown, no flush) and wait for its port to close."""
        os.kill(self.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _port_open(self.port):
            assert time.monotonic() < deadline, "the killed broker still listens"
            time.sleep(0.1)


@contextlib.contextmanager
def _own_broker(tmp_path: Path) -> Iterator[Broker]:
    port, controller = _free_ports(2)
    state = tmp_path / "kafka-own"
    env = {**os.environ, "METERING_STATE_DIR": str(state), "METERING_KAFKA_PORT": str(port),
           "METERING_KAFKA_CONTROLLER_PORT": str(controller), "METERING_PYTHON": sys.executable,
           "METERING_KAFKA_HEAP": "-Xms256m -Xmx768m"}
    broker = Broker(env, state, port)
    try:
        broker.services("start", "kafka")
        yield broker
    finally:  # stopped whatever happened (services.sh stop: SIGTERM, SIGKILL after 60 s)
        subprocess.run(["bash", str(SCRIPT), "stop", "kafka"], env=env, cwd=ROOT, capture_output=True, timeout=120)


def _committed(settings: Settings) -> int:
    try:
        return _group_offsets(settings)
    except Exception:  # noqa: BLE001 - the group coordinator may still be loading
        return -1


def _wait_committed(settings: Settings, n: int, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.monotonic()
    while (done := _committed(settings)) < n:
        assert proc.poll() is None, f"the worker exited ({proc.returncode}) with {done} of {n} committed"
        assert time.monotonic() - started < timeout_s, f"only {done} of {n} committed after {timeout_s} s"
        time.sleep(0.3)
    return time.monotonic() - started


def _movements_lag(settings: Settings) -> int:
    """Messages of wallet.events + wallet.movements the pipeline's movements group has not committed."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.group_prefix}-movements",
                  "enable.auto.commit": False})
    try:
        lag = 0
        for topic in (settings.topics.wallet_events, settings.topics.movements):
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10):
                _, hi = c.get_watermark_offsets(tp, timeout=10)
                lag += hi - max(0, tp.offset)
        return lag
    finally:
        c.close()


def test_kafka_broker_killed_mid_stream_then_restarted_changes_nothing(tmp_path: Path) -> None:
    """40 k seeded events (5 % re-produced duplicates, 1 % poison) produced at 2 500/s while
    `metering run` works; once part of them is committed the broker is killed with SIGKILL,
    stays away 5 s and is restarted on the same state: the worker does not die, commits
    every event, stops on SIGTERM with exit 0, and every Redis balance, ClickHouse row and
    reject equals `metering rate`'s, none charged twice."""
    redis_url = ensure_started(("redis",)).redis_url
    db = 1 + uuid.uuid4().int % 14
    with _own_broker(tmp_path) as broker:
        env = {**os.environ, "METERING_KAFKA_BOOTSTRAP": broker.bootstrap,
               "METERING_REDIS_URL": f"{redis_url.rsplit('/', 1)[0]}/{db}",
               "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"k{uuid.uuid4().hex[:8]}.",
               "METERING_GROUP_PREFIX": f"k{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
               "METERING_ACCOUNTS": str(ACCOUNTS), "METERING_METRICS_PORT": "0", "METERING_BATCH_SIZE": "500"}
        connect(env["METERING_REDIS_URL"]).flushdb()
        for cmd in (["setup"], ["accounts", "import", str(ACCOUNTS)]):
            subprocess.run([sys.executable, "-m", "metering.cli", *cmd], env=env, check=True, cwd=ROOT,
                           capture_output=True)
        settings = Settings.from_env(env)
        now = datetime.now(UTC).replace(microsecond=0)
        produced: list[int] = []
        producer = threading.Thread(target=lambda: produced.append(produce_traffic(
            settings, count=COUNT, per_second=2_500, seed=SEED, duplicate_rate=DUP, malformed_rate=BAD,
            start=now.replace(hour=0))))
        producer.start()
        rater, rows = _offline(COUNT, SEED, DUP, BAD, now)
        log_path = tmp_path / "worker.log"  # a file, not a pipe: the outage's log lines never block it
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "metering.cli", "run"], env=env, cwd=ROOT,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_committed(settings, 6_000, proc, timeout_s=90)
            at_kill = _committed(settings)
            assert 0 < at_kill < COUNT and producer.is_alive(), "the broker must die mid-stream"
            broker.kill_9()
            killed_at = time.monotonic()
            time.sleep(5)
            assert proc.poll() is None, f"the worker died while the broker was away ({proc.returncode})"
            broker.services("start", "kafka")
            restarted_at = time.monotonic()
            producer.join(timeout=120)
            assert not producer.is_alive() and produced == [COUNT], produced
            caught_up_s = _wait_committed(settings, COUNT, proc, timeout_s=120)
            # the operator-movements consumer (its own group) is back too and read wallet.events to the end
            deadline = time.monotonic() + 60
            while (lag := _movements_lag(settings)) != 0:
                assert time.monotonic() < deadline and proc.poll() is None, f"movements group lag {lag}"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = log_path.read_text(errors="replace")
        assert rc == 0, log[-3000:]
        lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
        assert any(x.get("msg") == "pipeline stopped" and x.get("reason") == "signal" for x in lines), log[-3000:]
        print(f"\nbroker killed at {at_kill} committed; away {restarted_at - killed_at:.1f} s (restart included); "
              f"all {COUNT} committed {caught_up_s:.1f} s after the restart; worker log lines: "
              f"{collections.Counter(x['msg'].split(' [')[0][:40] for x in lines if x['level'] in ('warning', 'error'))}")

        _check_equal(env, rater, rows)
        assert sum(RedisWalletStore(connect(env["METERING_REDIS_URL"])).positions(settings.topics.events).values()) \
            == COUNT == sum(kafka_io.end_offsets(settings, settings.topics.events).values())
        charged = sum(1 for r in rows if r[2] == "rated" and r[14])
        client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
        try:
            debits = client.query("SELECT count(), uniqExact(movement_id) FROM metering.wallet_movements FINAL "
                                  "WHERE type = 'debit'").result_rows[0]
        finally:
            client.close()
        assert debits == (charged, charged)  # one debit per charged event, none twice

        # usage.rejected holds every reject (at least once: a replayed batch may re-send some)
        want = collections.Counter(r[4] for r in rows if r[2] == "rejected")
        msgs = read_topic(broker.bootstrap, settings.topics.rejected,
                          lambda ms: len({dict(m.headers())["source.offset"] + b":" +
                                          dict(m.headers())["source.partition"] for m in ms}) >= want.total(), 60)
        by_source = {(dict(m.headers())["source.partition"], dict(m.headers())["source.offset"]):
                     dict(m.headers())["reason"].decode() for m in msgs}
        assert collections.Counter(by_source.values()) == want


def test_flush_waits_for_an_absent_broker_until_sigterm_or_the_limit() -> None:
    """The writer's flush waits out a broker that is away (before: a fixed 60 s, then the
    writer failed, and `metering run` noticed it only when the next batch arrived, i.e. once
    the broker was back, and exited 1 then): SIGTERM ends the wait at once (Stopping), and
    past `give_up_s` it fails with the number of messages not delivered."""
    dead = f"127.0.0.1:{_free_ports(1)[0]}"  # nothing listens there
    producer = Producer({"bootstrap.servers": dead, "enable.metrics.push": False,
                         "logger": logging.getLogger("test.dead-broker")})
    producer.produce("t", value=b"x")
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopping, match="1 messages not delivered"):
        flush_waiting(producer, "test", stop=stop)
    assert 1.4 < time.monotonic() - started < 4
    with pytest.raises(KafkaException, match="1 messages not delivered after"):
        flush_waiting(producer, "test", give_up_s=1.0)
    producer.purge()


def test_a_failed_writer_stops_the_loop_without_waiting_for_a_batch() -> None:
    writer = OrderedWriter()

    def fail() -> None:
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "2 messages not delivered"))

    try:
        writer.submit(fail)
        deadline = time.monotonic() + 10
        while writer.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(KafkaException, match="2 messages not delivered"):
            writer.check()  # called by Pipeline.run at the top of every loop turn
    finally:
        writer.close()
