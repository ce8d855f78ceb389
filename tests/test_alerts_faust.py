"""The faust-streaming alerts worker on the real broker: wallet events (with replays) become
exactly one customer notification per distinct alert, also across a restart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import Consumer, KafkaError

from metering import kafka_io
from metering.config import Settings
from metering.local_services import ensure_started
from metering.workers.alerts import notifications_topic
from tests.helpers import free_port, http_get

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

AT = "2026-03-01T10:00:00Z"

EVENTS: list[dict[str, Any]] = [
    {"type": "low_balance", "account_id": "acc-1", "event_id": "e1", "balance": "4.200000", "at": AT},
    {"type": "topup_requested", "account_id": "acc-1", "event_id": "e1", "balance": "4.200000", "at": AT},
    {"type": "blocked", "account_id": "acc-2", "event_id": "e7", "balance": "-0.500000", "at": AT},
    {"type": "unblocked", "account_id": "acc-2", "event_id": None, "balance": "10.000000", "at": AT},
    {"type": "usage_threshold", "account_id": "acc-3", "event_id": "e9", "balance": "20.000000",
     "at": AT, "package_id": "uk-500", "percent": 80},
    {"type": "usage_threshold", "account_id": "acc-3", "event_id": "e12", "balance": "19.000000",
     "at": AT, "package_id": "uk-500", "percent": 100},
    # same account and cause, another type: a distinct alert
    {"type": "blocked", "account_id": "acc-1", "event_id": "e1", "balance": "4.200000", "at": AT},
]


def _key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["account_id"], e["type"], e.get("event_id"), e.get("package_id"), e.get("percent"))


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    ep = ensure_started(("kafka",))
    env = {**os.environ, "METERING_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
           "METERING_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"g{uuid.uuid4().hex[:8]}", "METERING_METRICS_PORT": "0"}
    kafka_io.ensure_topics(Settings.from_env(env))
    return env


def _produce(env: dict[str, str], events: list[dict[str, Any]], raw: tuple[bytes, ...] = ()) -> None:
    settings = Settings.from_env(env)
    producer = kafka_io.make_producer(settings)  # lz4, like the pipeline's producer
    for e in events:
        producer.produce(settings.topics.wallet_events, value=msgspec.json.encode(e),
                         key=e["account_id"].encode())
    for value in raw:
        producer.produce(settings.topics.wallet_events, value=value, key=b"acc-1")
    kafka_io.flush(producer)


def _run_worker(env: dict[str, str], data_dir: Path) -> dict[str, Any]:
    proc = subprocess.run(
        # idle for 4 s: on a loaded box (CI beside other work) one partition's first fetch came
        # over 2 s after the table was ready, and the worker stopped before reading it
        [sys.executable, "-m", "metering.workers.alerts", "--until-idle", "4", "--data-dir", str(data_dir)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == "", proc.stdout  # logs go to stderr; Faust's spinner wrote terminal escapes here
    stopped = [line for line in proc.stderr.splitlines() if '"alerts worker stopped"' in line]
    assert len(stopped) == 1, proc.stderr[-4000:]
    counts: dict[str, Any] = msgspec.json.decode(stopped[0])
    counts["stderr"] = proc.stderr[-4000:]  # shown when an assertion on the counts fails
    return counts


def _notifications(env: dict[str, str]) -> list[dict[str, Any]]:
    """Every committed message of the notifications topic (read up to each partition's end)."""
    settings = Settings.from_env(env)
    topic = notifications_topic(settings)
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"check-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.partition.eof": True,
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        c.subscribe([topic])
        parts = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
        assert parts == settings.partitions
        eof: set[int] = set()
        out: list[dict[str, Any]] = []
        for _ in range(200):
            if len(eof) == parts:
                break
            m = c.poll(0.5)
            if m is None:
                continue
            err, part = m.error(), m.partition() or 0
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                eof.add(part)
                continue
            eof.discard(part)
            doc = msgspec.json.decode(m.value() or b"")
            assert m.key() == doc["account_id"].encode()
            out.append(doc)
        assert len(eof) == parts, "did not reach the end of the notifications topic"
        return out
    finally:
        c.close()


def _check(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    distinct = {_key(e): e for e in want}
    keys = [(n["account_id"], n["type"], n.get("event_id"), n.get("package_id"), n.get("percent")) for n in got]
    assert len(keys) == len(set(keys)), f"duplicate notifications: {sorted(keys, key=str)}"
    assert set(keys) == set(distinct)
    assert len({n["notification_id"] for n in got}) == len(got)
    for n in got:
        e = distinct[(n["account_id"], n["type"], n.get("event_id"), n.get("package_id"), n.get("percent"))]
        assert n["balance"] == e["balance"]
        assert n["at"].startswith("2026-03-01T10:00:00")
        assert n["text"]
    texts = {(n["account_id"], n["type"], n.get("percent")): n["text"] for n in got}
    assert texts[("acc-2", "blocked", None)] == "Outbound calls are blocked: your balance is -0.500000."
    assert texts[("acc-3", "usage_threshold", 80)] == "You have used 80% of package uk-500."
    assert texts[("acc-1", "low_balance", None)] == "Your balance is low: 4.200000."


def test_duplicates_become_one_notification_each(env: dict[str, str], tmp_path: Path) -> None:
    # every event twice (a replay), one three times, interleaved; plus poison that is skipped
    stream = EVENTS + EVENTS[::-1] + [EVENTS[2]]
    _produce(env, stream, raw=(b"{not json", b'{"type": "blocked"}'))
    counts = _run_worker(env, tmp_path / "faust")
    _check(_notifications(env), EVENTS)
    assert (counts["received"], counts["notified"], counts["duplicates"], counts["invalid"]) == (
        len(stream) + 2, len(EVENTS), len(stream) - len(EVENTS), 2)


def test_restart_recovers_the_table_and_sends_no_duplicate(env: dict[str, str], tmp_path: Path) -> None:
    _produce(env, EVENTS)
    _run_worker(env, tmp_path / "run1")
    assert len(_notifications(env)) == len(EVENTS)

    # the pipeline replays everything after a crash, plus one new alert; the new worker
    # process has no local state (fresh data dir): it must rebuild the table from its changelog
    new = {"type": "low_balance", "account_id": "acc-4", "event_id": "e20", "balance": "1.000000", "at": AT}
    _produce(env, [*EVENTS, new])
    counts = _run_worker(env, tmp_path / "run2")
    # input whose offsets run 1 had not committed is read again: the table drops that too
    assert counts["received"] >= len(EVENTS) + 1, counts
    assert counts["notified"] == 1, counts
    assert counts["duplicates"] == counts["received"] - 1, counts
    _check(_notifications(env), [*EVENTS, new])


def test_not_ready_until_the_table_is_recovered_and_metrics_count_each_outcome(
        env: dict[str, str], tmp_path: Path) -> None:
    """/readyz answers 503 until the dedupe table is recovered from its changelog (sending
    before that could repeat a notification), then 200; metering_alerts_total counts what
    became of each wallet event."""
    port = free_port()
    stream = EVENTS + EVENTS[:3]
    _produce(env, stream, raw=(b"{not json",))
    proc = subprocess.Popen(
        [sys.executable, "-m", "metering.workers.alerts", "--until-idle", "4", "--data-dir", str(tmp_path / "faust")],
        env={**env, "METERING_METRICS_PORT": str(port)}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = http_get(port, "/readyz")
            if status and (not seen or seen[-1] != status):
                seen.append(status)
            if status == 200:
                break
            time.sleep(0.05)
        assert seen == [503, 200], seen
        want = {"notified": len(EVENTS), "duplicate": 3, "invalid": 1}
        got: dict[str, float] = {}
        while time.monotonic() < deadline and got != want:
            _, text = http_get(port, "/metrics")
            got = {o: float(m.group(1)) for o in want
                   if (m := re.search(rf'^metering_alerts_total{{outcome="{o}"}} (\S+)$', text, re.M))}
            time.sleep(0.1)
        assert got == want
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-4000:]


def test_the_cli_worker_starts_in_a_state_dir_not_made_yet(env: dict[str, str], tmp_path: Path) -> None:
    """`metering worker alerts` with METERING_STATE_DIR (default: <repo>/.state) not created yet
    (a fresh clone, a container) failed at once: Faust's `mkdir` of `<state>/faust` has no
    parents (FileNotFoundError in a JSON log line, exit 1). Its last stdout line printed
    AlertStats' repr, monotonic clock values included; now the counts."""
    state = tmp_path / "new" / "state"
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "worker", "alerts", "--until-idle", "3"],
                          env={**env, "METERING_STATE_DIR": str(state)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (state / "faust").is_dir()
    assert proc.stdout.splitlines()[-1] == "alerts worker stopped: received 0, notified 0, duplicates 0, invalid 0"
