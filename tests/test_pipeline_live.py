"""The live pipeline on the real broker, Redis and chDB agrees with `metering rate`, also
across kill -9 at chosen lines and duplicate delivery."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import clickhouse_connect
import pytest
import yaml
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions
from prometheus_client import REGISTRY

from metering import kafka_io
from metering.config import Settings
from metering.local_services import ensure_started
from metering.simulate import produce_traffic
from metering.storage.clickhouse_sink import ClickHouseSink
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict
from metering.workers.pipeline import Pipeline
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from tests.chdb_http import serving
from tests.helpers import free_port, read_topic
from wallet_debiter.redis_store import RedisWalletStore, connect, wallet_key

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
pytestmark = pytest.mark.integration


@pytest.fixture()
def live(tmp_path: Path, request: pytest.FixtureRequest):  # noqa: ANN201
    """Isolated topics, Redis database and chDB folder, accounts imported. Apache Kafka unless
    a test asks for "kfake" (indirect parametrization): franz-go's Kafka implementation, a
    second broker that shares no code with Apache Kafka."""
    broker = getattr(request, "param", "kafka")
    ep = ensure_started(("kafka", "redis") if broker == "kafka" else ("redis", "kfake"))
    broker_env = {"METERING_KAFKA_BOOTSTRAP": ep.kfake_bootstrap} if broker == "kfake" else {}
    db = 1 + uuid.uuid4().int % 14
    env = {**os.environ, **ep.as_env(), **broker_env, "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{db}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"g{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
           "METERING_ACCOUNTS": str(ACCOUNTS), "METERING_METRICS_PORT": "0", "METERING_BATCH_SIZE": "2000"}
    connect(env["METERING_REDIS_URL"]).flushdb()
    subprocess.run([sys.executable, "-m", "metering.cli", "setup"], env=env, check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "import", str(ACCOUNTS)], env=env, check=True, cwd=ROOT)
    return env


RUN = [sys.executable, "-m", "metering.cli", "run", "--until-idle"]
BROKERS = pytest.mark.parametrize("live", ["kafka", "kfake"], indirect=True)


def _run_logged(env: dict[str, str], **extra: str) -> tuple[int, str]:
    """`metering run --until-idle 3` to the end: (exit code, stderr); 0 or -9 (a crash point)."""
    proc = subprocess.run([*RUN, "3"], env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode not in (0, -9):
        raise AssertionError(f"metering run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode, proc.stderr


def _run(env: dict[str, str], **extra: str) -> int:
    return _run_logged(env, **extra)[0]


@contextlib.contextmanager
def _running(env: dict[str, str], idle_s: str | None = "3") -> Iterator[subprocess.Popen[str]]:
    """`metering run` in the background while the test acts on the stack (idle_s None: no idle
    exit, stopped by `_stopped`); killed if left over."""
    cmd = [*RUN, idle_s] if idle_s is not None else RUN[:-1]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stopped(proc: subprocess.Popen[str]) -> str:
    """SIGTERM a background run, which must stop cleanly; returns its stderr (JSON logs)."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def _finished(proc: subprocess.Popen[str]) -> str:
    """Wait for a background run to exit on its own, cleanly; returns its stderr (JSON logs)."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def _paced(settings: Settings, seed: int, now: datetime) -> threading.Thread:
    """20 k events at 1 500/s (~13 s) from a thread, so something can happen mid-stream."""
    producer = threading.Thread(target=produce_traffic, args=(settings,), kwargs={
        "count": 20_000, "per_second": 1_500, "seed": seed, "duplicate_rate": 0.05,
        "malformed_rate": 0.01, "start": now.replace(hour=0)})
    producer.start()
    return producer


def _group_offsets(settings: Settings, *, reset_to: int | None = None) -> int:
    """Sum of the pipeline group's committed offsets on usage.events; with `reset_to`, then
    commit that offset on every partition (an operator's consumer-group reset)."""
    topic = settings.topics.events
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.group_prefix}-debit",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(max(0, tp.offset) for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10))
        if reset_to is not None:
            c.commit(offsets=[TopicPartition(topic, p, reset_to) for p in parts], asynchronous=False)
    finally:
        c.close()
    return total


def _read(settings: Settings, topic: str, done: Callable[[list[Message]], bool], timeout_s: float = 60) -> list[Message]:
    return read_topic(settings.kafka_bootstrap, topic, done, timeout_s)


def _offline(count: int, seed: int, dup: float, bad: float, now: datetime, *,  # noqa: ANN202
             then: tuple[int, int] | None = None):
    """`metering rate` of the seeded stream (and, with `then` = (count, seed), of a second one
    produced after it) in one rater: (rater, rows)."""
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    rater = Rater(cat, accs, MemoryWalletStore(accs))
    events = []
    for n, s in [(count, seed), *([then] if then else [])]:
        events += generate_events(load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS), count=n, seed=s,
                                  start=now.replace(hour=0), duplicate_rate=dup, malformed_rate=bad, now=now)
    rows = []
    for i in range(0, len(events), 5000):
        rows += rater.rate_batch([(v, f"x:{i + n}") for n, (_, v) in enumerate(events[i:i + 5000])], now).rows
    return rater, rows


