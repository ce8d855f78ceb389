"""`metering run`: every stage in one process (single box), from Kafka to ClickHouse.

Per batch, in this order, so that a crash at any line is safe:

  1. consume a batch from `usage.events` (offsets not committed yet)
  2. rate + settle: one Redis lookup, one atomic Lua apply (dedupe entries written with the
     debits, each holding the row it produced, and the batch's Kafka positions: checked
     against the ones this worker wrote last, so a Redis that lost writes is noticed before
     anything is applied on top of it, and the lost batches are replayed in order)
  3. ClickHouse: rated rows, debit movements, rejected input, wallet events (ReplacingMergeTree:
     re-inserting the same rows replaces them)
  4. Kafka: rejected input to `usage.rejected`, wallet events to `wallet.events`; wait for acks
  5. commit the batch's offsets

A crash before 5 replays the batch: step 2 finds every applied event in its dedupe entry with
the same source (partition:offset) and re-emits the very same row without charging again, so
steps 3 and 4 write the same data again (replaced in ClickHouse; duplicates on Kafka topics
are keyed and carry the cause's event id for consumers to dedupe).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import clickhouse_connect.driver.exceptions as ch_errors
import msgspec
from confluent_kafka import KafkaException, Message, TopicPartition

from metering import kafka_io, metrics
from metering.config import Settings
from metering.logs import log
from metering.storage.clickhouse_sink import ClickHouseSink, PackageAllowance
from metering.workers.common import (
    LOG,
    AccountsWatcher,
    CatalogWatcher,
    Outages,
    PositionGuard,
    ProgressLog,
    Stopping,
    arm_crash_timer,
    count_rows,
    crash_point,
    debit_movements,
    decode_movement,
    decode_wallet_event,
    error_text,
    event_times,
    flush_waiting,
    give_up_unassigned,
    is_operator_event,
    produce_rejected,
    produce_wallet_events,
    rejected_rows_for_sink,
    waiting_unassigned,
    warn_missing_plans,
    with_retry,
)
from rating.catalog import Catalog
from rating.engine import BatchResult, Rater
from schemas.records import Movement, WalletEvent
from wallet_debiter.redis_store import RedisWalletStore, connect

# ClickHouse errors a server raises while overloaded, restarting or re-replicating, which pass
# if waited out: TIMEOUT_EXCEEDED 159, TOO_MANY_SIMULTANEOUS_QUERIES 202, NO_FREE_CONNECTION 203,
# SOCKET_TIMEOUT 209, NETWORK_ERROR 210, MEMORY_LIMIT_EXCEEDED 241, TABLE_IS_READ_ONLY 242
# (replicated table without Keeper), TOO_MANY_PARTS 252 (inserts outrun merges),
# TOO_FEW_LIVE_REPLICAS 285, UNKNOWN_STATUS_OF_INSERT 319, ALL_CONNECTION_TRIES_FAILED 279,
# KEEPER_EXCEPTION 999. Any other server error (a bad row, a schema mismatch) is not retried.
CH_RETRY_CODES = frozenset({159, 202, 203, 209, 210, 241, 242, 252, 279, 285, 319, 999})
_CH_CODE = re.compile(r"\bCode: (\d+)\b")


def ch_transient(exc: BaseException) -> bool:
    """Whether a ClickHouse insert error is worth waiting out: the server is unreachable or
    answers with one of CH_RETRY_CODES (same on chDB, which raises the server's errors)."""
    if isinstance(exc, ch_errors.OperationalError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ch_errors.DatabaseError):
        code = _CH_CODE.search(str(exc))
        return code is not None and int(code.group(1)) in CH_RETRY_CODES
    return False


CH_TRANSIENT = ch_transient


@dataclass
class Progress:
    consumed: int = 0
    rated: int = 0
    rejected: int = 0
    duplicates: int = 0
    charged_micros: int = 0
    blocked: int = 0
    topups: int = 0
    batches: int = 0
    lag: int = 0
    # produce-to-queryable seconds of the last batch's events (benchmarks read it in on_batch)
    last_latencies: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_message: float = field(default_factory=time.monotonic)


def package_allowances(catalog: Catalog) -> list[PackageAllowance]:
    return [
        PackageAllowance(p.package_id, None if p.allowance_s is None else p.allowance_s // 60,
                         None if p.fair_use_s is None else p.fair_use_s // 60)
        for p in catalog.packages.values()
    ]


def queryable_latencies(msgs: list) -> list[float]:  # type: ignore[type-arg]
    """Seconds from each message's Kafka timestamp to now (its rows are queryable)."""
    now_ms = time.time() * 1000
    out = [(now_ms - ts) / 1000 for kind, ts in (m.timestamp() for m in msgs) if kind]
    hist = metrics.END_TO_END_SECONDS.labels(stage="debit")
    for v in out[:: max(1, len(out) // 64)]:  # a sample keeps the histogram cheap
        hist.observe(v)
    return out


class OrderedWriter:
    """Stage 2 of each batch on one thread, strictly in batch order: ClickHouse inserts, Kafka
    outputs, offset commit. chDB and librdkafka release the GIL, so this overlaps with rating
    and settling the next batch. At most `depth` batches wait; a failure stops the pipeline
    (raised on the next submit/drain) instead of committing anything after it."""

    def __init__(self, depth: int = 1) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pipeline-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: Callable[[], None], on_wait: Callable[[], None] | None = None) -> None:
        """Queue `job`; while the queue is full (the writer waits out ClickHouse), `on_wait()`
        runs every second on the caller's thread."""
        while True:
            self._raise()
            try:
                self._jobs.put(job, timeout=1.0)
                return
            except queue.Full:
                if on_wait is not None:
                    on_wait()

    def check(self) -> None:
        """Raise the writer's failure, if any: the loop stops at once instead of when the
        next batch is submitted (with no traffic, e.g. during a Kafka outage, never)."""
        self._raise()

    def drain(self) -> None:
        """Wait until every submitted batch is written and committed."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=120)


class ReadyOffsets:
    """Next offsets of batches the writer has finished (inserted, produced, flushed), waiting
    for the consumer's own thread to commit them. The writer never calls the consumer: a
    commit from another thread (even an asynchronous one) blocks while a rebalance waits for
    the consumer's thread, which may be waiting for the writer in its revoke callback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[tuple[str, int], int] = {}  # not yet handed to commit
        self._latest: dict[tuple[str, int], int] = {}  # the highest ever: committed again at close

    def add(self, msgs: Sequence[Message]) -> None:
        nxt = kafka_io.next_offsets(msgs)
        with self._lock:
            for key, offset in nxt.items():
                if offset > self._next.get(key, -1):
                    self._next[key] = offset
                if offset > self._latest.get(key, -1):
                    self._latest[key] = offset

    def latest(self) -> list[TopicPartition]:
        """Everything finished, for the final synchronous commit (an async one may have failed)."""
        with self._lock:
            return [TopicPartition(t, p, o) for (t, p), o in self._latest.items()]

    def take(self) -> list[TopicPartition]:
        with self._lock:
            taken, self._next = self._next, {}
        return [TopicPartition(t, p, o) for (t, p), o in taken.items()]

    def drop(self, partitions: set[tuple[str, int]]) -> None:
        with self._lock:
            for key in partitions:
                self._next.pop(key, None)
                self._latest.pop(key, None)


class Pipeline:
    def __init__(self, settings: Settings, *, sink: ClickHouseSink | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.progress = Progress()
        self.progress_log = ProgressLog("debit", settings.progress_s)
        self.assigned = False  # partitions assigned (set by the loop, read by /readyz)
        self.outages = Outages()  # Redis / ClickHouse calls being waited out (not ready meanwhile)
        metrics.init_stage("debit")
        metrics.BATCH_SECONDS.labels(stage="debit-write")  # the writer thread's share of a batch
        self.watcher = CatalogWatcher(settings.catalog_path, settings.catalog_check_s)
        self.redis = connect(settings.redis_url)
        self.store = RedisWalletStore(self.redis)
        self.accounts = AccountsWatcher(self.store, stop=self.stop)
        self.rater = Rater(self.watcher.catalog, self.accounts.accounts, self.store)
        self.rater.settler.on_stale = metrics.STALE_RETRIES.inc  # a concurrent write (dialer, stale owner)
        warn_missing_plans(self.watcher.catalog, self.accounts.accounts)
        self.rater.pricer.max_bytes = settings.max_message_bytes
        self.sink = sink or ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
        self._own_sink = sink is None
        self.sink.ensure_schema()
        self.sink.replace_package_allowances(package_allowances(self.watcher.catalog),
                                             catalog_version=self.watcher.catalog.version)
        self.producer = kafka_io.make_producer(settings)
        self.delivery = kafka_io.DeliveryCheck()
        t = settings.topics
        self.writer = OrderedWriter()
        self.guard = PositionGuard(self.store, t.events, self.stop, on_wait=self._lag_while_waiting,
                                   outages=self.outages)
        self.consumer = kafka_io.make_consumer(settings, "debit", [t.events],
                                               on_assign=kafka_io.rewind_to_store(self.store.positions, "debit"),
                                               on_revoke=self._on_revoke)
        # operator credits/top-ups, and the wallet events operator commands produced
        self.movements = kafka_io.make_consumer(settings, "movements", [t.movements, t.wallet_events],
                                                on_revoke=self._on_movements_revoke)
        self._lag_state: dict[str, float] = {}
        self._movements_lag: dict[str, float] = {}  # the idle exit checks wallet.movements too
        self.ready_events = ReadyOffsets()  # written by the writer, committed by this thread
        self.ready_movements = ReadyOffsets()
        self.pending_events = kafka_io.PendingCommits("debit")  # taken from ready, not committed yet
        self.pending_movements = kafka_io.PendingCommits("movements")

    def _on_revoke(self, consumer: object, partitions: list) -> None:  # type: ignore[type-arg]
        # Let the writer finish what was settled. Its offsets are not committed from inside the
        # rebalance (librdkafka would hold the commit until the rebalance ends): the next owner
        # replays from the last commit, deduplicated by Redis and ClickHouse.
        with contextlib.suppress(Exception):
            self.writer.drain()
        self.ready_events.drop({(tp.topic, tp.partition) for tp in partitions})
        self.pending_events.drop(partitions)
        self.guard.forget([tp.partition for tp in partitions])

    def _on_movements_revoke(self, consumer: object, partitions: list) -> None:  # type: ignore[type-arg]
        with contextlib.suppress(Exception):
            self.writer.drain()
        # not committed by this member any more: a stale offset would rewind the next owner
        self.ready_movements.drop({(tp.topic, tp.partition) for tp in partitions})
        self.pending_movements.drop(partitions)

    def _commit_ready(self) -> None:
        """Commit (synchronously, on the consumer's thread) what the writer has finished; a
        refused commit (a rebalance) stays pending and is tried again next turn."""
        for consumer, ready, pending in ((self.consumer, self.ready_events, self.pending_events),
                                         (self.movements, self.ready_movements, self.pending_movements)):
            pending.add_offsets(ready.take())
            if pending:
                pending.commit(consumer)

    def readiness(self) -> dict[str, object]:
        """/readyz: partitions assigned, Redis answering, and no Redis or ClickHouse call being
        waited out (an insert refused again and again leaves Redis answering)."""
        # `assigned` is read by the loop's own thread: calling consumer.assignment() from the
        # HTTP thread can block behind the loop's consume() for a long time.
        try:
            redis_ok = bool(self.redis.ping())
        except Exception:  # noqa: BLE001 - readiness is a yes/no
            redis_ok = False
        waiting = self.outages.current()
        return {"ready": self.assigned and redis_ok and not waiting, "assigned": self.assigned,
                "redis": redis_ok, "waiting": waiting}

    # ------------------------------------------------------------------ loop

    def run(self, *, max_idle_s: float | None = None, on_batch: Callable[[Progress], None] | None = None) -> Progress:
        s = self.settings
        log(LOG, logging.INFO, "pipeline started", catalog=self.watcher.catalog.version,
            accounts=len(self.rater.accounts), kafka=s.kafka_bootstrap, redis=s.redis_url,
            clickhouse=s.clickhouse_dsn)
        reason = "signal"
        shown: list[str] = []  # partitions not assigned here that the idle exit waits for (logged)
        shown_movements: list[str] = []
        try:
            while not self.stop.is_set():
                self.writer.check()
                msgs = kafka_io.split_errors(self.consumer.consume(s.batch_size, s.batch_timeout_s), "debit")
                self.assigned = bool(self.consumer.assignment())
                if msgs:
                    if self.handle_batch(msgs) and on_batch:
                        on_batch(self.progress)
                    self.progress.last_message = time.monotonic()
                self.handle_movements()
                self.housekeeping()
                self._commit_ready()
                p = self.progress
                self.progress_log.tick(p.consumed, p.lag, rated=p.rated, rejected=p.rejected,
                                       duplicates=p.duplicates, wallets_blocked=p.blocked,
                                       topups_requested=p.topups, batches=p.batches)
                idle_s = time.monotonic() - self.progress.last_message
                if max_idle_s is not None and not msgs and idle_s > max_idle_s:
                    give_up_unassigned(self.assigned, idle_s, max_idle_s, group=f"{s.group_prefix}-debit",
                                       topic=s.topics.events, bootstrap=s.kafka_bootstrap)
                    self.writer.drain()
                    lags = kafka_io.update_lag(self.consumer, "debit", 0, self._lag_state, cached=False)
                    # operator movements too (credits, fees): read means handed to the writer,
                    # which drain() above has finished
                    moves = kafka_io.update_lag(self.movements, "movements", 0, self._movements_lag, cached=False)
                    if (lags and not any(lags.values()) and moves and not any(moves.values())
                            and not waiting_unassigned(self.consumer, [s.topics.events], "debit", shown)
                            and not waiting_unassigned(self.movements, [s.topics.movements, s.topics.wallet_events],
                                                       "movements", shown_movements)):
                        reason = "idle"  # both consumers assigned and caught up, and nothing waits elsewhere
                        break
        except Stopping as exc:  # SIGTERM while Redis or ClickHouse was away
            log(LOG, logging.WARNING, "stopping with a batch not settled; it will be replayed", detail=str(exc))
        finally:
            self.close()
        p = self.progress
        log(LOG, logging.INFO, "pipeline stopped", reason=reason, consumed=p.consumed, rated=p.rated,
            rejected=p.rejected, duplicates=p.duplicates, batches=p.batches)
        return self.progress

    def housekeeping(self) -> None:
        catalog = self.watcher.changed()
        if catalog is not None:
            self.rater.set_catalog(catalog)
            def replace_allowances() -> None:
                self.sink.replace_package_allowances(package_allowances(catalog),
                                                     catalog_version=catalog.version)

            self.writer.submit(replace_allowances)
        accounts = self.accounts.changed()
        if accounts is not None:
            self.rater.set_accounts(accounts)
        if catalog is not None or accounts is not None:
            warn_missing_plans(self.rater.catalog, self.rater.accounts)
        lags = kafka_io.update_lag(self.consumer, "debit", 2.0, self._lag_state)
        if lags:
            self.progress.lag = sum(lags.values())

    def _lag_while_waiting(self) -> None:
        """The loop is stuck waiting for Redis or ClickHouse: keep the lag gauge current (the
        high watermarks from the broker, since nothing is fetched meanwhile)."""
        lags = kafka_io.update_lag(self.consumer, "debit", 2.0, self._lag_state, cached=False,
                                   from_committed=True)
        if lags:
            self.progress.lag = sum(lags.values())

    def handle_batch(self, msgs: list) -> bool:  # type: ignore[type-arg]
        """Rate and settle one batch (its Kafka positions checked and written with it, see
        PositionGuard.settle), then hand its writes and commit to the ordered writer. False:
        Redis had lost writes, the consumer was sought back and this batch comes again."""
        started = time.perf_counter()
        arm_crash_timer()
        items = [(m.value() or b"", f"{m.partition()}:{m.offset()}") for m in msgs]
        now = datetime.now(UTC)
        result = self.guard.settle(self.consumer, msgs, lambda: self.rater.rate_batch(items, now), "debit",
                                   before_replay=self.writer.drain)  # the batches before first
        if result is None:
            return False
        crash_point("after_redis")
        self._write(msgs, result, started)
        return True

    def _write(self, msgs: list, result: BatchResult, started: float) -> None:  # type: ignore[type-arg]
        s = self.settings
        rows, events = result.rows, result.wallet_events
        ats = event_times(rows, events)
        movements = debit_movements(rows, result.seqs)
        rejected = rejected_rows_for_sink(rows, msgs)

        def write_clickhouse() -> None:
            self.sink.insert_rated_rows(rows, topic=s.topics.events)
            crash_point("mid_insert")
            self.sink.insert_movements(movements)
            crash_point("after_movements")
            self.sink.insert_rejected(rejected)
            self.sink.insert_wallet_events(events, at=ats)

        def write_and_commit() -> None:  # on the writer thread, in batch order
            write_started = time.perf_counter()
            with_retry(write_clickhouse, "clickhouse insert", CH_TRANSIENT, metrics.CLICKHOUSE_ERRORS,
                       stop=self.stop, outages=self.outages)
            self.progress.last_latencies = queryable_latencies(msgs)
            crash_point("after_clickhouse")
            produce_rejected(self.producer, s.topics.rejected, rows, msgs, self.delivery)
            produce_wallet_events(self.producer, s.topics.wallet_events, events, ats, self.delivery)
            crash_point("before_flush")
            flush_waiting(self.producer, "debit-flush", stop=self.stop)  # a broker away is waited out
            self.delivery.raise_if_failed()
            crash_point("before_commit")
            self.ready_events.add(msgs)  # committed by the loop's thread (see ReadyOffsets)
            crash_point("after_commit")
            metrics.BATCH_SECONDS.labels(stage="debit-write").observe(time.perf_counter() - write_started)

        self.writer.submit(write_and_commit, on_wait=self._lag_while_waiting)
        counts = count_rows(rows)
        p = self.progress
        p.batches += 1
        p.consumed += len(msgs)
        p.rated += counts["rated"]
        p.rejected += counts["rejected"]
        p.duplicates += counts["duplicate"]
        p.charged_micros += counts["charged"]
        types = Counter(e.type for e in events)
        p.blocked += types["blocked"]
        p.topups += types["topup_requested"]
        metrics.CONSUMED.labels(stage="debit").inc(len(msgs))
        metrics.BATCH_SIZE.labels(stage="debit").observe(len(msgs))
        metrics.BATCH_SECONDS.labels(stage="debit").observe(time.perf_counter() - started)

    def handle_movements(self) -> None:
        """Operator credits, top-ups and fees (`metering accounts credit`, `fees charge`) and the
        wallet events those and `accounts import` produced, into ClickHouse. The pipeline's own
        wallet events were written with their batch and are skipped here."""
        msgs = kafka_io.split_errors(self.movements.consume(1000, 0), "movements")
        if not msgs:
            return
        moves: list[Movement] = []
        events: list[WalletEvent] = []
        ats: list[datetime] = []
        for m in msgs:
            try:
                if m.topic() == self.settings.topics.movements:
                    moves.append(decode_movement(m.value() or b""))
                elif is_operator_event(m):
                    event, at = decode_wallet_event(m.value() or b"")
                    events.append(event)
                    ats.append(at)
            except (msgspec.DecodeError, ValueError) as exc:
                log(LOG, logging.ERROR, "bad operator message skipped", topic=m.topic(), partition=m.partition(),
                    offset=m.offset(), error=str(exc))

        def write_all() -> None:
            self.sink.insert_movements(moves)
            self.sink.insert_wallet_events(events, at=ats)

        def write() -> None:
            with_retry(write_all, "clickhouse insert", CH_TRANSIENT, metrics.CLICKHOUSE_ERRORS, stop=self.stop,
                       outages=self.outages)
            self.ready_movements.add(msgs)

        self.writer.submit(write, on_wait=self._lag_while_waiting)

    def close(self) -> None:
        error: BaseException | None = None
        try:
            self.writer.drain()  # every settled batch written and committed before leaving
        except Stopping as exc:
            log(LOG, logging.WARNING, "stopped with batches not written; they will be replayed",
                detail=str(exc))
        except BaseException as exc:  # noqa: BLE001 - re-raised once everything is closed
            error = exc
            log(LOG, logging.ERROR, "writer failed; uncommitted batches will be replayed", error=error_text(exc))
        self.writer.close()
        for consumer, ready in ((self.consumer, self.ready_events), (self.movements, self.ready_movements)):
            with contextlib.suppress(KafkaException, RuntimeError):  # last batches, synchronously
                owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
                final = [tp for tp in ready.latest() if (tp.topic, tp.partition) in owned]
                if final:
                    consumer.commit(offsets=final, asynchronous=False)
        for closer in (self.consumer.close, self.movements.close):
            with contextlib.suppress(KafkaException, RuntimeError):
                closer()
        self.producer.flush(10)
        if self._own_sink:
            self.sink.close()
        if error is not None:
            raise error
