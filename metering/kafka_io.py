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
# Rebalances and store rewinds: every line counts (which partitions moved where, which were
# replayed from Redis's position), and there are only as many as partitions change owner. A
# child logger, since the filter above holds back lines that differ only in numbers: under
# it, a takeover within 30 s of the first assignment, and every partition's rewind but the
# first, were never logged.
REBALANCE_LOG = logging.getLogger("metering.kafka.rebalance")


class PartitionCountMismatch(ValueError):
    """`setup` asked for a partition count that existing topics do not have."""

    def __init__(self, wanted: int, other: dict[str, int]) -> None:
        self.wanted = wanted
        self.other = other
        listed = ", ".join(f"{name} has {n}" for name, n in sorted(other.items()))
        super().__init__(
            f"{wanted} partitions asked for (METERING_PARTITIONS / --partitions) but existing topics have "
            f"another count: {listed}; nothing changed. Kafka cannot remove partitions, and adding some "
            "moves accounts to other partitions: see README, Operations, Kafka partitions")


def _list_topics(admin: AdminClient, timeout_s: float) -> dict[str, Any]:
    """The broker's topics, asked in 1 s slices until `timeout_s`: one long call blocks in
    librdkafka, where Ctrl-C is not seen (it took ~27 s to stop `setup` with Kafka down)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return dict(admin.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic()))).topics)
        except KafkaException:
            if time.monotonic() >= deadline:
                raise


def ensure_topics(settings: Settings, timeout_s: float = 30.0, *, strict: bool = False) -> tuple[list[str], dict[str, int]]:
    """Create the pipeline topics if missing; returns the names created and the partition
    count of every pipeline topic. Existing topics are never changed: with `strict` (a count
    asked for explicitly) one with another count than `settings.partitions` raises
    PartitionCountMismatch before anything is created."""
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap, "enable.metrics.push": False,
                            "logger": LOG}
    admin = AdminClient(conf)
    t = settings.topics
    wanted = [t.events, t.rejected, t.wallet_events, t.priced, t.rated, t.movements]
    metadata = _list_topics(admin, timeout_s)
    counts = {name: len(metadata[name].partitions) for name in wanted if name in metadata}
    other = {name: n for name, n in counts.items() if n != settings.partitions}
    if strict and other:
        raise PartitionCountMismatch(settings.partitions, other)
    new = [NewTopic(name, num_partitions=settings.partitions, replication_factor=1)
           for name in wanted if name not in counts]
    created: list[str] = []
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    for name in created:
        counts[name] = settings.partitions
    return created, {name: counts[name] for name in wanted if name in counts}


def make_producer(settings: Settings, **extra: Any) -> Producer:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,  # no duplicates from producer retries
        "acks": "all",
        # Records wait up to 50 ms to be sent in bigger batches: fewer, larger produce requests
        # (and fetches downstream). Measured with bench_pipeline.py --phase 2 at 20 k events/s:
        # broker 9.5 -> 4.6 us and the producing process 15.0 -> 11.8 us of CPU per event.
        # Nothing waits for it where latency counts: the workers flush each batch, and a flush
        # sends at once whatever linger.ms says.
        "linger.ms": 50,
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
        # Partitions added to a topic are found on the next metadata refresh (librdkafka's
        # default: every 5 min, and their records waited that long); one small request per 10 s
        "topic.metadata.refresh.interval.ms": 10000,
        # One fetch per 50 ms unless 256 KiB are ready (a backlog: at once). With fetch.min.bytes
        # 1 the broker answered each partition's fetch as soon as a few records arrived: at 20 k
        # events/s that was 15 us of broker CPU per event (bench_pipeline.py's CPU budget), ~10
        # with this. Costs at most 50 ms of latency per hop, and caps a broker query's wait
        # behind the pending fetch (update_lag) at 50 ms instead of librdkafka's 500.
        "fetch.min.bytes": 262144,
        "fetch.wait.max.ms": 50,
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
            log(REBALANCE_LOG, logging.INFO, f"partitions {what}", group=group,
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


def flush(producer: Producer, timeout_s: float = 60.0, *, delivery: DeliveryCheck | None = None) -> None:
    """Wait for every queued message; raise if the broker did not take them all, or (with the
    `delivery` check the producer reports to, `make_producer(..., on_delivery=check)`) if it
    refused one: a refused message (unknown topic, too large...) also leaves the queue, so the
    count alone says nothing of it."""
    remaining = producer.flush(timeout_s)
    if remaining:
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} messages not delivered"))
    if delivery is not None:
        delivery.raise_if_failed()


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


class PendingCommits:
    """Offsets of fully handled batches, committed synchronously from the consumer's own thread
    (from another one, a commit blocks while a rebalance waits for the consumer's thread to
    return from its callback).

    A commit fails while the group rebalances (a worker joining, leaving or killed; seen:
    ILLEGAL_GENERATION, and Kafka may also answer REBALANCE_IN_PROGRESS or UNKNOWN_MEMBER_ID
    then) or while the coordinator moves.
    The batch's effects are durable by then, so that is no reason to stop: the offsets stay
    pending and go with the next commit (the next batch, the next idle turn, or close), and the
    ones of partitions given away are dropped (their next owner replays from the last commit,
    deduplicated). Before 2026-11-24 the split workers raised here and exited 1 when a second
    worker joined under traffic, and `metering run` committed asynchronously: a refused commit
    was only logged, so a partition that then went quiet kept its old committed offset (a
    restart replayed it) until its next batch."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._next: dict[tuple[str, int], int] = {}

    def __bool__(self) -> bool:
        return bool(self._next)

    def add(self, msgs: Iterable[Message]) -> None:
        for key, offset in next_offsets(msgs).items():
            if offset > self._next.get(key, -1):
                self._next[key] = offset

    def add_offsets(self, offsets: Iterable[TopicPartition]) -> None:
        """Next offsets already worked out (`metering run`'s writer hands them over)."""
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if tp.offset > self._next.get(key, -1):
                self._next[key] = tp.offset

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)

    def commit(self, consumer: Consumer) -> bool:
        """Commit everything pending; False (logged, counted): some stays pending."""
        if not self._next:
            return True
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._next.items()]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            self._failed(offsets, err.str() if isinstance(err, KafkaError) else str(exc))
            return False
        failed = [tp for tp in result if tp.error is not None]
        bad = {(tp.topic, tp.partition) for tp in failed}
        for tp in offsets:
            if (tp.topic, tp.partition) not in bad:
                del self._next[(tp.topic, tp.partition)]
        if failed:
            self._failed(failed, str(failed[0].error))
            return False
        return True

    def _failed(self, offsets: list[TopicPartition], error: str) -> None:
        metrics.KAFKA_ERRORS.labels(where=f"{self.group}-commit").inc()
        log(LOG, logging.WARNING, "offset commit failed; kept for the next commit (a partition given away "
            "meanwhile is replayed by its next owner, deduplicated)", group=self.group, error=error,
            partitions=[f"{tp.topic}:{tp.partition}@{tp.offset}" for tp in offsets])


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
                    log(REBALANCE_LOG, logging.WARNING, "wallet store is behind Kafka: replaying from its position",
                        stage=stage, topic=tp.topic, partition=tp.partition, committed=c.offset,
                        store_position=pos, events=c.offset - pos)
        except Exception as exc:  # noqa: BLE001 - never lose the assignment over this check
            log(REBALANCE_LOG, logging.ERROR, "position check on assign failed", stage=stage, error=repr(exc))
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


def unassigned_backlog(consumer: Consumer, topics: Sequence[str], timeout_s: float = 5.0) -> dict[str, int]:
    """Records waiting in partitions of `topics` that `consumer` is not assigned, counted from
    its group's committed offsets (from the start where none is committed): partitions added to
    a topic since the last metadata refresh (assigned only after the next one), or owned by
    another member that has not read them yet. Asks the broker for fresh metadata, which also
    lets librdkafka see added partitions now. {"topic:partition": records} of those with any."""
    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    others: list[TopicPartition] = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            continue
        others += [TopicPartition(topic, p) for p in sorted(meta.partitions) if (topic, p) not in assigned]
    if not others:
        return {}
    waiting: dict[str, int] = {}
    for tp in consumer.committed(others, timeout=timeout_s):
        lo, hi = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout_s,
                                                cached=False)
        start = tp.offset if tp.offset >= 0 else lo
        if hi > start:
            waiting[f"{tp.topic}:{tp.partition}"] = hi - start
    return waiting


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


__all__ = ["OFFSET_END", "DeliveryCheck", "PendingCommits", "end_offsets", "ensure_topics",
           "flush", "produce", "make_consumer", "make_producer", "split_errors", "update_lag"]