def _check_equal(env: dict[str, str], rater: Rater, rows: list, *,  # noqa: ANN001
                 ignore_balance_after: bool = False, order_free: bool = False) -> None:
    """ClickHouse and Redis equal `metering rate`'s rows and balances (`order_free`: the same
    events rated, each once, and every balance its opening minus its rated rows' charges: the
    records may have been settled in another order, so coverage and charges may differ)."""
    want = {(r[1], r[0]): (r[14], r[10], None if ignore_balance_after else r[15], r[12])
            for r in rows if r[2] == "rated"}
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        got_rows = client.query(
            "SELECT account_id, event_id, toInt64(charge * 1000000), covered_s, toInt64(balance_after * 1000000), package_id "
            "FROM metering.rated_usage FINAL").result_rows
        rejected = client.query("SELECT count() FROM metering.rejected_events FINAL").result_rows[0][0]
        moves = client.query("SELECT account_id, seq, toInt64(amount * 1000000), toInt64(balance_after * 1000000) "
                             "FROM metering.wallet_movements FINAL ORDER BY account_id, seq").result_rows
    finally:
        client.close()
    got = {(a, e): (c, cov, None if ignore_balance_after else b, p) for a, e, c, cov, b, p in got_rows}
    assert len(got_rows) == len(got) == len(want)  # each event once
    assert rejected == sum(1 for r in rows if r[2] == "rejected")
    store = RedisWalletStore(connect(env["METERING_REDIS_URL"]))
    live_bal = store.balances(rater.accounts)
    if order_free:
        assert set(got) == set(want)
        charged: Counter[str] = Counter()
        for (account, _), (charge, *_) in got.items():
            charged[account] += charge
        assert live_bal == {a: acc.balance - charged[a] for a, acc in rater.accounts.items()}
    else:
        assert got == want
        assert live_bal == {a: rater.store.wallet(a).balance for a in rater.accounts}  # type: ignore[attr-defined]
    if ignore_balance_after:
        return
    # Each wallet's movements, ordered by seq (the order Redis applied them in), are its
    # opening balance (seq 0, from `accounts import`; none at 0) then 1..n, and chain from 0 to
    # the live balance, whatever their CDR times: the movements add up to the balance.
    chains: dict[str, list[tuple[int, int, int]]] = {}
    for account, seq, amount, after in moves:
        chains.setdefault(account, []).append((seq, amount, after))
    assert chains, "no movements in ClickHouse"
    opened = {a for a, acc in rater.accounts.items() if acc.balance != 0}
    assert opened <= set(chains), "accounts without their opening movement"
    for account, chain in chains.items():
        opening = rater.accounts[account].balance
        if opening != 0:
            assert chain[0] == (0, opening, opening), account
        first = 0 if opening != 0 else 1
        assert [seq for seq, _, _ in chain] == list(range(first, first + len(chain))), account
        balance = 0
        for _, amount, after in chain:
            balance += amount
            assert after == balance, account
        assert balance == live_bal[account], account


