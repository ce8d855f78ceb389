"""Offset commit bookkeeping of `metering run` and the split workers (pure logic: the consumer
is a stand-in that records commits and refuses the ones it is told to, as Kafka does while a
group rebalances). The live behaviour is covered by the worker-joining tests of
test_pipeline_live.py; this pins what happens to the offsets of a refused commit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from metering import kafka_io
from metering.workers.pipeline import Pipeline, ReadyOffsets


class RefusingConsumer:
    """Records each commit as {(topic, partition): offset}; refuses the next `refuse` ones."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.committed: list[dict[tuple[str, int], int]] = []
        self.modes: list[bool] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        self.modes.append(asynchronous)
        if self.refuse:
            self.refuse -= 1
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION))
        self.committed.append({(tp.topic, tp.partition): tp.offset for tp in offsets})
        return offsets


def _msg(topic: str, partition: int, offset: int) -> Any:
    return SimpleNamespace(topic=lambda: topic, partition=lambda: partition, offset=lambda: offset)


def _run_like(consumer: RefusingConsumer) -> Any:
    """The attributes Pipeline._commit_ready uses, movements consumer idle."""
    return SimpleNamespace(consumer=consumer, ready_events=ReadyOffsets(),
                           pending_events=kafka_io.PendingCommits("debit"),
                           movements=RefusingConsumer(), ready_movements=ReadyOffsets(),
                           pending_movements=kafka_io.PendingCommits("movements"))


def test_run_commits_a_refused_offset_again_on_the_next_turn_without_new_batches() -> None:
    consumer = RefusingConsumer(refuse=1)
    run = _run_like(consumer)
    run.ready_events.add([_msg("usage.events", 0, 41), _msg("usage.events", 1, 7)])
    Pipeline._commit_ready(run)  # refused: a rebalance under way
    assert consumer.committed == []
    Pipeline._commit_ready(run)  # the next loop turn, no batch in between (a quiet partition)
    assert consumer.committed == [{("usage.events", 0): 42, ("usage.events", 1): 8}]
    assert consumer.modes == [False, False]  # synchronous: a refusal is known at once
    Pipeline._commit_ready(run)
    assert len(consumer.committed) == 1  # nothing pending: no empty commit


def test_offsets_of_partitions_given_away_are_not_committed_later() -> None:
    consumer = RefusingConsumer(refuse=1)
    run = _run_like(consumer)
    run.ready_events.add([_msg("usage.events", 0, 41), _msg("usage.events", 1, 7)])
    Pipeline._commit_ready(run)  # refused
    run.pending_events.drop([TopicPartition("usage.events", 1)])  # what the revoke callback does
    Pipeline._commit_ready(run)
    # partition 1's next owner replays from its last commit; an old offset from here would rewind it
    assert consumer.committed == [{("usage.events", 0): 42}]


def test_pending_commits_keep_the_highest_offset_per_partition() -> None:
    pending = kafka_io.PendingCommits("debit")
    pending.add_offsets([TopicPartition("t", 0, 10), TopicPartition("t", 1, 5)])
    pending.add([_msg("t", 0, 3), _msg("t", 1, 9)])  # partition 0's older batch finished late
    pending.add_offsets([TopicPartition("t", 0, 8)])
    consumer = RefusingConsumer()
    assert pending.commit(consumer) is True
    assert consumer.committed == [{("t", 0): 10, ("t", 1): 10}]
    assert not pending
