"""Pieces every worker shares: retries, reloads, crash points, and writing a batch's outputs."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
import redis
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)
from tenacity.stop import stop_base

from metering import metrics
from metering.config import Settings
from metering.kafka_io import next_offsets, unassigned_backlog
from metering.logs import log
from rating.accounts import Account
from rating.catalog import Catalog, CatalogError, load_catalog
from rating.engine import COL, Row
from rating.money import format_micros, parse_micros
from schemas.messages import MovementOut, WalletEventOut
from schemas.records import Movement, WalletEvent
from wallet_debiter.redis_store import PositionsLost, WalletApplyFailed

LOG = logging.getLogger("metering.worker")
T = TypeVar("T")

# ClusterDown/TryAgain/MasterDown: a Redis Cluster failing over (redis-py retries MOVED/ASK itself)
REDIS_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                   redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                   redis.exceptions.MasterDownError)


# What to wait out: exception types, or a test of the exception (e.g. by error code).
Transient = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class Stopping(Exception):  # noqa: N818 - a request, not a failure
    """The worker was asked to stop (SIGTERM) while it waited out a transient error: nothing
    of the batch in hand is committed, so it comes again to whoever owns the partition next."""


def error_text(exc: BaseException) -> str:
    """`Type: message` for logs (repr() of some client errors hides the message)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sleeper(stop: threading.Event | None) -> Callable[[float], None]:
    if stop is None:
        return time.sleep

    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # wakes at once on SIGTERM

    return sleep