@BROKERS
def test_live_pipeline_matches_offline_rating_then_a_rewind_changes_nothing(live: dict[str, str]) -> None:
    """100 k seeded events (5 % re-produced duplicates, 1 % poison) through the live pipeline:
    every row, balance and reject equals `metering rate`'s; then the consumer group is rewound
    to offset 0 and the whole topic is delivered again: still equal."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "5000"}
    settings = Settings.from_env(env)
    produce_traffic(settings, count=100_000, seed=11, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(100_000, 11, 0.05, 0.01, now)
    assert _run(env) == 0
    _check_equal(env, rater, rows)
    assert _group_offsets(settings, reset_to=0) == 100_000
    assert _run(env) == 0
    _check_equal(env, rater, rows)


CRASH_POINTS = ["after_redis", "mid_insert", "after_movements", "after_clickhouse", "before_flush",
                "before_commit", "after_commit"]


def _kill_plan(seed: int, rounds: int) -> list[dict[str, str]]:
    """Seeded kill points: a named line on the n-th batch, or kill -9 from a timer a random
    number of milliseconds into the work (wherever the process is at that moment)."""
    rng = random.Random(seed)
    plan = []
    for i in range(rounds):
        if i % 3 == 2:
            plan.append({"METERING_CRASH_POINT": "timer", "METERING_CRASH_AFTER_MS": str(rng.randint(1, 400))})
        else:
            plan.append({"METERING_CRASH_POINT": rng.choice(CRASH_POINTS),
                         "METERING_CRASH_AFTER": str(rng.randint(1, 3))})
    return plan


def _on_cluster(env: dict[str, str]) -> dict[str, str]:
    """The same env with the wallets on the local 3-master Redis Cluster (emptied, accounts
    imported)."""
    url = ensure_started(("redis-cluster",)).redis_cluster_url
    connect(url).flushall()
    env = {**env, "METERING_REDIS_URL": url}
    subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "import", str(ACCOUNTS)], env=env,
                   check=True, cwd=ROOT, capture_output=True)
    return env


@pytest.mark.parametrize(("live", "redis_kind"), [("kafka", "standalone"), ("kafka", "cluster"),
                                                 ("kfake", "standalone")], indirect=["live"])
def test_kill_9_at_24_seeded_points_then_restart_changes_nothing(live: dict[str, str], redis_kind: str) -> None:
    seed = int(os.environ.get("METERING_CRASH_SEED", "2026"))
    now = datetime.now(UTC).replace(microsecond=0)
    if redis_kind == "cluster":
        live = _on_cluster(live)
    # small batches so each kill lands mid-stream; static membership so a restart gets its
    # partitions back at once instead of after the dead member's session timeout
    env = {**live, "METERING_BATCH_SIZE": "250", "METERING_INSTANCE_ID": "crash-test"}
    settings = Settings.from_env(env)
    produce_traffic(settings, count=40_000, seed=5, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(40_000, 5, 0.05, 0.01, now)
    plan = _kill_plan(seed, 24)
    outcomes = [_run(env, **point) for point in plan]
    killed = [p for p, rc in zip(plan, outcomes, strict=True) if rc == -9]
    assert len(killed) >= 20, f"seed {seed}: only {len(killed)} of 24 runs were killed: {outcomes}"
    assert {p["METERING_CRASH_POINT"] for p in killed} >= {"after_redis", "mid_insert", "timer"}
    assert _run(env) == 0
    _check_equal(env, rater, rows)


def _snapshot(url: str) -> list[tuple[bytes, int, bytes]]:
    """Every key of the database, consistent even while a worker writes: writes (scripts
    included) are paused while it is read."""
    r = connect(url)
    r.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        return [(k, max(0, r.pttl(k)), r.dump(k)) for k in r.scan_iter(count=1000)]
    finally:
        r.execute_command("CLIENT", "UNPAUSE")


def _restore(url: str, snapshot: list[tuple[bytes, int, bytes]]) -> None:
    """Put the database back to the snapshot in one MULTI/EXEC: a running worker never sees
    a half-restored state."""
    pipe = connect(url).pipeline(transaction=True)
    pipe.flushdb()
    for key, ttl, blob in snapshot:
        pipe.restore(key, ttl, blob, replace=True)
    pipe.execute()


def test_redis_losing_its_last_writes_after_kafka_committed_is_replayed(live: dict[str, str]) -> None:
    """Redis (AOF everysec, or a failover to a lagging replica) can lose writes that Kafka's
    committed offsets already cover. Simulated by restoring an earlier snapshot of the Redis
    database after the whole stream ran: the next start rewinds each partition to the position
    Redis holds and re-applies what was lost, and the end state equals `metering rate`'s."""
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    produce_traffic(settings, count=20_000, seed=21, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(20_000, 21, 0.05, 0.01, now)
    url = live["METERING_REDIS_URL"]
    assert _run(live, METERING_CRASH_POINT="after_commit", METERING_CRASH_AFTER="3") == -9
    earlier = _snapshot(url)
    assert _run(live) == 0
    _check_equal(live, rater, rows)
    _restore(url, earlier)  # Redis "loses" everything after the first three batches
    store = RedisWalletStore(connect(url))
    offline_bal = {a: rater.store.wallet(a).balance for a in rater.accounts}  # type: ignore[attr-defined]
    assert store.balances(rater.accounts) != offline_bal  # the loss is real
    rc, err = _run_logged(live)
    assert rc == 0
    assert "wallet store is behind Kafka" in err
    _check_equal(live, rater, rows)


@BROKERS
def test_split_workers_rating_debit_sink_match_offline(live: dict[str, str]) -> None:
    """`metering worker rating|debit|sink` as separate processes (the scale-out mode) give the
    same rows, balances and rejects as `metering rate`. Each logs JSON `progress` lines while
    it works and a `worker stopped` line with what it did (before: only `worker started`)."""
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    produce_traffic(settings, count=20_000, seed=31, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(20_000, 31, 0.05, 0.01, now)
    stopped = {}
    for stage in ("rating", "debit", "sink"):
        proc = subprocess.run([sys.executable, "-m", "metering.cli", "worker", stage, "--until-idle", "3"],
                              env={**live, "METERING_PROGRESS_S": "0.1"}, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"worker {stage}: {proc.stderr[-3000:]}"
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
        assert any(line["msg"] == "progress" and line["stage"] == stage for line in lines), (stage, lines)
        stopped[stage] = lines[-1]
        assert stopped[stage]["msg"] == "worker stopped" and stopped[stage]["stage"] == stage, lines[-1]
    rejected = sum(1 for r in rows if r[2] == "rejected")
    assert stopped["rating"]["consumed"] == 20_000 and stopped["rating"]["rejected"] == rejected
    assert stopped["debit"]["consumed"] == stopped["rating"]["priced"] == 20_000 - rejected
    assert stopped["debit"]["rated"] == sum(1 for r in rows if r[2] == "rated")
    assert stopped["debit"]["duplicates"] == sum(1 for r in rows if r[2] == "duplicate")
    assert stopped["sink"]["rated_rows"] == stopped["debit"]["consumed"]
    assert stopped["sink"]["rejected_rows"] == rejected
    _check_equal(live, rater, rows)


def _committed_all(settings: Settings, group: str, topics: list[str]) -> tuple[int, int]:
    """(committed, log end) of a consumer group, summed over the partitions of `topics`."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.group_prefix}-{group}",
                  "enable.auto.commit": False})
    try:
        committed = end = 0
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in c.list_topics(topic, timeout=10).topics[topic].partitions]
            committed += sum(max(0, tp.offset) for tp in c.committed(tps, timeout=10))
            end += sum(c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
    finally:
        c.close()
    return committed, end


def test_split_debit_workers_scaled_out_a_joining_and_a_killed_owner_charge_once(live: dict[str, str],
                                                                               tmp_path: Path) -> None:
    """Split mode scaled out under a paced stream: `worker rating` and `worker sink` run while
    `worker debit` A settles; debit B joins mid-stream (a rebalance under traffic), takes half
    the partitions, and is killed -9 on its 6th batch after the Redis apply and the outputs,
    before the offset commit; A takes B's partitions back and replays that batch. Before: a
    synchronous commit refused during the rebalance (`Specified group generation id is not
    valid`) ended the worker with exit 1. Now no worker exits on a rebalance, every group
    commits all it read (lag 0), and rows, balances, movement chains and rejects equal
    `metering rate` (nothing charged twice, nothing lost)."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "250"}
    settings = Settings.from_env(env)
    t = settings.topics
    # ~8 s once the workers are up, fast enough that A commits batch after batch while B
    # joins (the race); B's 6th batch comes after it joined (its count starts with its
    # partitions), before the stream ends
    producer = threading.Thread(target=produce_traffic, args=(settings,), kwargs={
        "count": 16_000, "per_second": 2_000, "seed": 53, "duplicate_rate": 0.05, "malformed_rate": 0.01,
        "start": now.replace(hour=0)})
    rater, rows = _offline(16_000, 53, 0.05, 0.01, now)
    logs = {name: (tmp_path / f"{name}.log").open("w+") for name in ("rating", "sink", "a", "b")}

    def worker(stage: str, name: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "metering.cli", "worker", stage], env={**env, **extra},
                                cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT, text=True)

    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["rating"] = worker("rating", "rating")
        procs["sink"] = worker("sink", "sink")
        procs["a"] = worker("debit", "a")
        deadline = time.monotonic() + 60
        while '"partitions assigned"' not in (tmp_path / "a.log").read_text():
            assert time.monotonic() < deadline and procs["a"].poll() is None, "worker debit A did not start"
            time.sleep(0.2)
        producer.start()
        while _committed_all(settings, "debit", [t.priced])[0] < 500:
            assert time.monotonic() < deadline, "worker debit A committed nothing"
            time.sleep(0.3)
        procs["b"] = worker("debit", "b", METERING_CRASH_POINT="debit_before_commit", METERING_CRASH_AFTER="6")
        assert procs["b"].wait(timeout=90) == -9, "B was not killed at its crash point"
        producer.join()
        groups = {"rating": [t.events], "debit": [t.priced], "sink": [t.rated, t.rejected, t.wallet_events]}
        deadline = time.monotonic() + 120
        while not all(c == e for c, e in (_committed_all(settings, g, ts) for g, ts in groups.items())):
            exited = [n for n in ("rating", "sink", "a") if procs[n].poll() is not None]
            assert not exited, [(n, procs[n].returncode, (tmp_path / f"{n}.log").read_text()[-1500:]) for n in exited]
            assert time.monotonic() < deadline, "lag did not reach 0"
            time.sleep(0.5)
        for name in ("rating", "sink", "a"):
            procs[name].send_signal(signal.SIGTERM)
        codes = {name: procs[name].wait(timeout=40) for name in ("rating", "sink", "a")}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        producer.join()
    text = {}
    for name, f in logs.items():
        f.seek(0)
        text[name] = f.read()
        f.close()
    assert codes == {"rating": 0, "sink": 0, "a": 0}, {n: text[n][-2000:] for n in codes}
    # the scenario happened: A gave B partitions under traffic, B died owning them, and A's
    # log shows it taking them back (a line the repeat filter used to hold back)
    assert '"partitions revoked"' in text["a"] and '"partitions assigned"' in text["b"], text["a"][-2000:]
    assert text["a"].count('"msg":"partitions assigned"') == 2, text["a"][-2000:]
    _check_equal(env, rater, rows)


def test_redis_outage_mid_stream_is_retried_not_rejected(live: dict[str, str]) -> None:
    """Redis stopped for a few seconds while the pipeline runs: batches wait and retry with
    backoff (logged), nothing is rejected for it, and the end state equals `metering rate`."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "250"}
    settings = Settings.from_env(env)
    producer = _paced(settings, 41, now)
    rater, rows = _offline(20_000, 41, 0.05, 0.01, now)
    script = str(ROOT / "deploy/local/services.sh")
    with _running(env) as proc:
        time.sleep(6)  # started and settling batches
        assert proc.poll() is None, "the pipeline finished before the outage"
        subprocess.run(["bash", script, "stop", "redis"], check=True, capture_output=True)
        time.sleep(4)
        subprocess.run(["bash", script, "start", "redis"], check=True, capture_output=True)
        producer.join()
        err = _finished(proc)
    assert "failed, retrying" in err  # the outage was seen and waited out
    _check_equal(env, rater, rows)


def _private_redis(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    """A Redis of this test's own (AOF, fsync always), so it can be killed under a worker."""
    data = tmp_path / "redis-own"
    data.mkdir(exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if connect(f"redis://127.0.0.1:{port}/0").ping():
                return proc
        except OSError:
            pass
        except Exception:  # noqa: BLE001 - redis.ConnectionError until it listens
            assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)


def _metric_sum(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_sigterm_while_redis_is_down_stops_at_once_and_lag_keeps_counting(live: dict[str, str], tmp_path: Path) -> None:
    """Redis killed under a running pipeline: while it is away the lag gauge follows the
    traffic that piles up (it stood still before: lag was read only between batches), and
    SIGTERM ends the worker within seconds (before: only once Redis came back). The batch
    in hand was not committed; a run after Redis is back ends exactly like `metering rate`."""
    redis_port, metrics_port = free_port(), free_port()
    own = _private_redis(tmp_path, redis_port)
    try:
        env = {**live, "METERING_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "METERING_BATCH_SIZE": "250",
               "METERING_METRICS_PORT": str(metrics_port)}
        subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "import", str(ACCOUNTS)], env=env,
                       check=True, cwd=ROOT, capture_output=True)
        now = datetime.now(UTC).replace(microsecond=0)
        settings = Settings.from_env(env)
        producer = _paced(settings, 43, now)
        rater, rows = _offline(20_000, 43, 0.05, 0.01, now)
        proc = subprocess.Popen([sys.executable, "-m", "metering.cli", "run"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_committed(settings, 1500)
            own.kill()
            own.wait()
            deadline = time.monotonic() + 30
            while _metric_sum(metrics_port, "metering_redis_errors_total") < 1:
                assert time.monotonic() < deadline and proc.poll() is None, "the outage was not seen"
                time.sleep(0.2)
            lag = 0.0
            while lag < 3000:  # 2 s of traffic behind: counted while the loop waits for Redis
                assert time.monotonic() < deadline, f"the lag gauge stood at {lag} during the outage"
                time.sleep(0.5)
                lag = _metric_sum(metrics_port, "metering_consumer_lag")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-3000:]
        assert "stopping with a batch not settled" in err
        own = _private_redis(tmp_path, redis_port)  # the same AOF: every acknowledged write is back
        producer.join()
        assert _run(env, METERING_METRICS_PORT="0") == 0
        _check_equal(env, rater, rows)
    finally:
        own.kill()
        own.wait()


def test_a_second_worker_joining_under_traffic_takes_over_and_nothing_stalls(live: dict[str, str],
                                                                             tmp_path: Path) -> None:
    """A second `metering run` joins the group while the first writes batches. Before: the
    first worker's revoke callback waited for its writer thread, whose synchronous offset
    commit waited for the rebalance to end — both stuck for good, the group stalled and
    SIGTERM ignored. Now every message is committed, both stop on SIGTERM, and the money in
    Redis equals `metering rate` (each worker writes its own chDB folder here)."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "250"}
    settings = Settings.from_env(env)
    producer = _paced(settings, 47, now)
    rater, _ = _offline(20_000, 47, 0.05, 0.01, now)
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "metering.cli", "run"], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        _wait_committed(settings, 2000)
        env_b = {**env, "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch-b"}
        procs.append(subprocess.Popen([sys.executable, "-m", "metering.cli", "run"], env=env_b, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        producer.join()
        total = sum(kafka_io.end_offsets(settings, settings.topics.events).values())
        _wait_committed(settings, total, timeout_s=120)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        errs = [proc.communicate(timeout=30)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], [e[-2000:] for e in errs]
    assert "partitions revoked" in errs[0] and "partitions assigned" in errs[1]
    store = RedisWalletStore(connect(env["METERING_REDIS_URL"]))
    offline = {a: rater.store.wallet(a).balance for a in rater.accounts}  # type: ignore[attr-defined]
    assert store.balances(rater.accounts) == offline


def _wait_committed(settings: Settings, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_offsets(settings) < n:
        assert time.monotonic() < deadline, f"pipeline did not commit {n} messages in {timeout_s} s"
        time.sleep(0.5)


class _Grown(NamedTuple):
    settings: Settings
    start: datetime
    rater: Rater
    rows: list[Any]  # metering rate's rows


def _two_streams(live: dict[str, str], seed: int) -> _Grown:
    """4 000 events (seed `seed`) on the 4-partition topic now, and `metering rate` of them
    followed by the 4 000 of `seed + 1` that `_grow_to_8` sends later."""
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    start = now.replace(hour=0)
    produce_traffic(settings, count=4_000, seed=seed, duplicate_rate=0.05, malformed_rate=0.01, start=start)
    rater, rows = _offline(4_000, seed, 0.05, 0.01, now, then=(4_000, seed + 1))
    return _Grown(settings, start, rater, rows)


def _grow_to_8(g: _Grown, seed: int) -> tuple[dict[int, int], float]:
    """Once the first stream is committed: usage.events 4 -> 8 partitions, then the second
    stream from a fresh producer (which sees all 8). Returns the end offsets and when the
    partitions were added (time.monotonic)."""
    topic = g.settings.topics.events
    _wait_committed(g.settings, sum(kafka_io.end_offsets(g.settings, topic).values()))
    admin = AdminClient({"bootstrap.servers": g.settings.kafka_bootstrap})
    admin.create_partitions([NewPartitions(topic, 8)])[topic].result(timeout=30)
    added = time.monotonic()
    produce_traffic(g.settings, count=4_000, seed=seed, duplicate_rate=0.05, malformed_rate=0.01, start=g.start)
    ends = kafka_io.end_offsets(g.settings, topic)
    assert len(ends) == 8 and sum(ends[p] for p in range(4, 8)) > 0, ends  # the new ones took events
    return ends, added


def test_partitions_added_to_a_drained_topic_are_picked_up_by_the_running_pipeline(live: dict[str, str]) -> None:
    """The README's way to add partitions (drained: lag 0, then `--alter --partitions`), done
    under a running `metering run`: the events a fresh producer then sends to the new
    partitions are settled within seconds, and the end state equals `metering rate` of both
    streams in order (nothing lost, nothing charged twice)."""
    g = _two_streams(live, 61)
    with _running(live, idle_s=None) as proc:
        ends, added = _grow_to_8(g, 62)
        _wait_committed(g.settings, sum(ends.values()), timeout_s=120)
        took = time.monotonic() - added
        _stopped(proc)
    print(f"events on the added partitions settled {took:.1f} s after they were added")
    _check_equal(live, g.rater, g.rows)


def test_until_idle_does_not_exit_while_added_partitions_wait_unassigned(live: dict[str, str]) -> None:
    """`run --until-idle` on a drained topic: partitions are added and a fresh producer sends
    to all 8. The running consumer learns of the new partitions only at a metadata refresh
    (every 10 s), later than its idle exit (1 s after the last record of partitions 0-3): it
    must not exit while records wait in partitions it is not assigned yet. It used to, leaving
    them unread until the next run."""
    g = _two_streams(live, 81)
    with _running(live, idle_s="1") as proc:
        ends, _ = _grow_to_8(g, 82)
        err = _finished(proc)  # exits on its own once idle
    assert _group_offsets(g.settings) == sum(ends.values()), (_group_offsets(g.settings), ends)
    _check_equal(live, g.rater, g.rows)
    waited = [json.loads(line) for line in err.splitlines() if "not assigned here" in line]
    print(f"idle exit waited {len(waited)} time(s) for unassigned partitions: "
          f"{[w.get('partitions') for w in waited]}")


def test_partitions_added_under_traffic_rate_every_event_once(live: dict[str, str]) -> None:
    """Partitions added while records still flow (not drained, against the README's advice):
    a producer started after it sends some accounts' records to the new partitions while their
    older ones may still wait in the old, so they can be settled out of order and coverage may
    differ from `metering rate`'s. Still every event is rated once, none is lost, the rejects
    are the same, and each wallet's balance is its opening minus its rows' charges, chained
    by its movements."""
    now = datetime.now(UTC).replace(microsecond=0)
    settings = Settings.from_env(live)
    topic = settings.topics.events
    paced = _paced(settings, 71, now)  # 20 k at 1 500/s on the 4 partitions (its metadata is not refreshed)
    with _running(live, idle_s=None) as proc:
        _wait_committed(settings, 2_000)
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        admin.create_partitions([NewPartitions(topic, 8)])[topic].result(timeout=30)
        produce_traffic(settings, count=8_000, seed=72, duplicate_rate=0.05, malformed_rate=0.01,
                        start=now.replace(hour=0))  # flat out, on 8 partitions
        paced.join()
        ends = kafka_io.end_offsets(settings, topic)
        assert sum(ends[p] for p in range(4, 8)) > 0, ends
        _wait_committed(settings, sum(ends.values()), timeout_s=120)
        _stopped(proc)
    rater, rows = _offline(20_000, 71, 0.05, 0.01, now, then=(8_000, 72))
    _check_equal(live, rater, rows, order_free=True)


def test_catalog_reloaded_without_restart_and_a_bad_one_refused(live: dict[str, str], tmp_path: Path) -> None:
    """The running pipeline picks up a changed catalog file (rows record the new version); a
    broken file in between is refused with a log line and the running catalog stays."""
    catalog = tmp_path / "catalog.yaml"
    original = CATALOG.read_text()
    catalog.write_text(original)
    env = {**live, "METERING_CATALOG": str(catalog), "METERING_CATALOG_CHECK_S": "0.2"}
    settings = Settings.from_env(env)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    produce_traffic(settings, count=2_000, seed=51, start=start)
    # no idle exit: on a loaded machine the first commit can land seconds after the last message,
    # and an idle exit then raced the catalog edits (seen once in CI); a SIGTERM ends the run
    with _running(env, idle_s="600") as proc:
        _wait_committed(settings, 2_000)
        catalog.write_text(original.replace('version: "2026-11-01"', 'version: "broken"') + "\nplans: 7\n")
        time.sleep(0.8)
        catalog.write_text(original.replace('version: "2026-11-01"', 'version: "2026-11-23-reloaded"'))
        time.sleep(0.8)
        produce_traffic(settings, count=2_000, seed=52, start=start)
        _wait_committed(settings, 4_000)
        proc.send_signal(signal.SIGTERM)
        err = _finished(proc)
    assert "new catalog refused" in err and "catalog reloaded" in err
    assert '"msg":"pipeline stopped","reason":"signal"' in err
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        by_version = dict(client.query(
            "SELECT catalog_version, count() FROM metering.rated_usage FINAL GROUP BY catalog_version").result_rows)
    finally:
        client.close()
    assert set(by_version) == {"2026-11-01", "2026-11-23-reloaded"}, by_version
    assert by_version["2026-11-01"] > 1_500 and by_version["2026-11-23-reloaded"] > 1_500


@BROKERS
def test_poison_and_every_reject_reason_land_on_usage_rejected_byte_for_byte(live: dict[str, str]) -> None:
    """Broker-level poison (empty, oversize, invalid UTF-8) and each SPEC reject reason go to
    usage.rejected with the original bytes, the reason and the source offset in headers; the
    valid events around them are rated and the partition keeps moving."""
    settings = Settings.from_env(live)
    at = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")

    def call(eid: str, **kw: object) -> bytes:
        ev = {"kind": "call", "event_id": eid, "account_id": "acc-000001", "direction": "outbound",
              "from": "+15550001111", "to": "+12125550100", "started_at": at, "duration_s": 65}
        ev.update(kw)
        return json.dumps(ev).encode()

    cases: list[tuple[bytes, str | None]] = [
        (call("ok-1"), None),
        (b"", "invalid_json"),
        (b'{"kind":"call","event_id":"' + b"x" * 70_000 + b'"}', "invalid_json"),  # > 64 KiB
        (b'{"kind":"call","event_id":"\xff\xfe"}', "invalid_json"),  # not UTF-8
        (b"CDR;a;b;c", "invalid_json"),
        (call("bad-dur", duration_s=-5), "invalid_field"),
        (json.dumps({"kind": "fax", "event_id": "k", "account_id": "acc-000001"}).encode(), "unknown_kind"),
        (call("who", account_id="nobody"), "unknown_account"),
        (call("nowhere", to="+9999999999"), "unknown_destination"),
        (call("later", started_at="2099-01-01T00:00:00Z"), "future_timestamp"),
        (json.dumps({"kind": "meter", "event_id": "m", "account_id": "acc-000001", "meter": "nope",
                     "quantity": 1, "at": at}).encode(), "unknown_meter"),
        (call("ok-2"), None),
    ]
    producer = kafka_io.make_producer(settings, **{"message.max.bytes": 1_000_000})
    for value, _ in cases:  # one partition (same key), so offsets follow the list
        producer.produce(settings.topics.events, value=value, key=b"acc-000001")
    kafka_io.flush(producer)
    assert _run(live) == 0

    want = [(v, r) for v, r in cases if r]
    got = _read(settings, settings.topics.rejected, lambda ms: len(ms) >= len(want))
    assert len(got) == len(want)
    got.sort(key=lambda m: int(dict(m.headers())["source.offset"]))
    offsets = [i for i, (_, r) in enumerate(cases) if r]
    first = min(int(dict(m.headers())["source.offset"]) for m in got) - offsets[0]
    for m, (value, reason), i in zip(got, want, offsets, strict=True):
        h = dict(m.headers())
        assert (m.value() or b"") == value  # byte for byte
        assert h["reason"].decode() == reason, (value[:40], h)
        assert int(h["source.offset"]) == first + i
        assert h["source.topic"].decode() == settings.topics.events
    client = clickhouse_connect.get_client(dsn=live["METERING_CLICKHOUSE_DSN"])
    try:
        rated = client.query("SELECT event_id, charge FROM metering.rated_usage FINAL ORDER BY event_id").result_rows
    finally:
        client.close()
    assert [e for e, _ in rated] == ["ok-1", "ok-2"] and all(ch >= 0 for _, ch in rated)


def test_metrics_health_then_operator_credit_unblocks_and_lands_in_clickhouse(live: dict[str, str]) -> None:
    """While `metering run` works: /healthz, /readyz and /metrics (consumed, rejects by reason,
    batch latency, lag...). Then `metering accounts credit` unblocks a wallet the traffic
    blocked, once per reference, and the next run writes the movement to ClickHouse."""
    now = datetime.now(UTC).replace(microsecond=0)
    port = free_port()
    env = {**live, "METERING_METRICS_PORT": str(port)}
    settings = Settings.from_env(env)
    produce_traffic(settings, count=20_000, seed=61, duplicate_rate=0.02, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, _ = _offline(20_000, 61, 0.02, 0.01, now)
    blocked = sorted(a for a in rater.accounts if rater.store.wallet(a).blocked)  # type: ignore[attr-defined]
    assert blocked, "the seeded traffic blocks no wallet: pick another seed"
    wanted = ("metering_consumed_total", 'metering_rejected_total{reason="invalid_json"}',
              "metering_batch_seconds_bucket", "metering_consumer_lag", "metering_redis_errors_total",
              "metering_clickhouse_errors_total", "metering_wallets_blocked_total",
              "metering_end_to_end_seconds_bucket")
    seen: dict[str, str] = {}

    def complete() -> bool:  # counters appear as batches are written: poll until all are there
        return len(seen) == 3 and all(name in seen["/metrics"] for name in wanted)

    with _running(env) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not complete():
            for path in ("/healthz", "/readyz", "/metrics"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                        seen[path] = resp.read().decode()
                except OSError:
                    pass
            time.sleep(0.3)
        _finished(proc)
    assert seen.get("/healthz") == '{"status":"ok"}' and seen.get("/readyz") == '{"ready":true}', seen
    for name in wanted:
        assert name in seen["/metrics"], name

    account = blocked[0]
    store = RedisWalletStore(connect(env["METERING_REDIS_URL"]))
    assert store.wallet(account)["blocked"] == "1"  # type: ignore[index]

    def credit() -> str:
        out = subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "credit", account, "1000.00",
                              "--reference", "pay-1"], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout

    balance = store.balances([account])[account]
    assert "credit 1000.000000" in credit()
    assert store.balances([account])[account] == balance + 1_000_000_000
    assert store.wallet(account)["blocked"] == "0"  # type: ignore[index]
    assert "already applied" in credit()  # same reference: once
    assert store.balances([account])[account] == balance + 1_000_000_000
    assert _run(env) == 0  # picks the movement up from wallet.movements
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        moves = client.query("SELECT type, toInt64(amount * 1000000), reference FROM metering.wallet_movements FINAL "
                             f"WHERE account_id = '{account}' AND type != 'debit' ORDER BY seq").result_rows
    finally:
        client.close()
    opening = next(Decimal(a["balance"]) for a in yaml.safe_load(ACCOUNTS.read_text())["accounts"]
                   if a["id"] == account)  # the import's movement
    assert moves == [("adjustment", int(opening * 1_000_000), "opening"), ("credit", 1_000_000_000, "pay-1")]
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:  # the credit's `unblocked` reached ClickHouse too (before: Kafka only, in run mode)
        unblocked = client.query("SELECT event_id FROM metering.wallet_events FINAL "
                                 f"WHERE account_id = '{account}' AND type = 'unblocked'").result_rows
        blocked_rows = client.query("SELECT count() FROM metering.wallet_events FINAL "
                                    f"WHERE account_id = '{account}' AND type = 'blocked'").result_rows[0][0]
    finally:
        client.close()
    assert unblocked == [(f"credit:{account}:pay-1",)]
    assert blocked_rows >= 1  # the traffic's own, written once although wallet.events is read too
    msgs = _read(settings, settings.topics.wallet_events, lambda ms: any(b'"unblocked"' in m.value() for m in ms))
    mine = [e for e in map(json.loads, (m.value() for m in msgs)) if e["account_id"] == account]
    assert "blocked" in [e["type"] for e in mine]  # by the traffic
    # unblocked by the credit; the replay may re-send it (at least once) under the same id
    assert {e["event_id"] for e in mine if e["type"] == "unblocked"} == {f"credit:{account}:pay-1"}


def test_redis_losing_writes_under_a_running_pipeline_is_noticed_and_replayed(live: dict[str, str]) -> None:
    """Redis goes back in time while `metering run` keeps running (a crash losing the AOF's
    last second, a failover to a lagging replica): simulated by atomically restoring a
    snapshot taken a few seconds earlier. Before its next batch the worker sees Redis's
    positions fell below what it wrote, seeks back, settles the lost batches again, and the
    end state equals `metering rate`."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "500"}
    settings = Settings.from_env(env)
    producer = _paced(settings, 71, now)
    rater, rows = _offline(20_000, 71, 0.05, 0.01, now)
    url = env["METERING_REDIS_URL"]
    store = RedisWalletStore(connect(url))
    with _running(env) as proc:
        time.sleep(6)
        snapshot = _snapshot(url)
        at_snapshot = sum(store.positions(settings.topics.events).values())  # >= the snapshot's
        assert at_snapshot, "no batch settled before the snapshot"
        deadline = time.monotonic() + 60
        while sum(store.positions(settings.topics.events).values()) <= at_snapshot:  # more settled since
            assert time.monotonic() < deadline and proc.poll() is None, "nothing settled after the snapshot"
            time.sleep(0.2)
        _restore(url, snapshot)
        producer.join()
        err = _finished(proc)
    assert "lost writes under a running worker" in err
    _check_equal(env, rater, rows)


def test_a_wiped_redis_stops_the_pipeline_instead_of_charging_from_nothing(live: dict[str, str]) -> None:
    """Redis loses everything under a running `metering run` (FLUSHDB: a replica promoted
    empty, a wrong backup): the next batch finds none of the positions this worker wrote, so
    the worker refuses to charge on (every wallet would start from nothing) and exits with
    code 3 and one clear line; no batch after the wipe is committed."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "500"}
    settings = Settings.from_env(env)
    producer = _paced(settings, 81, now)
    store = RedisWalletStore(connect(env["METERING_REDIS_URL"]))
    with _running(env) as proc:
        deadline = time.monotonic() + 60
        while not store.positions(settings.topics.events):
            assert time.monotonic() < deadline and proc.poll() is None, "no batch settled"
            time.sleep(0.2)
        connect(env["METERING_REDIS_URL"]).flushdb()
        _, err = proc.communicate(timeout=120)
        committed_at_exit = _group_offsets(settings)
        producer.join()
    assert proc.returncode == 3, err[-3000:]
    assert "it was wiped; restore it before restarting" in err.splitlines()[-1]
    assert store.positions(settings.topics.events) == {}  # nothing charged on the empty store
    assert store.client.dbsize() == 0  # not a single write on top of the empty store
    assert 0 < committed_at_exit < 20_000


def test_reimport_that_lifts_a_block_emits_unblocked(live: dict[str, str], tmp_path: Path) -> None:
    """A prepaid wallet at 0 is blocked; re-imported as postpaid without a credit limit, its
    block is lifted at once (the dialer reads the flag) and `unblocked` goes to wallet.events;
    as postpaid with a limit its debt passes, it is blocked again."""
    settings = Settings.from_env(live)
    base = load_accounts_list(ACCOUNTS)[0]
    path = tmp_path / "accounts.yaml"

    def reimport(**changes: object) -> str:
        acc = {**base, "id": "reimport-1", **changes}
        path.write_text(yaml.safe_dump({"accounts": [acc]}), encoding="utf-8")
        return subprocess.run([sys.executable, "-m", "metering.cli", "accounts", "import", str(path)], env=live,
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout

    store = RedisWalletStore(connect(live["METERING_REDIS_URL"]))
    assert "1 created" in reimport(billing="prepaid", balance="0", credit_limit=None, auto_topup=None)
    assert store.wallet("reimport-1")["blocked"] == "1"  # type: ignore[index]
    assert "reimport-1 unblocked" in reimport(billing="postpaid", credit_limit=None, auto_topup=None)
    assert store.wallet("reimport-1")["blocked"] == "0"  # type: ignore[index]
    store.client.hset("w:{reimport-1}", "balance", "-2000000")  # owes 2.00
    assert "reimport-1 blocked" in reimport(billing="postpaid", credit_limit="1.00", auto_topup=None)
    assert store.wallet("reimport-1")["blocked"] == "1"  # type: ignore[index]
    msgs = _read(settings, settings.topics.wallet_events, lambda ms: len(ms) >= 2)
    events = [json.loads(m.value()) for m in msgs]
    assert [(e["type"], e["account_id"], e["balance"]) for e in events] == [
        ("unblocked", "reimport-1", "0.000000"), ("blocked", "reimport-1", "-2.000000")]


def test_monthly_fees_charged_once_per_period_and_counted_as_recurring(live: dict[str, str]) -> None:
    """`metering fees charge --on DAY` debits each account its plan's monthly_fee for its own
    billing period, once (a second run changes nothing); the movements reach ClickHouse and
    `v_usage_by_category` shows them as *recurring* in that period."""
    store = RedisWalletStore(connect(live["METERING_REDIS_URL"]))
    accounts = store.load_accounts()
    before = store.balances(accounts)
    fees = {"starter": 19_000_000, "pro": 49_000_000, "business": 99_000_000, "developer": 0, "voice-ai": 29_000_000}

    def charge() -> str:
        return subprocess.run([sys.executable, "-m", "metering.cli", "fees", "charge", "--on", "2026-11-20"],
                              env=live, cwd=ROOT, capture_output=True, text=True, check=True).stdout

    out = charge()
    charged = sum(1 for a in accounts.values() if fees[a.plan_id])
    assert f"fees: {charged} accounts charged" in out
    after = store.balances(accounts)
    assert all(after[a] == before[a] - fees[acc.plan_id] for a, acc in accounts.items())
    assert f"fees: 0 accounts charged 0.000000 in all, {charged} already charged" in charge()
    assert store.balances(accounts) == after
    # a plan change within the period (what `accounts import` writes) charges no second fee:
    # the new plan's fee starts with the next period
    moved = next(a for a, acc in accounts.items() if acc.plan_id == "starter")
    store.client.hset(wallet_key(moved), "plan", "pro")
    try:
        assert f"fees: 0 accounts charged 0.000000 in all, {charged} already charged" in charge()
    finally:
        store.client.hset(wallet_key(moved), "plan", "starter")
    assert store.balances(accounts) == after
    assert _run(live) == 0  # the sink takes the movements from wallet.movements
    anchor28 = next(a for a, acc in accounts.items() if acc.period_anchor_day == 28 and fees[acc.plan_id])
    client = clickhouse_connect.get_client(dsn=live["METERING_CLICKHOUSE_DSN"])
    try:
        rows = client.query("SELECT account_id, toString(period_start), events, toInt64(charge * 1000000) "
                            "FROM metering.v_usage_by_category WHERE category = 'recurring'").result_rows
    finally:
        client.close()
    assert len(rows) == charged
    got = {a: (p, n, c) for a, p, n, c in rows}
    # 2026-11-20 is in the period that began on the 28th of October for an anchor-28 account
    assert got[anchor28] == ("2026-10-28", 1, fees[accounts[anchor28].plan_id])


def test_clickhouse_refusing_inserts_is_waited_out_then_nothing_is_lost(live: dict[str, str]) -> None:
    """The ClickHouse engine refuses inserts for a while with a server error that passes
    (TOO_MANY_PARTS, code 252: here by lowering the table's parts_to_throw_insert to 1, as
    when inserts outrun merges): the ordered writer backs off and retries (counted in
    metering_clickhouse_errors_total), batches wait instead of being rejected or failing the
    worker, and once inserts are accepted again the end state equals `metering rate`. In this
    process, because chDB lets one process open its folder."""
    now = datetime.now(UTC).replace(microsecond=0)
    env = {**live, "METERING_BATCH_SIZE": "1000"}
    settings = Settings.from_env(env)
    produce_traffic(settings, count=10_000, seed=61, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    rater, rows = _offline(10_000, 61, 0.05, 0.01, now)
    errors = "metering_clickhouse_errors_total"
    errors_before = REGISTRY.get_sample_value(errors) or 0.0
    sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
    parts = "ALTER TABLE metering.rated_usage MODIFY SETTING parts_to_throw_insert = {}, parts_to_delay_insert = {}"
    sink.client.command(parts.format(1, 1))  # the second insert into a partition is refused
    lifted: list[float] = []

    def lift_when_refused() -> None:
        deadline = time.monotonic() + 120
        while (REGISTRY.get_sample_value(errors) or 0.0) < errors_before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        admin = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)  # same folder, same process
        try:
            admin.command(parts.format(3000, 1000))  # the defaults
        finally:
            admin.close()
        lifted.append(REGISTRY.get_sample_value(errors) or 0.0)

    lifter = threading.Thread(target=lift_when_refused)
    lifter.start()
    try:
        progress = Pipeline(settings, sink=sink).run(max_idle_s=3)
    finally:
        lifter.join()
        sink.close()
    assert lifted and lifted[0] >= errors_before + 3  # refused (and retried) at least 3 times
    assert progress.consumed == 10_000
    _check_equal(env, rater, rows)


def test_clickhouse_server_killed_mid_stream_is_retried_then_nothing_is_lost(live: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """The `http://` DSN path: the pipeline writes to a ClickHouse HTTP endpoint (the real
    engine behind tests/chdb_http.py) that is killed with SIGKILL mid-stream, as a crashed
    server, and started again 4 s later on the same data. Inserts fail with connection errors
    meanwhile, the writer backs off and retries (logged), nothing is rejected for it,
    and the end state equals `metering rate`; the analysts' views answer over HTTP."""
    now = datetime.now(UTC).replace(microsecond=0)
    port = free_port()
    folder = tmp_path / "ch-server"
    env = {**live, "METERING_BATCH_SIZE": "250", "METERING_CLICKHOUSE_DSN": f"http://127.0.0.1:{port}"}
    settings = Settings.from_env(env)
    with serving(folder, port):
        subprocess.run([sys.executable, "-m", "metering.cli", "setup"], env=env, check=True, cwd=ROOT,
                       capture_output=True)
    producer = _paced(settings, 43, now)
    rater, rows = _offline(20_000, 43, 0.05, 0.01, now)
    with _running(env) as proc:
        with serving(folder, port):
            time.sleep(6)  # started and inserting batches
            assert proc.poll() is None, "the pipeline finished before the outage"
        time.sleep(4)  # killed: connection refused
        with serving(folder, port):
            producer.join()
            err = _finished(proc)
            assert "clickhouse insert failed, retrying" in err
            _check_equal(env, rater, rows)
            client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
            try:
                by_country = client.query("SELECT sum(calls) FROM metering.v_top_destinations").result_rows
            finally:
                client.close()
            assert by_country[0][0] == sum(1 for r in rows if r[2] == "rated" and r[3] == "call"
                                            and r[16] == "outbound" and r[7] is not None)


def test_run_until_idle_gives_up_when_kafka_is_unreachable(live: dict[str, str]) -> None:
    """`run --until-idle` with Redis up but Kafka unreachable used to wait forever (no
    partition, so no lag of 0): it ends with one line after the idle time + the grace."""
    from metering.workers.common import UNASSIGNED_GIVE_UP_S

    env = {**live, "METERING_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([*RUN, "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=UNASSIGNED_GIVE_UP_S + 90)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: kafka {env['METERING_KAFKA_BOOTSTRAP']}: no partition of "
                           f"{env['METERING_TOPIC_PREFIX']}usage.events assigned"), last
    assert "Traceback" not in proc.stderr
