"""The rating engine: raw event bytes in, rated records and wallet events out.

Pure apart from the `WalletStore` it is given (two calls per batch) and `now`, which the caller
passes in. The same code runs offline (`metering rate`, memory store) and in the live debit
worker (Redis store), which is why the two agree record for record.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, NamedTuple

import msgspec

from rating.accounts import Account
from rating.catalog import Catalog, Package, Plan, Rate
from rating.periods import period_start
from rating.pricing import billed_parts, charge_micros, price_units_micros
from rating.money import PICO_PER_MICRO
from rating.wallet import (
    BALANCE_EVENTS,
    AllowanceKey,
    Debit,
    DedupeKey,
    WalletStore,
    decode_prior,
)
from schemas.events import CallEvent, MeterEvent, SmsEvent, UsageEvent
from schemas.records import RatedRecord, WalletEvent

FUTURE_SLACK = timedelta(hours=24)
MAX_METER_QUANTITY = Decimal(10) ** 12
USAGE_THRESHOLDS = (50, 80, 100)
_EXACT = Context(prec=80)
_ONE = Decimal(1)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


class Rejection(Exception):
    """An event that cannot be rated; carries the SPEC reason and a detail naming the field."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BatchResult(NamedTuple):
    records: list[RatedRecord]  # one per input, in input order
    wallet_events: list[WalletEvent]


class _Ids(msgspec.Struct):
    """Best-effort identifiers of an event that failed validation (for the rejected record)."""

    event_id: Any = None
    account_id: Any = None
    kind: Any = None


class _Route(NamedTuple):
    country: str
    dest_class: str
    rate: Rate | None  # None: free (inbound without an inbound rate table entry)
    packages: tuple[Package, ...]  # plan packages covering (country, class), in plan order


class _Pending(NamedTuple):
    """An event that passed validation and pricing, waiting for store state."""

    index: int
    source: str
    event: UsageEvent
    account: Account
    plan: Plan
    route: _Route | None
    parts: list[tuple[int, int]]
    billable_s: int
    amount: int  # micros if nothing is covered
    package: Package | None
    period: date
    fingerprint: int


def _validation_rejection(message: str) -> Rejection:
    missing = _MISSING_RE.search(message)
    if missing:
        return Rejection("invalid_field", f"{missing.group(1)}: missing")
    at = _FIELD_RE.search(message)
    field = at.group(1) if at else ""
    text = message.split(" - at ")[0]
    if field == "kind" and text.startswith("Invalid value"):
        return Rejection("unknown_kind", f"kind: {text.removeprefix('Invalid value ')} is not call, sms or meter")
    if not field:
        return Rejection("invalid_field", f"(event): {text}")
    if field == "from_":
        field = "from"
    return Rejection("invalid_field", f"{field}: {text}")


def _event_time(event: UsageEvent) -> datetime:
    if type(event) is CallEvent:
        return event.started_at
    if type(event) is SmsEvent:
        return event.sent_at
    assert isinstance(event, MeterEvent)
    return event.at


def _threshold_bits(used_before: int, used_after: int, limit: int) -> int:
    bits = 0
    for n, pct in enumerate(USAGE_THRESHOLDS):
        mark = pct * limit
        if used_before * 100 < mark <= used_after * 100:
            bits |= 1 << n
    return bits


