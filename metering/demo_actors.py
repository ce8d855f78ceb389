"""The world around the engine in `metering demo`: a dialer that refuses blocked accounts'
outbound calls and SMS, and a payment provider that pays the auto top-ups the wallets request.

Without them the demo's switches would keep calling out from blocked wallets (driving prepaid
balances hundreds below zero) and no requested top-up would ever arrive: neither is what a
billing page built on this engine shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping

import msgspec

from metering import kafka_io
from metering.config import Settings
from metering.logs import log
from metering.wallet_ops import apply_credit
from metering.workers.common import decode_wallet_event
from rating.accounts import Account
from rating.wallet import EV_UNBLOCKED
from wallet_debiter.redis_store import RedisWalletStore, wallet_key

LOG = logging.getLogger("metering.demo")


class _Attempt(msgspec.Struct):
    kind: object = None
    direction: object = None


_decode_attempt = msgspec.json.Decoder(_Attempt).decode


class DialerGate:
    """Before each outbound call or SMS the dialer asks whether the account may call out; a
    blocked wallet may not (SPEC: the block is the flag the authorize API reads). The gate
    reads every wallet's flag from Redis in one round trip, at most every `every_s` seconds,
    and refuses those attempts, which then never become CDRs. Inbound traffic and malformed
    records (the switch's, not the dialer's) pass. Used by one thread (the producer)."""

    def __init__(self, store: RedisWalletStore, account_ids: Iterable[str], every_s: float = 0.5) -> None:
        self._store = store
        self._ids = list(account_ids)
        self._every_s = every_s
        self._next = 0.0
        self._blocked: frozenset[str] = frozenset()
        self.refused = 0

    def _refresh(self) -> None:
        pipe = self._store.client.pipeline(transaction=False)
        for account_id in self._ids:
            pipe.hget(wallet_key(account_id), "blocked")
        flags = pipe.execute()
        self._blocked = frozenset(a for a, flag in zip(self._ids, flags, strict=True) if flag == b"1")

    def allows(self, account_id: str, value: bytes) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._every_s
            self._refresh()
        if account_id not in self._blocked:
            return True
        try:
            attempt = _decode_attempt(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return True
        if attempt.direction == "outbound" and attempt.kind in ("call", "sms"):
            self.refused += 1
            return False
        return True


class TopupPayer:
    """The payment provider: every `topup_requested` on wallet.events is paid `delay_s` later
    (a card charge takes a moment) with the account's auto top-up amount, as a `topup` credit
    whose reference `auto-topup:<cause event id>` makes a redelivered request pay once. The
    credit goes through `wallet_ops.apply_credit`, as `metering accounts credit --type topup`:
    it settles the open request, unblocks the wallet when it brings the balance above 0, and
    its movement and `unblocked` event reach Kafka and ClickHouse."""

    def __init__(self, settings: Settings, store: RedisWalletStore, accounts: Mapping[str, Account],
                 *, delay_s: float = 1.0) -> None:
        self._settings = settings
        self._store = store
        self._accounts = accounts
        self._delay_s = delay_s
        self._stop = threading.Event()
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="topup-payer", daemon=True)
        self.requested = 0
        self.paid = 0
        self.paid_micros = 0
        self.unblocked = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Read the requests still on wallet.events, pay every one at once (within
        `timeout_s`), then stop."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s + 5)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the demo, never a silent dead thread
            self.error = exc
            log(LOG, logging.ERROR, "top-up payer stopped", error=repr(exc))

    def _loop(self) -> None:
        s = self._settings
        consumer = kafka_io.make_consumer(s, "demo-payments", [s.topics.wallet_events])
        delivery = kafka_io.DeliveryCheck()  # a refused top-up movement: the payer stops, saying so
        producer = kafka_io.make_producer(s, on_delivery=delivery)
        due: deque[tuple[float, str, str]] = deque()  # (when, account, cause event id)
        lag_state: dict[str, float] = {}
        try:
            while True:
                stopping = self._stop.is_set()
                for msg in consumer.consume(500, timeout=0.05 if stopping else 0.2):
                    value = msg.value()
                    if msg.error() or not value:
                        continue
                    event, _ = decode_wallet_event(value)
                    if event.type == "topup_requested":
                        self.requested += 1
                        due.append((time.monotonic() + self._delay_s, event.account_id, event.event_id or ""))
                now = time.monotonic()
                while due and (due[0][0] <= now or stopping):
                    _, account_id, cause = due.popleft()
                    self._pay(producer, account_id, cause)
                producer.poll(0)
                delivery.raise_if_failed()
                if stopping and not due:
                    lags = kafka_io.update_lag(consumer, "demo-payments", 0, lag_state, cached=False)
                    if (lags and not any(lags.values())) or time.monotonic() > self._deadline:
                        break  # every request on wallet.events read (and paid), or out of time
            kafka_io.flush(producer, delivery=delivery)
        finally:
            consumer.close()

    def _pay(self, producer: object, account_id: str, cause: str) -> None:
        account = self._accounts.get(account_id)
        amount = account.topup_amount if account is not None else None
        if not amount:
            return
        done = apply_credit(self._settings, self._store, producer, account_id, amount, "topup", f"auto-topup:{cause}")
        if not done.replayed:
            self.paid += 1
            self.paid_micros += amount
            if done.bits & EV_UNBLOCKED:
                self.unblocked += 1