class Outages:
    """What a worker is waiting out right now (a retried call to Redis or ClickHouse that keeps
    failing), for /readyz: not ready while anything is listed. Thread-safe: `metering run`
    settles on its main thread while its writer thread inserts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, tuple[float, int]] = {}  # what -> (failing since, attempts)

    def failed(self, what: str) -> None:
        with self._lock:
            since, attempts = self._since.get(what, (time.monotonic(), 0))
            self._since[what] = (since, attempts + 1)

    def recovered(self, what: str) -> tuple[float, int] | None:
        """Forget `what`; (seconds it failed, failed attempts) if it was failing."""
        with self._lock:
            entry = self._since.pop(what, None)
        return None if entry is None else (time.monotonic() - entry[0], entry[1])

    def current(self) -> list[str]:
        with self._lock:
            return sorted(self._since)


def retrying(what: str, errors: Transient, counter: Any, *, give_up_s: float = 600.0,
             stop: threading.Event | None = None, on_wait: Callable[[], None] | None = None,
             outages: Outages | None = None) -> Retrying:
    """Back off on transient errors (service down, restarting, overloaded): never reject for those.
    `stop` set ends the wait at once (then `with_retry` raises Stopping); `on_wait()` runs before
    each sleep (the loop keeps its lag gauge current while it waits); `outages` lists `what`
    while it fails (the worker is not ready meanwhile)."""

    def before_sleep(state: Any) -> None:
        counter.inc()
        if outages is not None:
            outages.failed(what)
        log(LOG, logging.WARNING, f"{what} failed, retrying", attempt=state.attempt_number,
            error=error_text(state.outcome.exception()))
        if on_wait is not None:
            on_wait()

    ends: stop_base = stop_after_delay(give_up_s)
    if stop is not None:
        ends = ends | stop_when_event_set(stop)
    return Retrying(
        retry=retry_if_exception_type(errors) if isinstance(errors, tuple) else retry_if_exception(errors),
        wait=wait_exponential(multiplier=0.1, max=5), stop=ends, before_sleep=before_sleep, reraise=True,
        sleep=_sleeper(stop),
    )


def with_retry(fn: Callable[[], T], what: str, errors: Transient, counter: Any, *,
               stop: threading.Event | None = None, on_wait: Callable[[], None] | None = None,
               give_up_s: float = 600.0, outages: Outages | None = None) -> T:
    try:
        for attempt in retrying(what, errors, counter, stop=stop, on_wait=on_wait, give_up_s=give_up_s,
                                outages=outages):
            with attempt:  # an exception ends this block (tenacity keeps it): no return then
                result = fn()
                if outages is not None and (outage := outages.recovered(what)) is not None:
                    log(LOG, logging.INFO, f"{what} succeeded again", failed_s=round(outage[0], 1),
                        failed_attempts=outage[1])
                return result
    except Exception as exc:
        transient = isinstance(exc, errors) if isinstance(errors, tuple) else errors(exc)
        if transient and stop is not None and stop.is_set():
            raise Stopping(f"stopped while waiting for {what}: {error_text(exc)}") from exc
        raise
    raise AssertionError("unreachable")


def flush_waiting(producer: Producer, where: str, stop: threading.Event | None = None,
                  give_up_s: float = 600.0) -> None:
    """Wait until the broker has taken every queued message, waiting out a broker that is away
    (restarting, failing over) as Redis and ClickHouse are: librdkafka keeps re-sending each
    message until its message.timeout.ms (5 min by default; then the delivery callback fails
    the batch). Logged every 10 s and counted in metering_kafka_errors_total; SIGTERM (`stop`)
    ends the wait within a second with Stopping, nothing committed."""
    started = last_log = time.monotonic()
    while remaining := producer.flush(1.0):
        waited = time.monotonic() - started
        if stop is not None and stop.is_set():
            raise Stopping(f"stopped while waiting for the Kafka broker: {remaining} messages not delivered")
        if waited > give_up_s:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} messages not delivered "
                                            f"after {waited:.0f} s"))
        if time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            metrics.KAFKA_ERRORS.labels(where=where).inc()
            log(LOG, logging.WARNING, "kafka flush waiting for the broker", where=where, undelivered=remaining,
                waited_s=round(waited, 1))


class ProgressLog:
    """A `progress` log line every `every_s` while a worker has work (something consumed since
    the last line, or a lag left): its totals, events/s since the last line and the consumer
    lag. Quiet while idle and caught up; 0 turns it off."""

    def __init__(self, stage: str, every_s: float) -> None:
        self.stage = stage
        self.every_s = every_s
        self._at = time.monotonic()
        self._consumed = 0

    def tick(self, consumed: int, lag: int, **totals: int) -> None:
        if not self.every_s:
            return
        now = time.monotonic()
        elapsed = now - self._at
        if elapsed < self.every_s:
            return
        if consumed != self._consumed or lag:
            log(LOG, logging.INFO, "progress", stage=self.stage, consumed=consumed,
                events_per_s=round((consumed - self._consumed) / elapsed), lag=lag, **totals)
        self._at, self._consumed = now, consumed


# ---------------------------------------------------------------------- crash points

_CRASH_POINT = os.environ.get("METERING_CRASH_POINT", "")
_CRASH_AFTER = int(os.environ.get("METERING_CRASH_AFTER", "0") or 0)
_CRASH_AFTER_MS = float(os.environ.get("METERING_CRASH_AFTER_MS", "0") or 0)
_crash_seen: dict[str, int] = {}
_crash_timer: list[threading.Timer] = []


def crash_point(name: str) -> None:
    """kill -9 this process at a named line, for the crash tests (METERING_CRASH_POINT=name,
    METERING_CRASH_AFTER=n: on the n-th pass). A no-op in normal runs."""
    if name != _CRASH_POINT:
        return
    seen = _crash_seen[name] = _crash_seen.get(name, 0) + 1
    if seen >= _CRASH_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


def arm_crash_timer() -> None:
    """METERING_CRASH_POINT=timer: kill -9 this process METERING_CRASH_AFTER_MS after the first
    batch starts, at whatever line it is on then (the random-point crash tests)."""
    if _CRASH_POINT != "timer" or _crash_timer:
        return
    timer = threading.Timer(_CRASH_AFTER_MS / 1000, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    _crash_timer.append(timer)
    timer.start()


# ---------------------------------------------------------------------- reloads


class CatalogWatcher:
    """Reloads the catalog when its file's content changes; a bad new version is refused and
    logged, and the running one stays in force. A change is seen by (mtime, size), and while the
    mtime is within the last 2 s the content hash is compared too: file timestamps are as
    coarse as the kernel tick, so a file rewritten twice in one tick keeps its mtime."""

    RACY_NS = 2_000_000_000

    def __init__(self, path: str, every_s: float) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self._checked = 0.0
        self._unreadable = False  # logged once until the file is back
        self.catalog = load_catalog(self.path)  # first: a missing or bad file is a CatalogError
        st = self.path.stat()
        self._stat = (st.st_mtime_ns, st.st_size)
        self._digest = hashlib.sha256(self.path.read_bytes()).digest()
        metrics.CATALOG_VERSION.labels(version=self.catalog.version).set(1)

    def changed(self) -> Catalog | None:
        now = time.monotonic()
        if now - self._checked < self.every_s:
            return None
        self._checked = now
        try:
            st = self.path.stat()
            stat = (st.st_mtime_ns, st.st_size)
            if stat == self._stat and time.time_ns() - st.st_mtime_ns > self.RACY_NS:
                return None
            digest = hashlib.sha256(self.path.read_bytes()).digest()
        except OSError as exc:
            if not self._unreadable:
                log(LOG, logging.WARNING, "catalog file unreadable, keeping the running one",
                    path=str(self.path), running=self.catalog.version, error=exc.strerror)
            self._unreadable = True
            return None
        if self._unreadable:
            log(LOG, logging.INFO, "catalog file readable again", path=str(self.path))
            self._unreadable = False
        self._stat = stat
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            catalog = load_catalog(self.path)
        except CatalogError as exc:
            log(LOG, logging.ERROR, "new catalog refused, keeping the running one",
                path=str(self.path), running=self.catalog.version, errors=exc.errors)
            return None
        if catalog.version != self.catalog.version:  # one series: the version in force
            with contextlib.suppress(KeyError):
                metrics.CATALOG_VERSION.remove(self.catalog.version)
        metrics.CATALOG_VERSION.labels(version=catalog.version).set(1)
        log(LOG, logging.INFO, "catalog reloaded", old=self.catalog.version, new=catalog.version)
        self.catalog = catalog
        return catalog


STARTUP_WAIT_S = 60.0  # how long a starting worker waits for Redis before it gives up (exit 1)


def warn_missing_plans(catalog: Catalog, accounts: Mapping[str, Account]) -> None:
    """Log once per load when imported accounts are on plans the catalog lacks: their events
    are all rejected `unknown_account` (the detail names the plan), which an operator should
    hear about at start, not from the rejected topic."""
    missing: dict[str, list[str]] = {}
    for account_id, account in accounts.items():
        if account.plan_id not in catalog.plans:
            missing.setdefault(account.plan_id, []).append(account_id)
    if missing:
        log(LOG, logging.WARNING, "accounts on plans missing from the catalog: their events are rejected "
            "unknown_account until the catalog has the plan or the accounts are re-imported",
            catalog=catalog.version, plans={p: len(ids) for p, ids in sorted(missing.items())},
            accounts=sorted(a for ids in missing.values() for a in ids)[:10])


class AccountsWatcher:
    """The accounts the pricer knows, reloaded from Redis only when `metering accounts import`
    bumped the version (one GET every `every_s`; a full reload of 10 k wallets takes seconds)."""

    def __init__(self, store: Any, every_s: float = 2.0, stop: threading.Event | None = None) -> None:
        self.store = store
        self.every_s = every_s
        self.stop = stop
        self._checked = time.monotonic()
        # at start: wait for a Redis that is starting too, but not for ever (k8s restarts us)
        self.version = with_retry(store.accounts_version, "accounts version", REDIS_TRANSIENT,
                                  metrics.REDIS_ERRORS, stop=stop, give_up_s=STARTUP_WAIT_S)
        self.accounts = with_retry(store.load_accounts, "load accounts", REDIS_TRANSIENT, metrics.REDIS_ERRORS,
                                   stop=stop, give_up_s=STARTUP_WAIT_S)
        if not self.accounts:
            log(LOG, logging.WARNING, "no accounts in Redis: every event is rejected unknown_account until "
                "`metering accounts import FILE` runs (picked up without a restart)")

    def changed(self) -> dict[str, Any] | None:
        now = time.monotonic()
        if now - self._checked < self.every_s:
            return None
        self._checked = now
        try:
            version = self.store.accounts_version()
        except REDIS_TRANSIENT:
            metrics.REDIS_ERRORS.inc()
            return None
        if version == self.version:
            return None
        self.version = version
        self.accounts = with_retry(self.store.load_accounts, "load accounts", REDIS_TRANSIENT,
                                   metrics.REDIS_ERRORS, stop=self.stop)
        log(LOG, logging.INFO, "accounts reloaded", accounts=len(self.accounts), version=version)
        return cast(dict[str, Any], self.accounts)


# `--until-idle`: how long past the idle time a worker may go without any partition before
# it gives up (Kafka unreachable, topics missing, or other members own every partition):
# a script's run must end, not wait forever. A group join takes seconds.
UNASSIGNED_GIVE_UP_S = 30.0


class NothingAssigned(RuntimeError):
    """`--until-idle` and no partition assigned for longer than it allows."""


def give_up_unassigned(assigned: bool, idle_s: float, max_idle_s: float, *, group: str,
                       topic: str, bootstrap: str) -> None:
    """Raise NothingAssigned when an `--until-idle` run has had no partition for
    max_idle_s + UNASSIGNED_GIVE_UP_S seconds."""
    if not assigned and idle_s > max_idle_s + UNASSIGNED_GIVE_UP_S:
        raise NothingAssigned(
            f"kafka {bootstrap}: no partition of {topic} assigned to group {group} for {idle_s:.0f} s "
            "(Kafka unreachable, topics not created by `metering setup`, or other members own them all); "
            "--until-idle gives up")


def waiting_unassigned(consumer: Any, topics: Sequence[str], stage: str, shown: list[str]) -> bool:
    """For an `--until-idle` exit, once this member's own partitions are caught up: whether
    records still wait in partitions of `topics` it is not assigned (added to the topic since
    the last metadata refresh, or another member's not read yet), so it must not exit yet.
    Logs the partitions each time they change (`shown` keeps the last ones logged); a failed
    check counts as waiting."""
    try:
        waiting = unassigned_backlog(consumer, topics)
    except KafkaException as exc:
        log(LOG, logging.WARNING, "idle check of unassigned partitions failed; not exiting yet", stage=stage,
            error=str(exc))
        return True
    if waiting and sorted(waiting) != shown:
        log(LOG, logging.INFO, "caught up, but records wait in partitions not assigned here (added to the "
            "topic, assigned after the next metadata refresh, or another member's): not exiting yet",
            stage=stage, partitions=waiting)
    shown[:] = sorted(waiting)
    return bool(waiting)


class RedisLostWrites(RuntimeError):
    """Redis holds no positions at all any more although this worker wrote some: it was wiped
    (or restored from an empty backup). Charging on would be wrong; an operator restores it."""


class PositionGuard:
    """Kafka positions of one topic's partitions in Redis (`pos:{topic}`), next to the wallets.

    Each batch's positions go with its apply script: Redis compares the positions it holds
    with the ones this worker wrote last and, if they differ (it lost writes under a running
    worker: a restart losing the AOF's last second, a failover to a lagging replica), applies
    nothing and answers with what it holds. The worker then seeks back there and settles the
    lost batches again, in order (what Redis kept is deduped). Batches without debits and
    Redis Cluster (positions on other slots than the wallets) use a compare-and-set after the
    apply instead (see RedisWalletStore.bind_positions)."""

    def __init__(self, store: Any, topic: str, stop: threading.Event | None = None,
                 on_wait: Callable[[], None] | None = None, outages: Outages | None = None) -> None:
        self.store = store
        self.topic = topic
        self.stop = stop  # set: stop waiting for Redis (Stopping)
        self.on_wait = on_wait  # called while Redis is waited for
        self.outages = outages  # lists the Redis calls being waited out (for /readyz)
        self.written: dict[int, int] = {}  # partition -> next offset this worker wrote

    def forget(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self.written.pop(p, None)

    def settle(self, consumer: Any, msgs: Sequence[Message], settle: Callable[[], T], stage: str,
               before_replay: Callable[[], None] = lambda: None) -> T | None:
        """`settle()` (retried while Redis is unreachable) with the batch's positions checked
        and written; None if Redis had lost writes: nothing of the batch was applied,
        `before_replay()` ran and the consumer was sought back to what Redis holds."""
        new = {p: o for (_, p), o in next_offsets(msgs).items()}
        expected = {p: self.written[p] for p in new if p in self.written}

        def attempt() -> T:
            self.store.bind_positions(self.topic, expected, new)
            return settle()

        try:
            result = with_retry(attempt, "redis settle", REDIS_TRANSIENT, metrics.REDIS_ERRORS,
                                stop=self.stop, on_wait=self.on_wait, outages=self.outages)
            if not self.store.positions_applied:  # no debits in the batch, or Redis Cluster
                lost = with_retry(lambda: self.store.positions_cas(self.topic, expected, new),
                                  "redis positions", REDIS_TRANSIENT, metrics.REDIS_ERRORS,
                                  stop=self.stop, on_wait=self.on_wait, outages=self.outages)
                if lost:
                    raise PositionsLost(lost)
        except PositionsLost as exc:
            self._replay(consumer, msgs, exc.held, stage, before_replay)
            return None
        except WalletApplyFailed:
            # A batch of partitions this worker has not written yet carries no positions to
            # check, so a wipe shows up as a missing wallet instead: say what it is.
            if self.written:
                self._raise_if_wiped()
            raise
        self.written.update(new)
        return result

    def _raise_if_wiped(self) -> None:
        if not with_retry(lambda: self.store.positions(self.topic), "redis positions", REDIS_TRANSIENT,
                          metrics.REDIS_ERRORS, stop=self.stop, on_wait=self.on_wait):
            raise RedisLostWrites(f"Redis holds no positions for {self.topic} although this worker wrote "
                                  f"{self.written}: it was wiped; restore it before restarting")

    def _replay(self, consumer: Any, msgs: Sequence[Message], held: dict[int, int], stage: str,
                before_replay: Callable[[], None]) -> None:
        if all(h < 0 for h in held.values()):
            self._raise_if_wiped()
        before_replay()
        self._seek_back(consumer, msgs, {p: max(h, 0) for p, h in held.items()}, stage)
        for p, h in held.items():
            if h < 0:  # Redis holds no position for p: replay from 0 and expect none
                self.written.pop(p, None)
            else:
                self.written[p] = h

    def _seek_back(self, consumer: Any, msgs: Sequence[Message], lost: dict[int, int], stage: str) -> None:
        """Drop the batch in hand and re-read from Redis's positions (and from this batch's
        first offset on the partitions that lost nothing)."""
        start: dict[int, int] = {}
        for m in msgs:
            p, o = int(m.partition() or 0), int(m.offset() or 0)
            if o < start.get(p, o + 1):
                start[p] = o
        for p, pos in lost.items():
            start[p] = min(pos, start.get(p, pos))
        for p, off in start.items():
            consumer.seek(TopicPartition(self.topic, p, off))
        for p, pos in lost.items():
            metrics.STORE_REWINDS.labels(stage=stage).inc()
            log(LOG, logging.WARNING, "wallet store lost writes under a running worker: replaying",
                stage=stage, topic=self.topic, partition=p, store_position=pos,
                worker_position=start.get(p))


# ---------------------------------------------------------------------- outputs


_json = msgspec.json.Encoder()
_movement_decoder = msgspec.json.Decoder(MovementOut)


# Header on wallet events that operator commands (credit, fees, import) produce: the single-
# process pipeline writes its own events to ClickHouse directly and takes only these from
# wallet.events (the split sink worker takes every event from the topic).
OPERATOR_HEADER = ("origin", b"operator")
_wallet_event_decoder = msgspec.json.Decoder(WalletEventOut)


def decode_wallet_event(value: bytes) -> tuple[WalletEvent, datetime]:
    """A `wallet.events` message back to a WalletEvent and its time."""
    e = _wallet_event_decoder.decode(value)
    return WalletEvent(type=e.type, account_id=e.account_id, event_id=e.event_id, balance=parse_micros(e.balance),
                       package_id=e.package_id, percent=e.percent), e.at


def is_operator_event(msg: Message) -> bool:
    return OPERATOR_HEADER in (msg.headers() or [])


def decode_movement(value: bytes) -> Movement:
    """A `wallet.movements` message back to a Movement (money as integer micros)."""
    mv = _movement_decoder.decode(value)
    return Movement(movement_id=mv.movement_id, account_id=mv.account_id, at=mv.at, type=mv.type,
                    amount=parse_micros(mv.amount), balance_after=parse_micros(mv.balance_after),
                    reference=mv.reference, seq=mv.seq)


def debit_movements(rows: Sequence[Row], seqs: Mapping[int, int]) -> list[Movement]:
    """One `debit` movement per charged rated row; its id is stable so replays replace it.
    `seqs`: row index -> the wallet's balance-change number (BatchResult.seqs)."""
    return [
        Movement(movement_id=f"debit:{r[1]}:{r[0]}", account_id=r[1], at=r[19], type="debit",
                 amount=-r[14], balance_after=r[15], reference=r[0], seq=seqs.get(i, 0))
        for i, r in enumerate(rows)
        if r[2] == "rated" and r[14]
    ]


def event_times(rows: Sequence[Row], events: Sequence[WalletEvent]) -> list[datetime]:
    """The timestamp of each wallet event's cause (its usage event)."""
    if not events:  # most batches: no per-row map to build
        return []
    at = {(r[1], r[0]): r[19] for r in rows if r[2] == "rated"}
    now = datetime.now(UTC)
    return [at.get((e.account_id, e.event_id or ""), now) for e in events]


def produce_rejected(producer: Producer, topic: str, rows: Sequence[Row], msgs: Sequence[Message],
                     on_delivery: Callable[..., None]) -> int:
    """Rejected input goes to `usage.rejected` byte for byte, with the reason in headers."""
    n = 0
    for row, m in zip(rows, msgs, strict=True):
        if row[2] != "rejected":
            continue
        n += 1
        metrics.REJECTED.labels(reason=row[4]).inc()
        producer.produce(
            topic, value=m.value() or b"", key=m.key(), on_delivery=on_delivery,
            headers=[
                ("reason", row[4].encode()), ("detail", (row[5] or "").encode()),
                ("source.topic", str(m.topic()).encode()), ("source.partition", str(m.partition()).encode()),
                ("source.offset", str(m.offset()).encode()), ("event_id", (row[0] or "").encode()),
                ("account_id", (row[1] or "").encode()),
            ],
        )
    return n


def rejected_rows_for_sink(rows: Sequence[Row], msgs: Sequence[Message]) -> list[tuple[bytes, str, str | None, str, int, int, datetime]]:
    now = datetime.now(UTC)
    return [
        (m.value() or b"", row[4], row[5], str(m.topic()), int(m.partition() or 0), int(m.offset() or 0), now)
        for row, m in zip(rows, msgs, strict=True)
        if row[2] == "rejected"
    ]


def produce_wallet_events(producer: Producer, topic: str, events: Sequence[WalletEvent],
                          ats: Sequence[datetime], on_delivery: Callable[..., None]) -> None:
    for e, at in zip(events, ats, strict=True):
        metrics.WALLET_EVENTS.labels(type=e.type).inc()
        if e.type == "blocked":
            metrics.WALLETS_BLOCKED.inc()
        elif e.type == "topup_requested":
            metrics.TOPUPS_REQUESTED.inc()
        out = WalletEventOut(type=e.type, account_id=e.account_id, event_id=e.event_id,
                             balance=format_micros(e.balance), at=at, package_id=e.package_id,
                             percent=e.percent)
        producer.produce(topic, value=_json.encode(out), key=e.account_id.encode(), on_delivery=on_delivery)


def count_rows(rows: Sequence[Row]) -> dict[str, int]:
    """Counts per status (and money charged) of a batch; metrics updated once per label."""
    counts = {"rated": 0, "rejected": 0, "duplicate": 0, "charged": 0}
    kinds: dict[str, int] = {}
    conflicts: dict[bool, int] = {}
    for r in rows:
        status = r[2]
        counts[status] = counts.get(status, 0) + 1
        if status == "rated":
            kinds[r[3]] = kinds.get(r[3], 0) + 1
            counts["charged"] += r[14]
        elif status == "duplicate":
            conflicts[bool(r[6])] = conflicts.get(bool(r[6]), 0) + 1
            if r[6]:  # rare, and someone should look: a switch re-sent an event id with other content
                log(LOG, logging.WARNING, "repeat of an applied event with other content: not charged",
                    account_id=r[1], event_id=r[0], source=r[26])
    for kind, n in kinds.items():
        metrics.RATED.labels(kind=kind).inc(n)
    for conflict, n in conflicts.items():
        metrics.DUPLICATES.labels(conflict="true" if conflict else "false").inc(n)
    metrics.CHARGED_MICROS.inc(counts["charged"])
    return counts


def settings_summary(settings: Settings) -> dict[str, Any]:
    return {"kafka": settings.kafka_bootstrap, "redis": settings.redis_url,
            "clickhouse": settings.clickhouse_dsn, "catalog": settings.catalog_path}


assert COL["at"] == 19 and COL["charge"] == 14 and COL["balance_after"] == 15
