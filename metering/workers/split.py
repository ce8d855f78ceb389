"""`metering worker rating|debit|sink`: the pipeline's stages as separate processes.

  usage.events --rating--> usage.priced --debit--> usage.rated ------\\
        \\--> usage.rejected          \\--> wallet.events -----------+--sink--> ClickHouse
                                                 wallet.movements --/

Each stage scales out through its Kafka consumer group (one partition has one owner at a
time). Rows keep the source (partition:offset) of the original CDR all the way, which is what
makes a replay re-emit identical rows instead of charging again. Every stage commits its
input offsets only after its outputs are acknowledged, so a crash anywhere replays, and the
replay is absorbed by the Redis dedupe entries (debit) and ReplacingMergeTree (sink).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import cast

import msgspec
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from metering import kafka_io, metrics
from metering.config import Settings
from metering.logs import log
from metering.storage.clickhouse_sink import ClickHouseSink
from metering.workers.common import (
    LOG,
    AccountsWatcher,
    CatalogWatcher,
    Outages,
    PositionGuard,
    ProgressLog,
    Stopping,
    count_rows,
    crash_point,
    debit_movements,
    decode_movement,
    decode_wallet_event,
    event_times,
    flush_waiting,
    give_up_unassigned,
    produce_rejected,
    produce_wallet_events,
    waiting_unassigned,
    warn_missing_plans,
    with_retry,
)
from metering.workers.pipeline import CH_TRANSIENT, package_allowances
from rating.engine import Pricer, Row, Settler
from schemas.wire import decode_priced, decode_rated, encode_priced, encode_rated
from wallet_debiter.redis_store import RedisWalletStore, connect


class _Worker:
    stage = "worker"

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.assigned = False  # partitions assigned (set by the loop, read by /readyz)
        self.outages = Outages()  # Redis / ClickHouse calls being waited out (not ready meanwhile)
        self._lag_state: dict[str, float] = {}
        self.handled = 0
        self.lag = 0  # messages behind, all assigned partitions (the last lag check)
        self.counts: dict[str, int] = {}  # what the stage did, for the progress and stop lines
        self.progress_log = ProgressLog(self.stage, settings.progress_s)
        metrics.init_stage(self.stage)
        self.pending = kafka_io.PendingCommits(self.stage)  # handled, not yet committed

    def _subscribe(self, topics: Sequence[str],
                   on_assign: Callable[[Consumer, list[TopicPartition]], None] | None = None,
                   on_revoke: Callable[[Consumer, list[TopicPartition]], None] | None = None) -> None:
        """The Kafka clients, once the subclass has what its rebalance callbacks use."""

        def revoked(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            self.pending.drop(partitions)  # their next owner replays from the last commit
            if on_revoke is not None:
                on_revoke(consumer, partitions)

        self.topics = list(topics)
        self.topics_read = ", ".join(topics)
        self.consumer = kafka_io.make_consumer(self.settings, self.stage, list(topics), on_assign=on_assign,
                                               on_revoke=revoked)
        self.producer = kafka_io.make_producer(self.settings)
        self.delivery = kafka_io.DeliveryCheck()

    def readiness(self) -> dict[str, object]:
        """/readyz: partitions assigned (set by the loop's thread, see Pipeline.readiness) and
        no Redis or ClickHouse call being waited out."""
        waiting = self.outages.current()
        return {"ready": self.assigned and not waiting, "assigned": self.assigned, "waiting": waiting}

    def handle(self, msgs: list[Message]) -> bool:
        """Handle one batch; False: the batch was dropped (the consumer was moved back), do
        not commit it."""
        raise NotImplementedError

    def _count(self, **done: int) -> None:
        for name, n in done.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def housekeeping(self) -> None:
        lags = kafka_io.update_lag(self.consumer, self.stage, 2.0, self._lag_state)
        if lags:
            self.lag = sum(lags.values())

    def lag_while_waiting(self) -> None:
        """The loop waits for Redis or ClickHouse: keep the lag gauge current meanwhile."""
        kafka_io.update_lag(self.consumer, self.stage, 2.0, self._lag_state, cached=False, from_committed=True)

    def run(self, *, max_idle_s: float | None = None) -> None:
        s = self.settings
        last = time.monotonic()
        shown: list[str] = []  # partitions not assigned here that the idle exit waits for (logged)
        log(LOG, logging.INFO, "worker started", stage=self.stage)
        try:
            while not self.stop.is_set():
                msgs = kafka_io.split_errors(self.consumer.consume(s.batch_size, s.batch_timeout_s), self.stage)
                self.assigned = bool(self.consumer.assignment())
                if msgs:
                    started = time.perf_counter()
                    if not self.handle(msgs):
                        continue
                    flush_waiting(self.producer, f"{self.stage}-flush", stop=self.stop)  # waits a broker out
                    self.delivery.raise_if_failed()
                    crash_point(f"{self.stage}_before_commit")
                    self.pending.add(msgs)
                    self.pending.commit(self.consumer)  # a failure (rebalance) is retried next turn
                    self.handled += len(msgs)
                    metrics.CONSUMED.labels(stage=self.stage).inc(len(msgs))
                    metrics.BATCH_SIZE.labels(stage=self.stage).observe(len(msgs))
                    metrics.BATCH_SECONDS.labels(stage=self.stage).observe(time.perf_counter() - started)
                    last = time.monotonic()
                elif self.pending:  # a commit refused during a rebalance: again, now it is over
                    self.pending.commit(self.consumer)
                self.housekeeping()
                self.progress_log.tick(self.handled, self.lag, **self.counts)
                idle_s = time.monotonic() - last
                if max_idle_s is not None and not msgs and idle_s > max_idle_s:
                    give_up_unassigned(self.assigned, idle_s, max_idle_s, group=f"{s.group_prefix}-{self.stage}",
                                       topic=self.topics_read, bootstrap=s.kafka_bootstrap)
                    lags = kafka_io.update_lag(self.consumer, self.stage, 0, self._lag_state, cached=False)
                    if lags and not any(lags.values()) and not waiting_unassigned(
                            self.consumer, self.topics, self.stage, shown):  # assigned, caught up, nothing waits elsewhere
                        break
        except Stopping as exc:  # SIGTERM while Redis or ClickHouse was away
            log(LOG, logging.WARNING, "stopping with a batch not handled; it will be replayed",
                stage=self.stage, detail=str(exc))
        finally:
            self.close()
        log(LOG, logging.INFO, "worker stopped", stage=self.stage, consumed=self.handled, **self.counts)

    def close(self) -> None:
        with contextlib.suppress(KafkaException, RuntimeError):
            self.pending.commit(self.consumer)  # what a refused commit left behind
            self.consumer.close()
        self.producer.flush(10)


class RatingWorker(_Worker):
    """Stateless: decode, validate, price. Rejects go out here, byte for byte."""

    stage = "rating"

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        super().__init__(settings, stop)
        self.watcher = CatalogWatcher(settings.catalog_path, settings.catalog_check_s)
        self.store = RedisWalletStore(connect(settings.redis_url))
        self.accounts = AccountsWatcher(self.store, stop=self.stop)
        self.pricer = Pricer(self.watcher.catalog, self.accounts.accounts)
        warn_missing_plans(self.watcher.catalog, self.accounts.accounts)
        self.pricer.max_bytes = settings.max_message_bytes
        self._subscribe([settings.topics.events])

    def housekeeping(self) -> None:
        super().housekeeping()
        catalog = self.watcher.changed()
        if catalog is not None:
            self.pricer.set_catalog(catalog)
        accounts = self.accounts.changed()
        if accounts is not None:
            self.pricer.set_accounts(accounts)
        if catalog is not None or accounts is not None:
            warn_missing_plans(self.pricer.catalog, self.pricer.accounts)

    def handle(self, msgs: list[Message]) -> bool:
        items = [(m.value() or b"", f"{m.partition()}:{m.offset()}") for m in msgs]
        rows = self.pricer.price(items, datetime.now(UTC))
        topic = self.settings.topics.priced
        produce = self.producer.produce
        priced = 0
        for row, m in zip(rows, msgs, strict=True):
            if row[2] == "priced":
                priced += 1
                produce(topic, value=encode_priced(row), key=m.key(), on_delivery=self.delivery)
        rejected = produce_rejected(self.producer, self.settings.topics.rejected, rows, msgs, self.delivery)
        self._count(priced=priced, rejected=rejected)
        return True


class DebitWorker(_Worker):
    """Stateful: dedupe, allowances and wallets in Redis, one owner per partition."""

    stage = "debit"

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        super().__init__(settings, stop)
        self.watcher = CatalogWatcher(settings.catalog_path, settings.catalog_check_s)
        self.redis = connect(settings.redis_url)
        self.store = RedisWalletStore(self.redis)
        self.settler = Settler(self.watcher.catalog, self.store)
        self.settler.on_stale = metrics.STALE_RETRIES.inc  # a concurrent write (dialer, stale owner)
        self.guard = PositionGuard(self.store, settings.topics.priced, self.stop, on_wait=self.lag_while_waiting,
                                   outages=self.outages)
        self._subscribe([settings.topics.priced],
                        on_assign=kafka_io.rewind_to_store(self.store.positions, "debit"),
                        on_revoke=lambda _, parts: self.guard.forget([tp.partition for tp in parts]))

    def readiness(self) -> dict[str, object]:
        try:
            redis_ok = bool(self.redis.ping())
        except Exception:  # noqa: BLE001 - readiness is a yes/no
            redis_ok = False
        state = super().readiness()
        return {**state, "ready": bool(state["ready"]) and redis_ok, "redis": redis_ok}

    def housekeeping(self) -> None:
        super().housekeeping()
        catalog = self.watcher.changed()
        if catalog is not None:
            self.settler.set_catalog(catalog)

    def handle(self, msgs: list[Message]) -> bool:
        priced = [decode_priced(m.value() or b"") for m in msgs]
        result = self.guard.settle(self.consumer, msgs, lambda: self.settler.settle(priced), self.stage)
        if result is None:  # Redis had lost writes: sought back, the lost batches come again
            return False
        crash_point("after_redis")
        rated_topic = self.settings.topics.rated
        seqs = result.seqs
        for i, (row, m) in enumerate(zip(result.rows, msgs, strict=True)):
            self.producer.produce(rated_topic, value=encode_rated(row, seqs.get(i, 0)), key=m.key(),
                                  on_delivery=self.delivery)
        produce_wallet_events(self.producer, self.settings.topics.wallet_events, result.wallet_events,
                              event_times(result.rows, result.wallet_events), self.delivery)
        counts = count_rows(result.rows)
        types = Counter(e.type for e in result.wallet_events)
        self._count(rated=counts["rated"], duplicates=counts["duplicate"], wallets_blocked=types["blocked"],
                    topups_requested=types["topup_requested"])
        return True


class SinkWorker(_Worker):
    """ClickHouse writer: rated rows, movements, rejected input and wallet events."""

    stage = "sink"

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        super().__init__(settings, stop)
        t = settings.topics
        self.sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
        self.sink.ensure_schema()
        self.watcher = CatalogWatcher(settings.catalog_path, settings.catalog_check_s)
        self.sink.replace_package_allowances(package_allowances(self.watcher.catalog),
                                             catalog_version=self.watcher.catalog.version)
        self._subscribe([t.rated, t.rejected, t.wallet_events, t.movements])

    def housekeeping(self) -> None:
        super().housekeeping()
        catalog = self.watcher.changed()
        if catalog is not None:
            self.sink.replace_package_allowances(package_allowances(catalog), catalog_version=catalog.version)

    def handle(self, msgs: list[Message]) -> bool:
        t = self.settings.topics
        rows: list[Row] = []
        rejected, events, ats, moves = [], [], [], []
        seqs: dict[int, int] = {}
        for m in msgs:
            topic, value = m.topic(), m.value() or b""
            try:
                if topic == t.rated:
                    row, seq = decode_rated(value)
                    if seq:
                        seqs[len(rows)] = seq
                    rows.append(row)
                elif topic == t.rejected:
                    headers = cast(list[tuple[str, bytes | None]], m.headers() or [])
                    h = {k: (v or b"").decode("utf-8", "replace") for k, v in headers}
                    rejected.append((value, h.get("reason", "invalid_json"), h.get("detail") or None,
                                     h.get("source.topic", t.events), int(h.get("source.partition", "0")),
                                     int(h.get("source.offset", "0")), datetime.now(UTC)))
                elif topic == t.wallet_events:
                    event, at = decode_wallet_event(value)
                    events.append(event)
                    ats.append(at)
                else:
                    moves.append(decode_movement(value))
            except (msgspec.DecodeError, ValueError) as exc:
                log(LOG, logging.ERROR, "undecodable message skipped", topic=topic, partition=m.partition(),
                    offset=m.offset(), error=str(exc))
        moves.extend(debit_movements(rows, seqs))

        def write() -> None:
            self.sink.insert_rated_rows(rows, topic=t.events)
            crash_point("mid_insert")
            self.sink.insert_movements(moves)
            self.sink.insert_rejected(rejected)
            self.sink.insert_wallet_events(events, at=ats)

        with_retry(write, "clickhouse insert", CH_TRANSIENT, metrics.CLICKHOUSE_ERRORS, stop=self.stop,
                   on_wait=self.lag_while_waiting, outages=self.outages)
        self._count(rated_rows=len(rows), movements=len(moves), rejected_rows=len(rejected), wallet_events=len(events))
        return True

    def close(self) -> None:
        super().close()
        self.sink.close()