class Rater:
    def __init__(
        self,
        catalog: Catalog,
        accounts: Mapping[str, Account],
        store: WalletStore,
    ) -> None:
        self._decoder = msgspec.json.Decoder(UsageEvent)
        self._encoder = msgspec.json.Encoder()
        self.store = store
        self.accounts = accounts
        self.set_catalog(catalog)

    def set_catalog(self, catalog: Catalog) -> None:
        """Swap the catalog (hot reload); routes are re-derived lazily."""
        self.catalog = catalog
        self._key_len = catalog.max_prefix_len
        self._routes: dict[tuple[str, str], dict[str, _Route | str]] = {}

    def set_accounts(self, accounts: Mapping[str, Account]) -> None:
        self.accounts = accounts

    # ------------------------------------------------------------------ pure part

    def _route(self, plan: Plan, direction: str, number: str) -> _Route:
        cache = self._routes.get((plan.plan_id, direction))
        if cache is None:
            cache = self._routes[(plan.plan_id, direction)] = {}
        key = number[1 : 1 + self._key_len]
        hit = cache.get(key)
        if hit is None:
            hit = self._resolve(plan, direction, key)
            if len(cache) > 500_000:  # bound memory under adversarial numbering
                cache.clear()
            cache[key] = hit
        if type(hit) is str:
            raise Rejection(hit, f"to: {number}")
        return hit  # type: ignore[return-value]

    def _resolve(self, plan: Plan, direction: str, digits: str) -> _Route | str:
        catalog = self.catalog
        dest = catalog.destinations.lookup(digits)
        if dest is None:
            return "unknown_destination"
        if direction == "sms":
            return _Route(dest.country, dest.dest_class, None, ())
        if direction == "outbound":
            rate = catalog.rate_tables[plan.rate_table].lookup(digits)
            if rate is None:
                return "no_rate"
            pkgs = tuple(
                p
                for p in (catalog.packages[name] for name in plan.packages)
                if dest.dest_class in p.classes and dest.country in p.countries
            )
            return _Route(dest.country, dest.dest_class, rate, pkgs)
        # Inbound: rated on the plan's inbound table when it prices this number, else free.
        table = plan.inbound_rate_table
        rate = catalog.rate_tables[table].lookup(digits) if table else None
        return _Route(dest.country, dest.dest_class, rate, ())

    def _price(self, index: int, raw: bytes, source: str, now_limit: datetime) -> _Pending:
        try:
            event = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise _validation_rejection(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise Rejection("invalid_json", str(exc)) from None
        account = self.accounts.get(event.account_id)
        if account is None:
            raise Rejection("unknown_account", f"account_id: {event.account_id!r} is not a known account")
        plan = self.catalog.plans.get(account.plan_id)
        if plan is None:
            raise Rejection("unknown_account", f"account_id: plan {account.plan_id!r} of {event.account_id!r} is not in catalog {self.catalog.version}")
        ts = _event_time(event)
        if ts > now_limit:
            raise Rejection("future_timestamp", f"{'started_at' if type(event) is CallEvent else 'sent_at' if type(event) is SmsEvent else 'at'}: {ts.isoformat()} is more than 24 h ahead")
        route: _Route | None = None
        parts: list[tuple[int, int]] = []
        billable = 0
        amount = 0
        package: Package | None = None
        if type(event) is CallEvent:
            route = self._route(plan, event.direction, event.to)
            rate = route.rate
            if rate is not None:
                parts = billed_parts(rate, event.duration_s)
                billable = sum(s for s, _ in parts)
                amount = charge_micros(parts, 0, rate.connect_fee_pico)
                if event.direction == "outbound":
                    home = account.home_country
                    for p in route.packages:
                        if p.scope != "domestic" or route.country == home:
                            package = p
                            break
        elif type(event) is SmsEvent:
            route = self._route(plan, "sms", event.to)
            price = plan.sms_outbound_pico if event.direction == "outbound" else plan.sms_inbound_pico
            amount = price_units_micros(event.segments * price)
        else:
            assert isinstance(event, MeterEvent)
            price = plan.meters_pico.get(event.meter)
            if price is None:
                raise Rejection("unknown_meter", f"meter: {event.meter!r} has no price in plan {plan.plan_id!r}")
            q = event.quantity
            if not q.is_finite() or q < 0 or q > MAX_METER_QUANTITY:
                raise Rejection("invalid_field", f"quantity: must be a number from 0 to 1e12, got {q}")
            exact = _EXACT.multiply(q, Decimal(price)) / PICO_PER_MICRO
            amount = int(exact.quantize(_ONE, rounding=ROUND_HALF_UP, context=_EXACT))
        fingerprint = zlib.crc32(self._encoder.encode(event))
        return _Pending(
            index, source, event, account, plan, route, parts, billable, amount, package,
            period_start(ts, account.period_anchor_day), fingerprint,
        )

    # ------------------------------------------------------------------ batch

    def rate_batch(self, items: Sequence[tuple[bytes, str]], now: datetime) -> BatchResult:
        """Rate `(raw_bytes, source)` pairs in order. `source` names the delivery (e.g.
        "partition:offset"); a redelivery of the same source re-emits the original record."""
        now_limit = now + FUTURE_SLACK
        records: list[RatedRecord | None] = [None] * len(items)
        pending: list[_Pending] = []
        for i, (raw, source) in enumerate(items):
            try:
                pending.append(self._price(i, raw, source, now_limit))
            except Rejection as rej:
                records[i] = self._rejected(raw, rej)

        dedupe_keys: list[DedupeKey] = [(p.account.account_id, p.event.event_id) for p in pending]
        allowance_keys: list[AllowanceKey] = []
        allowance_index: dict[AllowanceKey, int] = {}
        for p in pending:
            if p.package is not None and p.package.limit_s is not None:
                key = (p.account.account_id, p.package.package_id, p.period.isoformat())
                if key not in allowance_index:
                    allowance_index[key] = len(allowance_keys)
                    allowance_keys.append(key)
        priors, used_list = self.store.lookup(dedupe_keys, allowance_keys) if pending else ([], [])
        used = dict(zip(allowance_keys, used_list, strict=True))

        debits: list[Debit] = []
        debited: list[tuple[_Pending, int, int, int, bool, int]] = []
        in_batch: dict[DedupeKey, tuple[int, str]] = {}
        replays: list[tuple[_Pending, str]] = []
        for p, key, prior_text in zip(pending, dedupe_keys, priors, strict=True):
            if prior_text is not None:
                prior = decode_prior(prior_text)
                if prior.source == p.source:
                    replays.append((p, prior_text))
                else:
                    records[p.index] = self._duplicate(p, prior.fingerprint != p.fingerprint)
                continue
            first = in_batch.get(key)
            if first is not None:
                records[p.index] = self._duplicate(p, first[0] != p.fingerprint)
                continue
            in_batch[key] = (p.fingerprint, p.source)
            covered = 0
            thresholds = 0
            fair_use_exceeded = False
            amount = p.amount
            allowance_key: AllowanceKey | None = None
            pkg = p.package
            if pkg is not None and p.billable_s:
                limit = pkg.limit_s
                if limit is None:
                    covered = p.billable_s
                else:
                    allowance_key = (p.account.account_id, pkg.package_id, p.period.isoformat())
                    before = used[allowance_key]
                    covered = min(p.billable_s, max(0, limit - before))
                    used[allowance_key] = before + covered
                    if not pkg.unlimited:
                        thresholds = _threshold_bits(before, before + covered, limit)
                if covered:
                    assert p.route is not None and p.route.rate is not None
                    amount = charge_micros(p.parts, covered, p.route.rate.connect_fee_pico)
                fair_use_exceeded = pkg.unlimited and covered < p.billable_s
            outcome = f"{covered}|{amount}|{int(fair_use_exceeded)}|{thresholds}"
            debits.append(
                Debit(
                    p.account.account_id, p.event.event_id, amount, allowance_key, covered,
                    p.fingerprint, p.source, outcome,
                    p.event.reservation_id if type(p.event) is CallEvent else None,
                )
            )
            debited.append((p, covered, amount, thresholds, fair_use_exceeded, len(debits) - 1))

        applied = self.store.apply(debits) if debits else []
        wallet_events: list[WalletEvent] = []
        emitted: list[tuple[int, RatedRecord, int, int]] = []
        for p, covered, amount, thresholds, fue, j in debited:
            balance_after, bits = applied[j]
            rec = self._rated(p, covered, amount, fue, balance_after)
            records[p.index] = rec
            emitted.append((p.index, rec, bits, thresholds))
        for p, prior_text in replays:
            prior = decode_prior(prior_text)
            covered_s, amount_s, fue_s, thr_s = prior.outcome.split("|")
            rec = self._rated(p, int(covered_s), int(amount_s), fue_s == "1", prior.balance_after)
            records[p.index] = rec
            emitted.append((p.index, rec, prior.events, int(thr_s)))
        emitted.sort(key=lambda e: e[0])
        for _, rec, bits, thresholds in emitted:
            self._wallet_events(rec, bits, thresholds, wallet_events)
        return BatchResult(records, wallet_events)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ records

    @staticmethod
    def _wallet_events(rec: RatedRecord, bits: int, thresholds: int, out: list[WalletEvent]) -> None:
        if bits:
            for bit, name in BALANCE_EVENTS:
                if bits & bit:
                    out.append(WalletEvent(type=name, account_id=rec.account_id or "", event_id=rec.event_id, balance=rec.balance_after or 0))
        if thresholds:
            for n, pct in enumerate(USAGE_THRESHOLDS):
                if thresholds & (1 << n):
                    out.append(
                        WalletEvent(
                            type="usage_threshold", account_id=rec.account_id or "",
                            event_id=rec.event_id, balance=rec.balance_after or 0,
                            package_id=rec.package_id, percent=pct,
                        )
                    )

    def _rated(self, p: _Pending, covered: int, amount: int, fue: bool, balance_after: int) -> RatedRecord:
        ev = p.event
        route = p.route
        common = dict(
            event_id=ev.event_id,
            account_id=ev.account_id,
            status="rated",
            charge=amount,
            balance_after=balance_after,
            period_start=p.period,
            plan_id=p.plan.plan_id,
            catalog_version=self.catalog.version,
        )
        if type(ev) is CallEvent:
            assert route is not None
            return RatedRecord(
                kind="call", country=route.country, dest_class=route.dest_class,
                billable_s=p.billable_s, covered_s=covered, charged_s=p.billable_s - covered,
                package_id=p.package.package_id if p.package is not None else None,
                fair_use_exceeded=fue, direction=ev.direction, from_number=ev.from_,
                to_number=ev.to, at=ev.started_at, reservation_id=ev.reservation_id, **common,  # type: ignore[arg-type]
            )
        if type(ev) is SmsEvent:
            assert route is not None
            return RatedRecord(
                kind="sms", country=route.country, dest_class=route.dest_class,
                direction=ev.direction, from_number=ev.from_, to_number=ev.to, at=ev.sent_at,
                quantity=Decimal(ev.segments), **common,  # type: ignore[arg-type]
            )
        assert isinstance(ev, MeterEvent)
        return RatedRecord(kind="meter", at=ev.at, meter=ev.meter, quantity=ev.quantity, **common)  # type: ignore[arg-type]

    def _duplicate(self, p: _Pending, conflict: bool) -> RatedRecord:
        ev = p.event
        kind = "call" if type(ev) is CallEvent else "sms" if type(ev) is SmsEvent else "meter"
        return RatedRecord(
            event_id=ev.event_id, account_id=ev.account_id, status="duplicate", kind=kind,
            conflict=conflict, plan_id=p.plan.plan_id, catalog_version=self.catalog.version,
        )

    @staticmethod
    def _rejected(raw: bytes, rej: Rejection) -> RatedRecord:
        try:
            ids = msgspec.json.decode(raw, type=_Ids)
        except msgspec.DecodeError:
            ids = _Ids()
        def text(v: Any) -> str | None:
            return v if isinstance(v, str) else None
        kind = text(ids.kind)
        return RatedRecord(
            event_id=text(ids.event_id), account_id=text(ids.account_id), status="rejected",
            kind=kind if kind in ("call", "sms", "meter") else None,
            reason=rej.reason, detail=rej.detail,
        )
