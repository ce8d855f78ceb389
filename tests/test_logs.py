"""Structured logs: librdkafka's repeated lines are held back, not dropped silently."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import TopicPartition

from metering.kafka_io import LOG as KAFKA_LOG
from metering.kafka_io import _logged, rewind_to_store
from metering.logs import RepeatFilter


def test_repeated_lines_pass_once_per_window_and_say_how_many_were_held_back() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=30, clock=lambda: now[0])

    def record(text: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("metering.kafka", logging.WARNING, __file__, 1, text, args, None)

    # confluent-kafka logs "%s [%s] %s" with the facility, client and message as arguments
    shown = [r for i in range(100) if f.filter(r := record(
        "%s [%s] %s", "FAIL", f"rdkafka#producer-{i % 3}", f"127.0.0.1:{19092 + i % 2}/1: Connect failed"))]
    assert len(shown) == 1
    other = record("%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", "Timed out")
    assert f.filter(other)  # another kind of line is not held back
    now[0] = 31.0
    again = record("%s [%s] %s", "FAIL", "rdkafka#producer-1", "127.0.0.1:19092/1: Connect failed")
    assert f.filter(again)
    assert again.getMessage().endswith("(and 99 more like it held back)")
    assert any(isinstance(x, RepeatFilter) for x in KAFKA_LOG.filters)  # installed on librdkafka's logger


class _Consumer:
    """What rewind_to_store asks of a consumer: committed offsets, then the assignment."""

    def __init__(self, committed: dict[int, int]) -> None:
        self._committed = committed
        self.assigned: list[TopicPartition] = []

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:  # noqa: ARG002
        return [TopicPartition(tp.topic, tp.partition, self._committed[tp.partition]) for tp in partitions]

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned += partitions


def test_every_rebalance_and_store_rewind_line_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Lines differing only in partition numbers are not one kind here: a worker taking over a
    dead one's partitions seconds after its first assignment logs it, and each partition
    replayed from Redis's position has its own warning. Before, the repeat filter of
    librdkafka's logger held back all but the first within 30 s."""
    caplog.set_level(logging.INFO)
    assigned = _logged("assigned", "debit", None)
    assigned(None, [TopicPartition("t.usage.priced", 0), TopicPartition("t.usage.priced", 1)])  # type: ignore[arg-type]
    assigned(None, [TopicPartition("t.usage.priced", 2), TopicPartition("t.usage.priced", 3)])  # type: ignore[arg-type]
    consumer = _Consumer({0: 500, 1: 700})
    rewind_to_store(lambda topic: {0: 400, 1: 650}, "debit")(
        consumer, [TopicPartition("t.usage.priced", 0), TopicPartition("t.usage.priced", 1)])  # type: ignore[arg-type]
    lines = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    moved = [f["partitions"] for m, f in lines if m == "partitions assigned"]
    assert moved == [["t.usage.priced:0", "t.usage.priced:1"], ["t.usage.priced:2", "t.usage.priced:3"]]
    rewinds = [(f["partition"], f["store_position"]) for m, f in lines if m.startswith("wallet store is behind Kafka")]
    assert rewinds == [(0, 400), (1, 650)]
    assert [(tp.partition, tp.offset) for tp in consumer.assigned] == [(0, 400), (1, 650)]
