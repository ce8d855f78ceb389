"""Kafka edges (confluent-kafka): topics, consumers that commit only what was fully handled,
producers that confirm delivery before offsets move on."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from metering import metrics
from metering.config import Settings
from metering.logs import RepeatFilter, log

LOG = logging.getLogger("metering.kafka")
LOG.addFilter(RepeatFilter())  # a broker away: one line per kind per 30 s, not one per retry


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the pipeline topics if missing; returns the names created."""
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap, "enable.metrics.push": False,
                            "logger": LOG}
    admin = AdminClient(conf)
    t = settings.topics
    wanted = [t.events, t.rejected, t.wallet_events, t.priced, t.rated, t.movements]
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [
        NewTopic(name, num_partitions=settings.partitions, replication_factor=1)
        for name in wanted
        if name not in existing
    ]
    created: list[str] = []
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    return created


def make_producer(settings: Settings, **extra: Any) -> Producer:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,  # no duplicates from producer retries
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
        "enable.metrics.push": False,  # no KIP-714 client telemetry (and no log line about it)
        "logger": LOG,  # librdkafka's lines go through the JSON logs, served by poll/flush
    }
    conf.update(extra)
    return Producer(conf)


def make_consumer(settings: Settings, group: str, topics: Sequence[str],
                  on_assign: Callable[[Consumer, list[TopicPartition]], None] | None = None,
                  on_revoke: Callable[[Consumer, list[TopicPartition]], None] | None = None,
                  **extra: Any) -> Consumer:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": f"{settings.group_prefix}-{group}",
        "enable.auto.commit": False,  # offsets move only after every effect is durable
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "max.poll.interval.ms": 300000,
        "session.timeout.ms": 10000,  # a killed owner's partitions move on within ~10 s
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 65536,
        "enable.metrics.push": False,
        "logger": LOG,  # served by consume()
        "on_commit": _commit_logger(group),
    }
    if settings.instance_id:
        conf["group.instance.id"] = f"{settings.instance_id}-{group}"
    conf.update(extra)
    consumer = Consumer(conf)
    consumer.subscribe(list(topics), on_assign=_logged("assigned", group, on_assign),
                       on_revoke=_logged("revoked", group, on_revoke),
                       on_lost=_logged("lost", group, on_revoke))
    return consumer


def _commit_logger(group: str) -> Callable[[KafkaError | None, list[TopicPartition]], None]:
    def on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:  # e.g. partitions revoked meanwhile: the next owner replays (deduped)
            metrics.KAFKA_ERRORS.labels(where=f"{group}-commit").inc()
            log(LOG, logging.WARNING, "offset commit failed", group=group, error=err.str(),
                partitions=[f"{tp.topic}:{tp.partition}@{tp.offset}" for tp in partitions])

    return on_commit


def _logged(what: str, group: str, callback: Callable[[Consumer, list[TopicPartition]], None] | None
            ) -> Callable[[Consumer, list[TopicPartition]], None]:
    """A rebalance callback that logs the partitions and, when they go, drops their lag series
    (a gauge left behind would report another owner's partition forever). Without `callback`
    the client (un)assigns by itself once this returns."""

    def on_rebalance(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log(LOG, logging.INFO, f"partitions {what}", group=group,
                partitions=[f"{tp.topic}:{tp.partition}" for tp in partitions])
        if what != "assigned":
            for tp in partitions:
                with contextlib.suppress(KeyError):
                    metrics.CONSUMER_LAG.remove(group, tp.topic, str(tp.partition))
        if callback is not None:
            callback(consumer, partitions)

    return on_rebalance


def produce(producer: Producer, topic: str, value: bytes, key: bytes | None,
            on_delivery: Callable[..., None]) -> None:
    """produce(), waiting for room when the local queue is full instead of failing."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def flush(producer: Producer, timeout_s: float = 60.0) -> None:
    """Wait for every queued message; raise if the broker did not take them all."""
    remaining = producer.flush(timeout_s)
    if remaining:
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} messages not delivered"))


class DeliveryCheck:
    """Delivery callback that remembers the first failure, checked before committing."""

    def __init__(self) -> None:
        self.error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and self.error is None:
            self.error = err

    def raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise KafkaException(err)


def next_offsets(msgs: Iterable[Message]) -> dict[tuple[str, int], int]:
    """last offset + 1 per (topic, partition) of a batch."""
    out: dict[tuple[str, int], int] = {}
    for m in msgs:
        key = (str(m.topic()), int(m.partition() or 0))
        nxt = int(m.offset() or 0) + 1
        if nxt > out.get(key, 0):
            out[key] = nxt
    return out


def commit_offsets(consumer: Consumer, msgs: Iterable[Message]) -> None:
    """Synchronously commit last+1 per partition of a fully handled batch. Only from the
    consumer's own thread: from another one, a commit (even an asynchronous one) blocks while
    a rebalance waits for the consumer's thread to return from its callback."""
    nxt = next_offsets(msgs)
    if nxt:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()], asynchronous=False)


