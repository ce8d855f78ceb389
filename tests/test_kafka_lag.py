"""Consumer lag arithmetic (kafka_io.update_lag) on a stand-in consumer: pure logic, no broker."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from metering import kafka_io


class _Consumer:
    """Two topics with a partition 3 each: nothing fetched in this session (position unset), one
    committed at its end, the other never committed and empty."""

    def __init__(self) -> None:
        self.parts = [TopicPartition("wallet.events", 3), TopicPartition("wallet.movements", 3)]
        self.marks = {("wallet.events", 3): (0, 11), ("wallet.movements", 3): (0, 0)}
        self.done = {("wallet.events", 3): 11, ("wallet.movements", 3): -1001}

    def assignment(self) -> list[TopicPartition]:
        return self.parts

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, -1001) for p in parts]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.done[(p.topic, p.partition)]) for p in parts]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return self.marks[(tp.topic, tp.partition)]


def test_lag_of_a_consumer_of_two_topics_takes_each_topics_committed_offset() -> None:
    """Keyed by partition alone, the empty topic's "never committed" hid the other's offset 11:
    a lag of 11 that never went away kept `run --until-idle` from ever exiting."""
    consumer: Any = _Consumer()
    assert kafka_io.update_lag(consumer, "movements", 0, {}, cached=False) == {3: 0}
