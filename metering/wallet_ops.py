"""Operator money movements on live wallets: credits, top-ups, adjustments and monthly fees.

What `metering accounts credit`, `metering fees charge` and the demo's payment provider share:
the change is applied once per reference in Redis (`credit.lua`), then its movement and the
wallet events it caused are published to Kafka with the header `origin: operator` (the
pipeline's sink writes them to ClickHouse). A replay re-sends both exactly as first applied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from metering.config import Settings
from metering.workers.common import OPERATOR_HEADER
from rating.catalog import Catalog
from rating.money import PICO_PER_MICRO, div_half_up, format_micros
from rating.periods import period_start
from rating.wallet import BALANCE_EVENTS
from schemas.messages import MovementOut, WalletEventOut
from wallet_debiter.redis_store import BalanceOutOfRange, Opening, RedisWalletStore

_encode = msgspec.json.Encoder().encode


class CreditApplied(NamedTuple):
    balance: int  # micros after it
    kind: str  # as applied (a replay: the first application's)
    amount: int  # micros, signed, as applied
    replayed: bool  # the reference was applied before: nothing changed now
    bits: int  # EV_* wallet-event bits it caused (when first applied)


def apply_credit(settings: Settings, store: RedisWalletStore, producer: Any, account_id: str, micros: int,
                 kind: str, reference: str, *, once_prefix: str = "") -> CreditApplied:
    """Apply a credit / top-up / adjustment once per reference (Redis), then produce its
    movement and the wallet events it caused (the caller flushes the producer). A replay
    re-sends both (the first run may have died before producing them) as first applied —
    same ids, amount, type and time, from Redis's record — so consumers drop them and
    ClickHouse replaces the rows. A top-up settles the wallet's open top-up request.
    `once_prefix`: a credit recorded under any reference starting with it is this one (its
    replay). Raises BalanceOutOfRange (nothing applied) past what a wallet holds exactly."""
    _, _, replayed, reference = store.credit_once(account_id, micros, kind=kind, reference=reference,
                                                  once_prefix=once_prefix, settles_topup=kind == "topup",
                                                  at=datetime.now(UTC))
    record = store.credit_record(account_id, reference)
    if record is None:  # written just now by the same script: cannot happen
        raise RuntimeError(f"credit {reference!r} of {account_id!r} applied but not recorded in Redis")
    kind = record.kind or kind
    micros = record.amount if record.amount is not None else micros
    movement = MovementOut(movement_id=f"{kind}:{account_id}:{reference}", account_id=account_id, at=record.at,
                           type=kind, amount=format_micros(micros), balance_after=format_micros(record.balance),
                           reference=reference, seq=record.seq)
    producer.produce(settings.topics.movements, key=account_id.encode(), value=_encode(movement))
    for bit, name in BALANCE_EVENTS:  # event_id = the movement id
        if record.bits & bit:
            producer.produce(settings.topics.wallet_events, key=account_id.encode(), value=_encode(
                WalletEventOut(type=name, account_id=account_id, event_id=movement.movement_id,
                               balance=format_micros(record.balance), at=record.at)), headers=[OPERATOR_HEADER])
    return CreditApplied(record.balance, kind, micros, replayed, record.bits)


OPENING_REFERENCE = "opening"


def produce_openings(settings: Settings, producer: Any, openings: list[Opening]) -> int:
    """Each wallet's opening balance as an `adjustment` movement (reference `opening`, seq 0,
    at the time its first import created it), so that a wallet's movements add up to its
    balance. Taken from Redis on every import, so a re-run re-sends the same movements (an
    import that died before producing them loses nothing; ClickHouse replaces the rows).
    A wallet opened at 0 has no such movement: nothing changed. Returns how many were sent
    (the caller flushes the producer)."""
    sent = 0
    for o in openings:
        if o.balance == 0:
            continue
        movement = MovementOut(movement_id=f"opening:{o.account_id}", account_id=o.account_id, at=o.at,
                               type="adjustment", amount=format_micros(o.balance),
                               balance_after=format_micros(o.balance), reference=OPENING_REFERENCE, seq=0)
        producer.produce(settings.topics.movements, key=o.account_id.encode(), value=_encode(movement))
        sent += 1
    return sent


class FeesCharged(NamedTuple):
    charged: int  # accounts charged now
    total: int  # micros charged now
    replayed: int  # accounts already charged for that period
    skipped: int  # plans without a fee, or missing from the catalog
    refused: int = 0  # the fee would take the balance beyond what a wallet holds exactly
    stopped: bool = False  # `stop` was set: the accounts after the last one charged are not done


def charge_fees(settings: Settings, store: RedisWalletStore, producer: Any, catalog: Catalog, on: datetime,
                warn: Callable[[str], None], stop: threading.Event | None = None) -> FeesCharged:
    """Charge every imported account its plan's monthly_fee for its billing period holding
    `on`, once per period: the reference is `fee:<period start>:<plan>`, and a fee already
    recorded for that period under any plan (`fee:<period start>:`) makes the run change
    nothing for the account (a plan change mid-period does not charge a second fee; the new
    plan's fee starts with the next period). A fee is a negative `adjustment` (the analyst
    views count it as recurring) and follows the wallet rules of a debit (block, top-up
    request, alert). `stop` set (SIGTERM, Ctrl-C): returns after the account in hand, so
    every fee applied has its movement produced (the caller flushes)."""
    charged = replayed = skipped = refused = total = 0
    for account_id, account in sorted(store.load_accounts().items()):
        if stop is not None and stop.is_set():
            return FeesCharged(charged, total, replayed, skipped, refused, stopped=True)
        plan = catalog.plans.get(account.plan_id)
        if plan is None:
            warn(f"warning: {account_id}: plan {account.plan_id!r} is not in catalog {catalog.version}; not charged")
            skipped += 1
            continue
        fee = div_half_up(plan.monthly_fee_pico, PICO_PER_MICRO)
        if fee <= 0:
            skipped += 1
            continue
        period = period_start(on, account.period_anchor_day).isoformat()
        try:
            applied = apply_credit(settings, store, producer, account_id, -fee, "adjustment",
                                   f"fee:{period}:{plan.plan_id}", once_prefix=f"fee:{period}:")
        except BalanceOutOfRange as exc:  # one wallet at its limit must not stop the others' fees
            warn(f"error: fee {format_micros(fee)} of plan {plan.plan_id!r} not charged: {exc}")
            refused += 1
            continue
        if applied.replayed:
            replayed += 1
        else:
            charged += 1
            total += fee
    return FeesCharged(charged, total, replayed, skipped, refused)