def rewind_to_store(positions: Callable[[str], dict[int, int]], stage: str) -> Callable[[Consumer, list[TopicPartition]], None]:
    """An on_assign callback: start each partition at the lower of Kafka's committed offset and
    the position the wallet store holds. If Redis lost its last second of writes (AOF everysec,
    failover to a lagging replica) after Kafka committed, the lost batches are consumed again
    and re-applied; batches Redis still holds are deduped there and change nothing."""

    def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            committed = consumer.committed(partitions, timeout=30)
            held: dict[str, dict[int, int]] = {}
            for tp, c in zip(partitions, committed, strict=True):
                if tp.topic not in held:
                    held[tp.topic] = positions(tp.topic)
                if not held[tp.topic]:  # the store never saw this topic: nothing to compare
                    continue
                # a partition the store has no position for: it holds nothing from it
                pos = held[tp.topic].get(tp.partition, 0)
                if 0 <= pos < c.offset:
                    tp.offset = pos
                    metrics.STORE_REWINDS.labels(stage=stage).inc()
                    log(LOG, logging.WARNING, "wallet store is behind Kafka: replaying from its position",
                        stage=stage, topic=tp.topic, partition=tp.partition, committed=c.offset,
                        store_position=pos, events=c.offset - pos)
        except Exception as exc:  # noqa: BLE001 - never lose the assignment over this check
            log(LOG, logging.ERROR, "position check on assign failed", stage=stage, error=repr(exc))
        consumer.incremental_assign(partitions)

    return on_assign


def split_errors(msgs: list[Message], stage: str) -> list[Message]:
    """Drop broker error events (logged, counted); keep real messages."""
    good: list[Message] = []
    for m in msgs:
        err = m.error()
        if err is None:
            good.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            metrics.KAFKA_ERRORS.labels(where=stage).inc()
            log(LOG, logging.WARNING, "consume error", stage=stage, error=str(err))
    return good


def update_lag(consumer: Consumer, stage: str, every_s: float, state: dict[str, float], *,
               cached: bool = True, from_committed: bool = False) -> dict[int, int]:
    """Refresh the consumer-lag gauge at most every `every_s`; returns lag per partition.
    cached=True reads the high watermark from the last fetch (free); a broker query (False)
    waits behind the pending fetch (up to fetch.wait.max.ms) and is kept for the idle-exit.
    Lag counts from the read position, or with `from_committed` from the committed offset (a
    broker round trip: used while the loop waits out an outage, so the batch in hand counts)."""
    now = time.monotonic()
    if now - state.get("at", 0.0) < every_s:
        return {}
    state["at"] = now
    lags: dict[int, int] = {}
    try:
        assignment = consumer.assignment()
        if not assignment:
            return {}
        positions = consumer.committed(assignment, timeout=5) if from_committed else consumer.position(assignment)
        unknown = [tp for tp in positions if tp.offset < 0]  # nothing fetched there yet
        # keyed by topic too: a consumer of several topics (the sink's, the operator movements')
        # has a partition 3 in each
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in consumer.committed(unknown, timeout=5)} if unknown else {}
        for tp in positions:
            lo, hi = consumer.get_watermark_offsets(tp, timeout=1.0, cached=cached)
            if hi < 0 or lo < 0:  # nothing fetched yet for this partition: ask the broker
                lo, hi = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            pos = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            if pos < 0:
                pos = lo
            lag = max(0, hi - pos)
            lags[tp.partition] = lags.get(tp.partition, 0) + lag  # summed over the topics of a sink
            metrics.CONSUMER_LAG.labels(stage=stage, topic=tp.topic, partition=str(tp.partition)).set(lag)
    except KafkaException as exc:
        log(LOG, logging.WARNING, "lag check failed", stage=stage, error=str(exc))
    return lags


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Log-end offset per partition of `topic` (for progress and tests)."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "metering-probe",
                  "enable.auto.commit": False, "enable.metrics.push": False, "logger": LOG})
    try:
        md = c.list_topics(topic, timeout=10)
        out = {}
        for p in md.topics[topic].partitions:
            _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = hi
        return out
    finally:
        c.close()


__all__ = ["OFFSET_END", "DeliveryCheck", "commit_offsets", "end_offsets", "ensure_topics",
           "flush", "produce", "make_consumer", "make_producer", "split_errors", "update_lag"]
