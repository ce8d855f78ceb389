"""The rating engine: raw event bytes in, rated rows and wallet events out.

Pure apart from the `WalletStore` it is given (two calls per batch) and `now`, which the caller
passes in. The same code runs offline (`metering rate`, memory store) and in the live debit
worker (Redis store), which is why the two agree record for record.

Hot-path notes: one msgspec decode per event (types and ranges checked in C, E.164 numbers by
a check in the loop; any event either refuses is decoded again by the full schema for its error); the
number's first digits map to its longest catalog prefix and that to a cached route (with its
package choice and pricing constants precomputed); integer arithmetic (interval rates memoised
per duration); one plain tuple per event as the output row (`ROW_FIELDS`). Settling builds
each final row once, without slicing. Everything cached is a pure function of the catalog.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from hashlib import blake2b
from types import MappingProxyType
from typing import Any, NamedTuple

import msgspec

from rating.accounts import Account
from rating.catalog import Catalog, Destination, Package, Plan, Rate
from rating.money import MAX_CHARGE_MICROS, PICO_PER_MICRO, format_micros
from rating.periods import FIRST_PERIOD_START, period_start
from rating.pricing import billed_parts, charge_micros
from rating.wallet import (
    BALANCE_EVENTS,
    AllowanceKey,
    Debit,
    DedupeKey,
    Outcome,
    Prior,
    StaleSnapshot,
    WalletStore,
)
from schemas.events import CallEvent, MeterEvent, SmsEvent, event_decoder
from schemas.records import RatedRecord, WalletEvent

FUTURE_SLACK = timedelta(hours=24)
MAX_EVENT_BYTES = 64 * 1024  # a CDR is ~200 bytes; anything this big is poison
# Quantities are stored as ClickHouse Decimal(18, 6): below 1e12 once rounded to 6 places.
MAX_METER_QUANTITY = Decimal(10) ** 12 - Decimal("0.0000005")
USAGE_THRESHOLDS = (50, 80, 100)
_EXACT = Context(prec=80)
_ONE = Decimal(1)
_PRICE_FAST_MAX = 10**30
_SEGMENTS = {n: Decimal(n) for n in range(1, 64)}  # Decimal is immutable: share the common ones
_MICRO_DEN = 60 * PICO_PER_MICRO
_DEN2 = 2 * _MICRO_DEN
_MEMO_MAX = 4096  # durations remembered per interval rate
_HEAD = 6  # "+" and 5 digits
_NO_DEST = Destination("", "", "")
_NO_RATE = Rate("", (), 0)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")
_E164_FIELDS = frozenset({"to", "from"})
_KIND_REPRS = frozenset({"'call'", "'sms'", "'meter'"})


class _CallNumbersUnchecked(CallEvent, tag="call", frozen=True, kw_only=True):
    """CallEvent without msgspec's E.164 pattern (a Python `re` call per number, ~0.4 us
    each): the engine checks the numbers itself and leaves anything it would refuse
    to the full `event_decoder()`. Same fields, order and encoding as CallEvent."""

    from_: str = msgspec.field(name="from")
    to: str


class _SmsNumbersUnchecked(SmsEvent, tag="sms", frozen=True, kw_only=True):
    """SmsEvent without the E.164 pattern (see _CallNumbersUnchecked)."""

    from_: str = msgspec.field(name="from")
    to: str


_TIME_FIELD: dict[type, str] = {_CallNumbersUnchecked: "started_at", _SmsNumbersUnchecked: "sent_at",
                                MeterEvent: "at"}  # the types price() decodes to

# One output row per input event, in this column order (RatedRecord has the same fields).
ROW_FIELDS = (
    "event_id", "account_id", "status", "kind", "reason", "detail", "conflict", "country",
    "dest_class", "billable_s", "covered_s", "charged_s", "package_id", "fair_use_exceeded",
    "charge", "balance_after", "direction", "from_number", "to_number", "at", "period_start",
    "plan_id", "catalog_version", "meter", "quantity", "reservation_id", "source",
)
Row = tuple[Any, ...]
COL = {name: i for i, name in enumerate(ROW_FIELDS)}


class Rejection(Exception):
    """An event that cannot be rated; carries the SPEC reason and a detail naming the field."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BatchResult(NamedTuple):
    rows: list[Row]  # one per input, in input order (see ROW_FIELDS)
    wallet_events: list[WalletEvent]
    # row index -> the wallet's movement seq of that row's debit (rows that moved money only)
    seqs: Mapping[int, int] = MappingProxyType({})

    def records(self) -> list[RatedRecord]:
        """Rows as structs, for callers that prefer names over speed (tests, tools)."""
        return [row_to_record(r) for r in self.rows]


def row_to_record(row: Row) -> RatedRecord:
    return RatedRecord(**dict(zip(ROW_FIELDS[:-1], row[:-1], strict=True)))


class _Ids(msgspec.Struct):
    """Best-effort identifiers of an event that failed validation (for the rejected row)."""

    event_id: Any = None
    account_id: Any = None
    kind: Any = None


class _Route(NamedTuple):
    country: str
    dest_class: str
    rate: Rate | None  # None: free (inbound without an inbound rate, or SMS)
    simple: tuple[int, int, int] | None  # (first, next, per_minute_pico) for one-price rates
    packages: tuple[Package, ...]  # plan packages covering (country, class), in plan order
    # Derived once per route for the hot loop:
    pkg_home: str | None  # package id for an account whose home country is `country`
    pkg_away: str | None  # package id for any other account
    table: str | None  # rate table name recorded in the priced row
    prefix: str | None  # rate prefix recorded in the priced row
    pm2: int  # 2 * per_minute_pico (simple rates): amount = (billable * pm2 + c2) // _DEN2
    c2: int  # 2 * 60 * connect_fee_pico + _MICRO_DEN
    memo: dict[int, tuple[int, int]] | None  # duration -> (billable, amount), interval rates


def _validation_rejection(message: str) -> Rejection:
    missing = _MISSING_RE.search(message)
    if missing:
        return Rejection("invalid_field", f"{missing.group(1)}: missing")
    at = _FIELD_RE.search(message)
    field = at.group(1) if at else ""
    text = message.split(" - at ")[0]
    if field == "kind" and text.startswith("Invalid value"):
        value = text.removeprefix("Invalid value ")
        if value in _KIND_REPRS:  # a valid kind refused: the tag was read from an earlier "kind" key
            return Rejection("invalid_field", f"kind: given more than once with different values ({value} last)")
        return Rejection("unknown_kind", f"kind: {value} is not call, sms or meter")
    if not field:
        return Rejection("invalid_field", f"(event): {text}")
    if field in _E164_FIELDS and "matching regex" in text:
        return Rejection("invalid_field", f"{field}: expected E.164, + then 1 to 15 digits")
    return Rejection("invalid_field", f"{field}: {text}")


def _threshold_bits(used_before: int, used_after: int, limit: int) -> int:
    bits = 0
    for n, pct in enumerate(USAGE_THRESHOLDS):
        mark = pct * limit
        if used_before * 100 < mark <= used_after * 100:
            bits |= 1 << n
    return bits


def call_charge(route_rate: Rate, duration_s: int, covered_s: int) -> int:
    """Micros for a call whose first `covered_s` billable seconds are covered by a package."""
    return charge_micros(billed_parts(route_rate, duration_s), covered_s, route_rate.connect_fee_pico)


# A priced event is its output row (status "priced", nothing covered yet, charge = the price
# without packages, balance unknown) followed by what settling needs:
P_FINGERPRINT, P_DURATION, P_RATE_TABLE, P_RATE_PREFIX, P_PERIOD_KEY = 27, 28, 29, 30, 31
_I_STATUS, _I_BILLABLE, _I_COVERED, _I_PACKAGE, _I_CHARGE, _I_BALANCE = 2, 9, 10, 12, 14, 15


class Pricer:
    """The stateless half: decode, validate, route and price. Needs only the catalog and the
    accounts, so it scales out freely (`metering worker rating`)."""

    def __init__(self, catalog: Catalog, accounts: Mapping[str, Account]) -> None:
        self._decoder: msgspec.json.Decoder[Any] = event_decoder()  # narrowed by type() below
        # The same events with the numbers' E.164 pattern left to price(): decodes the same
        # values, and whatever it or that check refuses is decoded again by `_decoder`, whose
        # error (the first in the document) is the one reported, as before.
        self._fast_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            _CallNumbersUnchecked | _SmsNumbersUnchecked | MeterEvent, float_hook=Decimal)
        self._encoder = msgspec.msgpack.Encoder()  # times as UTC instants: one spelling each
        self.accounts = accounts
        self.max_bytes = MAX_EVENT_BYTES
        self.set_catalog(catalog)

    def set_catalog(self, catalog: Catalog) -> None:
        """Swap the catalog (hot reload); routes and periods are re-derived lazily."""
        self.catalog = catalog
        # A route depends only on the longest prefix of the number found in *any* table
        # (destinations or a rate table): every prefix that matches the number is a prefix of
        # that one. So routes are cached per such "+prefix", found by one probe per length.
        keys = set(catalog.destinations._by_prefix)
        for table in catalog.rate_tables.values():
            keys.update(table._by_prefix)
        self._keys = frozenset("+" + k for k in keys)
        self._key_lens = tuple(sorted({len(k) for k in self._keys}, reverse=True))
        # The first _HEAD characters of most numbers already decide that prefix: those heads
        # map straight to it (a head is ambiguous when a longer prefix starts with it).
        self._ambiguous = frozenset(k[:_HEAD] for k in self._keys if len(k) > _HEAD)
        self._heads: dict[str, str] = {}
        # plan_id -> direction ("outbound", "inbound", "sms") -> "+prefix" -> route or reason
        self._routes: dict[str, dict[str, dict[str, _Route | str]]] = {
            plan_id: {"outbound": {}, "inbound": {}, "sms": {}} for plan_id in catalog.plans
        }
        self._memos: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
        # digits -> destination; (table, digits) -> rate (_NO_DEST / _NO_RATE: none)
        self._lookups: dict[str | tuple[str, str], Destination | Rate] = {}
        self._shared_routes: dict[tuple[str, str, str, str, str | None], _Route] = {}
        # anchor day -> UTC day -> (period start, its ISO text)
        self._periods: defaultdict[int, dict[date, tuple[date, str]]] = defaultdict(dict)

    def set_accounts(self, accounts: Mapping[str, Account]) -> None:
        self.accounts = accounts

    def _resolve(self, plan: Plan, direction: str, digits: str) -> _Route | str:
        # Lookups are shared by every plan and direction; a route is shared by every number
        # with the same plan, direction, country, class and rate (the table follows from plan
        # and direction).
        catalog = self.catalog
        lookups = self._lookups
        dest = lookups.get(digits)
        if dest is None:
            dest = lookups[digits] = catalog.destinations.lookup(digits) or _NO_DEST
        if dest is _NO_DEST:
            return "unknown_destination"
        assert isinstance(dest, Destination)
        if direction == "sms":
            table: str | None = None
            rate: Rate | None = None
        else:
            # Inbound: rated on the plan's inbound table when it prices this number, else free.
            table = plan.rate_table if direction == "outbound" else plan.inbound_rate_table
            if table:
                rate_key = (table, digits)
                found = lookups.get(rate_key)
                if found is None:
                    found = lookups[rate_key] = catalog.rate_tables[table].lookup(digits) or _NO_RATE
                rate = found if isinstance(found, Rate) and found is not _NO_RATE else None
            else:
                rate = None
            if rate is None and direction == "outbound":
                return "no_rate"
        route_key = (plan.plan_id, direction, dest.country, dest.dest_class, rate.prefix if rate is not None else None)
        route = self._shared_routes.get(route_key)
        if route is None:
            route = self._shared_routes[route_key] = self._make_route(plan, direction, dest, table, rate)
        return route

    def _make_route(self, plan: Plan, direction: str, dest: Destination, table: str | None, rate: Rate | None) -> _Route:
        if direction == "sms":
            return _Route(dest.country, dest.dest_class, None, None, (), None, None, None, None, 0, 0, None)
        catalog = self.catalog
        pkgs: tuple[Package, ...] = ()
        if direction == "outbound":
            pkgs = tuple(
                p
                for p in (catalog.packages[name] for name in plan.packages)
                if dest.dest_class in p.classes and dest.country in p.countries
            )
        home = pkgs[0].package_id if pkgs else None
        away = next((p.package_id for p in pkgs if p.scope != "domestic"), None)
        if rate is None:
            return _Route(dest.country, dest.dest_class, None, None, pkgs, home, away, table, None, 0, 0, None)
        simple = rate.simple
        memo = None
        if simple is None:
            memo = self._memos.setdefault((str(table), rate.prefix), {})
        pm2 = 2 * simple[2] if simple is not None else 0
        c2 = 120 * rate.connect_fee_pico + _MICRO_DEN
        return _Route(dest.country, dest.dest_class, rate, simple, pkgs, home, away, table, rate.prefix, pm2, c2, memo)

    def _prefix_key(self, number: str) -> str:
        """The longest "+prefix" of `number` in any table ("" when none)."""
        keys = self._keys
        key = ""
        for n in self._key_lens:
            if number[:n] in keys:
                key = number[:n]
                break
        if key:  # "" (no prefix) is not cached: the hot loop treats it as a miss
            head = number[:_HEAD]
            if head not in self._ambiguous:
                if len(self._heads) >= 1_000_000:  # bound memory under adversarial numbering
                    self._heads.clear()
                self._heads[head] = key
        return key

    def _route_miss(self, plan: Plan, direction: str, key: str) -> _Route | str:
        by_dir = self._routes.get(plan.plan_id)
        if by_dir is None:
            by_dir = self._routes[plan.plan_id] = {"outbound": {}, "inbound": {}, "sms": {}}
        hit = by_dir[direction][key] = self._resolve(plan, direction, key[1:])
        return hit

    def route(self, plan: Plan, direction: str, number: str) -> _Route:
        """Destination, rate and candidate packages of `number` ("+digits") on `plan`."""
        key = self._prefix_key(number)
        by_dir = self._routes.get(plan.plan_id)
        hit = by_dir[direction].get(key) if by_dir is not None else None
        if hit is None:
            hit = self._route_miss(plan, direction, key)
        if type(hit) is str:
            raise _route_rejection(hit, number, plan)
        return hit  # type: ignore[return-value]

    def _period(self, ts: datetime, anchor: int) -> tuple[date, str]:
        """(period start, its ISO text) for a UTC timestamp, cached per day and anchor."""
        day = ts.date()
        by_day = self._periods[anchor]
        hit = by_day.get(day)
        if hit is None:
            start = period_start(ts, anchor)
            if start < FIRST_PERIOD_START:
                # rated_usage.period_start is a ClickHouse Date (from 1970-01-01): such an event
                # (a switch clock reset to the epoch) is rejected invalid_field by price()'s
                # ValueError handler before anything is charged; not cached, so every time.
                # (Date ends in 2149: later events are future_timestamp long before.)
                raise ValueError(f"{ts.isoformat()} falls in the billing period from {start}, before "
                                 f"{FIRST_PERIOD_START} (the earliest period_start stored)")
            hit = by_day[day] = (start, start.isoformat())
        return hit

    def price(self, items: Sequence[tuple[bytes, str]], now: datetime) -> list[Row]:
        """One row per `(raw_bytes, source)`: a priced row, or a final rejected row."""
        limit_ts = now + FUTURE_SLACK
        out: list[Row] = []
        append = out.append
        decode = self._fast_decoder.decode
        strict_decode = self._decoder.decode
        accounts_get = self.accounts.get
        plans_get = self.catalog.plans.get
        routes = self._routes
        heads_get = self._heads.get
        # The conflict fingerprint is taken over the decoded event re-encoded as msgpack (fixed
        # key order, unknown fields dropped, each timestamp as its UTC instant, a meter's
        # quantity normalized): a resend with other formatting is the same content, one with
        # another duration or number is not. Encoded into one buffer per batch, hashed by a copy of
        # a ready BLAKE2b-64 state (_FP_STATE).
        canon_into = self._encoder.encode_into
        canon_buf = bytearray()
        fp_new = _FP_STATE.copy
        from_bytes = int.from_bytes
        periods = self._periods
        version = self.catalog.version
        max_bytes = self.max_bytes
        _CallEvent, _SmsEvent, _MeterEvent, _UTC = _CallNumbersUnchecked, _SmsNumbersUnchecked, MeterEvent, UTC
        for raw, source in items:
            ev = None
            try:
                if len(raw) > max_bytes:
                    raise oversize(len(raw), max_bytes)
                if not raw.isascii():  # msgspec skips unknown fields unchecked: the whole line must be UTF-8
                    raw.decode()
                try:
                    ev = decode(raw)
                except Exception:
                    strict_decode(raw)  # refused by the full schema too: its own error, as before
                    raise
                t = type(ev)
                if t is not _MeterEvent:
                    # = schemas.events' E164 pattern for both numbers: "+" and 1 to 15 ASCII digits
                    to = ev.to
                    fr = ev.from_
                    if not (len(to) <= 16 and len(fr) <= 16 and to[:1] == "+" and fr[:1] == "+" and to.isascii()
                            and fr.isascii() and to[1:].isdigit() and fr[1:].isdigit()):
                        strict_decode(raw)  # raises the schema's error (the first number it refuses)
                account = accounts_get(ev.account_id)
                if account is None:
                    raise Rejection("unknown_account", f"account_id: {ev.account_id!r} is not a known account")
                plan = plans_get(account.plan_id)
                if plan is None:
                    raise Rejection("unknown_account", f"account_id: {ev.account_id!r} is on plan {account.plan_id!r}, missing from catalog {version}")
                if t is _CallEvent:
                    ts = ev.started_at
                    if ts.tzinfo is not _UTC:
                        ts = _as_utc(ts)
                    if ts > limit_ts:
                        raise Rejection("future_timestamp", f"started_at: {ev.started_at.isoformat()} is more than 24 h ahead")
                    direction = ev.direction
                    to = ev.to
                    key = heads_get(to[:_HEAD]) or self._prefix_key(to)
                    route = routes[plan.plan_id][direction].get(key)
                    if route is None:
                        route = self._route_miss(plan, direction, key)
                    if type(route) is not _Route:
                        raise _route_rejection(route, to, plan)  # type: ignore[arg-type]
                    d = ev.duration_s
                    billable = amount = 0
                    if d and route.rate is not None:
                        simple = route.simple
                        if simple is not None:
                            first = simple[0]
                            if d <= first:
                                billable = first
                            else:
                                nxt = simple[1]
                                billable = first - (first - d) // nxt * nxt
                            amount = (billable * route.pm2 + route.c2) // _DEN2
                        else:
                            memo = route.memo
                            assert memo is not None
                            hit = memo.get(d)
                            if hit is None:
                                parts = billed_parts(route.rate, d)
                                hit = (sum(s for s, _ in parts), charge_micros(parts, 0, route.rate.connect_fee_pico))
                                if len(memo) >= _MEMO_MAX:
                                    memo.clear()
                                memo[d] = hit
                            billable, amount = hit
                    if ts.tzinfo is not _UTC:
                        ts = ts.astimezone(_UTC)
                    anchor = account.period_anchor_day
                    period = periods[anchor].get(ts.date()) or self._period(ts, anchor)
                    canon_into(ev, canon_buf)
                    h = fp_new()
                    h.update(canon_buf)
                    append((ev.event_id, ev.account_id, "priced", "call", None, None, False,
                            route.country, route.dest_class, billable, 0, billable,
                            (route.pkg_home if account.home_country == route.country else route.pkg_away),
                            False, amount, None, direction, ev.from_, to, ev.started_at, period[0],
                            plan.plan_id, version, None, None, ev.reservation_id, source,
                            from_bytes(h.digest(), "little"), d, route.table, route.prefix, period[1]))
                elif t is _SmsEvent:
                    ts = ev.sent_at
                    if ts.tzinfo is not _UTC:
                        ts = _as_utc(ts)
                    if ts > limit_ts:
                        raise Rejection("future_timestamp", f"sent_at: {ev.sent_at.isoformat()} is more than 24 h ahead")
                    to = ev.to
                    key = heads_get(to[:_HEAD]) or self._prefix_key(to)
                    route = routes[plan.plan_id]["sms"].get(key)
                    if route is None:
                        route = self._route_miss(plan, "sms", key)
                    if type(route) is not _Route:
                        raise _route_rejection(route, to, plan)  # type: ignore[arg-type]
                    price = plan.sms_outbound_pico if ev.direction == "outbound" else plan.sms_inbound_pico
                    amount = (2 * ev.segments * price + PICO_PER_MICRO) // (2 * PICO_PER_MICRO)
                    if ts.tzinfo is not _UTC:
                        ts = ts.astimezone(_UTC)
                    anchor = account.period_anchor_day
                    period = periods[anchor].get(ts.date()) or self._period(ts, anchor)
                    canon_into(ev, canon_buf)
                    h = fp_new()
                    h.update(canon_buf)
                    append((ev.event_id, ev.account_id, "priced", "sms", None, None, False,
                            route.country, route.dest_class, 0, 0, 0, None, False, amount, None,
                            ev.direction, ev.from_, to, ev.sent_at, period[0], plan.plan_id,
                            version, None, _SEGMENTS.get(ev.segments) or Decimal(ev.segments), None, source, from_bytes(h.digest(), "little"), 0, None,
                            None, period[1]))
                else:
                    ts = ev.at
                    if ts.tzinfo is not _UTC:
                        ts = _as_utc(ts)
                    if ts > limit_ts:
                        raise Rejection("future_timestamp", f"at: {ev.at.isoformat()} is more than 24 h ahead")
                    quantity = _quantity(ev.quantity)
                    amount = self._meter_amount(plan, ev, quantity)
                    if ts.tzinfo is not _UTC:
                        ts = ts.astimezone(_UTC)
                    anchor = account.period_anchor_day
                    period = periods[anchor].get(ts.date()) or self._period(ts, anchor)
                    canon_into(_normalized(ev, quantity), canon_buf)
                    h = fp_new()
                    h.update(canon_buf)
                    append((ev.event_id, ev.account_id, "priced", "meter", None, None, False, None,
                            None, 0, 0, 0, None, False, amount, None, None, None, None, ev.at,
                            period[0], plan.plan_id, version, ev.meter, quantity, None, source,
                            from_bytes(h.digest(), "little"), 0, None, None, period[1]))
            except msgspec.ValidationError as exc:
                append(rejected_row(raw, source, _validation_rejection(str(exc))))
            except msgspec.DecodeError as exc:
                detail = "empty message" if not raw.strip(b" \t\r\n") else str(exc)  # msgspec: "truncated"
                append(rejected_row(raw, source, Rejection("invalid_json", detail)))
            except UnicodeDecodeError as exc:
                append(rejected_row(raw, source, Rejection("invalid_json", f"invalid UTF-8 at byte {exc.start}")))
            except RecursionError:  # msgspec's depth guard, on JSON nested ~1000 deep
                append(rejected_row(raw, source, Rejection("invalid_json", "(event): nested too deeply")))
            except Rejection as rej:
                append(rejected_row(raw, source, rej))
            except (ValueError, OverflowError, ArithmeticError) as exc:  # never stop the stream
                # in practice a timestamp near year 1 that a UTC shift or the period start
                # takes out of datetime's range
                field = _TIME_FIELD.get(type(ev), "(event)")
                append(rejected_row(raw, source, Rejection("invalid_field", f"{field}: {exc}")))
        return out

    @staticmethod
    def _meter_amount(plan: Plan, ev: MeterEvent, q: Decimal) -> int:
        price = plan.meters_pico.get(ev.meter)
        if price is None:
            raise Rejection("unknown_meter", f"meter: {ev.meter!r} has no price in plan {plan.plan_id!r}")
        if not q.is_finite() or q < 0 or q >= MAX_METER_QUANTITY:
            raise Rejection("invalid_field", f"quantity: must be a number from 0 to below 1e12, got {q}")
        t = q.as_tuple()
        if type(t.exponent) is int and t.exponent >= -12 and len(t.digits) <= 30 and price < _PRICE_FAST_MAX:
            # At most 30 + 30 digits: the 80-digit Decimal path below is exact here, so this is
            # the same half-up rounding done on the exact ratio in integers.
            num, den = q.as_integer_ratio()
            den *= PICO_PER_MICRO
            amount = (2 * num * price + den) // (2 * den)
        else:
            exact = _EXACT.divide(_EXACT.multiply(q, Decimal(price)), Decimal(PICO_PER_MICRO))
            amount = int(exact.quantize(_ONE, rounding=ROUND_HALF_UP, context=_EXACT))
        if amount > MAX_CHARGE_MICROS:
            raise Rejection("invalid_field", f"quantity: {q} {ev.meter} would cost {format_micros(amount)}, more "
                                             f"than the per-event maximum {format_micros(MAX_CHARGE_MICROS)}")
        return amount


def oversize(length: int, limit: int) -> Rejection:
    """The reject of an event of `length` bytes over the `limit` (poison, never decoded)."""
    return Rejection("invalid_json", f"(event): oversize, {length} bytes > {limit}")


def _route_rejection(reason: str, to: str, plan: Plan) -> Rejection:
    """The reject of a number without a route, saying where the operator would add one."""
    if reason == "no_rate":
        return Rejection(reason, f"to: {to} has no prefix in rate table {plan.rate_table!r} (plan {plan.plan_id!r})")
    if reason == "unknown_destination":
        return Rejection(reason, f"to: {to} matches no destination prefix")
    return Rejection(reason, f"to: {to}")


def _quantity(value: object) -> Decimal:
    """A meter quantity as decoded (int, or Decimal for a number with a fraction) as Decimal."""
    t = type(value)
    if t is Decimal:
        return value  # type: ignore[return-value]
    if t is int:
        return Decimal(value)  # type: ignore[arg-type]
    shown = "a string" if t is str else "true/false" if t is bool else "null" if value is None else f"a {t.__name__}"
    raise Rejection("invalid_field", f"quantity: expected a number, got {shown}")


class Settler:
    """The stateful half: dedupe, package allowances and the wallet, through a `WalletStore`
    in two round trips per batch. Must see each account's events in order (one owner per
    Kafka partition), which is what makes its lookup snapshot valid at apply time."""

    def __init__(self, catalog: Catalog, store: WalletStore) -> None:
        self.catalog = catalog
        self.store = store
        self._limited: frozenset[str] = frozenset()  # packages with a limit (derived per catalog)
        self._limited_for: Mapping[str, Package] | None = None
        self.on_stale: Callable[[], None] | None = None  # told of each batch sent round again

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def settle(self, priced: Sequence[Row], attempts: int = 5) -> BatchResult:
        """Final rows (input order) for priced rows; rejected rows pass through unchanged."""
        for _ in range(attempts - 1):
            try:
                return self._settle_once(priced)
            except StaleSnapshot:
                if self.on_stale is not None:
                    self.on_stale()
                continue
        return self._settle_once(priced)

    def _settle_once(self, priced: Sequence[Row]) -> BatchResult:
        rows: list[Row] = list(priced)
        packages = self.catalog.packages
        if self._limited_for is not packages:
            self._limited = frozenset(pid for pid, pkg in packages.items() if pkg.limit_s is not None)
            self._limited_for = packages
        limited = self._limited
        pending = [i for i, p in enumerate(rows) if p[2] == "priced"]
        if not pending:
            return BatchResult(rows, [])
        prows = rows if len(pending) == len(rows) else [rows[i] for i in pending]
        dedupe_keys: list[DedupeKey] = [(p[1], p[0]) for p in prows]
        # (account, package, period) of every event its package may cover, first seen first
        allowance_keys: list[AllowanceKey] = list(
            dict.fromkeys([(p[1], p[12], p[31]) for p in prows if p[12] in limited and p[9]])
        )
        # Store round trip 1: dedupe priors and allowance used so far.
        priors, used_list, held = self.store.lookup(dedupe_keys, allowance_keys)
        used = dict(zip(allowance_keys, used_list, strict=True))

        # Sequential part: duplicates, allowances and the final charge of each new event.
        debits: list[Debit] = []
        add_debit = debits.append
        fresh: list[int] = []
        add_fresh = fresh.append
        replays: list[tuple[int, Prior]] = []
        limits: dict[AllowanceKey, int] = {}  # per allowance the batch covers from: its limit
        in_batch: dict[DedupeKey, int] = {}
        in_batch_get = in_batch.get
        for i, p, dkey, prior in zip(pending, prows, dedupe_keys, priors, strict=True):
            if prior is not None:
                if prior.source == p[26]:
                    replays.append((i, prior))
                else:
                    rows[i] = duplicate_row(p, prior.fingerprint != p[27])
                continue
            fp = p[27]
            first_fp = in_batch_get(dkey)
            if first_fp is not None:
                rows[i] = duplicate_row(p, first_fp != fp)
                continue
            in_batch[dkey] = fp
            billable = p[9]
            amount = p[14]
            pid = p[12]
            if pid is None or not billable or (pkg := packages.get(pid)) is None:
                outcome: Outcome = (0, amount, 0, 0)
                add_debit((dkey[0], dkey[1], amount, None, 0, fp, p[26], outcome, p[25]))
                add_fresh(i)
                continue
            thresholds = fue = 0
            allowance_key = None
            limit = pkg.limit_s
            if limit is None:
                covered = billable
            else:
                allowance_key = (dkey[0], pid, p[31])
                limits[allowance_key] = limit
                before = used[allowance_key]
                room = limit - before
                holds = held.get(allowance_key) if held else None
                if holds:
                    # Seconds the dialer holds for *other* calls are not this call's to cover
                    # (else a reserved call settled later would find them gone and be charged
                    # beyond the money held); this call's own hold goes with its debit.
                    if p[25] is not None:
                        holds.pop(p[25], None)
                    room -= sum(holds.values())
                covered = billable if billable <= room else max(0, room)
                used[allowance_key] = before + covered
                if pkg.allowance_s is not None:
                    # = _threshold_bits(before, before + covered, limit) for USAGE_THRESHOLDS
                    b100 = before * 100
                    a100 = b100 + covered * 100
                    thresholds = ((b100 < 50 * limit <= a100) | (b100 < 80 * limit <= a100) << 1
                                  | (b100 < 100 * limit <= a100) << 2)
            if covered == billable:
                amount = 0
            elif covered:
                rate = self.catalog.raw_rates[p[29]][p[30]]
                amount = call_charge(rate, p[28], covered)
            if pkg.allowance_s is None and covered < billable:
                fue = 1
            outcome = (covered, amount, fue, thresholds)
            add_debit((dkey[0], dkey[1], amount, allowance_key, covered, fp, p[26], outcome, p[25]))
            add_fresh(i)

        # Store round trip 2: apply atomically; the store decides balance-driven events.
        applied = self.store.apply(debits, limits=limits) if debits else []
        emitted: list[tuple[int, int, int]] = []
        seqs: dict[int, int] = {}
        for i, debit, (balance_after, bits, seq) in zip(fresh, debits, applied, strict=True):
            # = _final_row(p, outcome, balance_after), spelled out: no slicing per event
            p = rows[i]
            covered, amount, fue, thresholds = debit[7]
            billable = p[9]
            rows[i] = (p[0], p[1], "rated", p[3], p[4], p[5], p[6], p[7], p[8], billable, covered,
                       billable - covered, p[12], fue == 1, amount, balance_after, p[16], p[17],
                       p[18], p[19], p[20], p[21], p[22], p[23], p[24], p[25], p[26])
            if bits or thresholds:
                emitted.append((i, bits, thresholds))
            if seq:
                seqs[i] = seq
        for i, prior in replays:
            rows[i] = _final_row(rows[i], prior.outcome, prior.balance_after)
            if prior.seq:
                seqs[i] = prior.seq
            if prior.events or prior.outcome[3]:
                emitted.append((i, prior.events, prior.outcome[3]))
        wallet_events: list[WalletEvent] = []
        emitted.sort()
        for i, bits, thresholds in emitted:
            _wallet_events(rows[i], bits, thresholds, wallet_events)
        return BatchResult(rows, wallet_events, seqs)


class Rater:
    """Pricer and Settler in one: what `metering rate` and `metering run` use."""

    def __init__(self, catalog: Catalog, accounts: Mapping[str, Account], store: WalletStore) -> None:
        self.pricer = Pricer(catalog, accounts)
        self.settler = Settler(catalog, store)
        self.store = store

    @property
    def catalog(self) -> Catalog:
        return self.pricer.catalog

    @property
    def accounts(self) -> Mapping[str, Account]:
        return self.pricer.accounts

    def set_catalog(self, catalog: Catalog) -> None:
        self.pricer.set_catalog(catalog)
        self.settler.set_catalog(catalog)

    def set_accounts(self, accounts: Mapping[str, Account]) -> None:
        self.pricer.set_accounts(accounts)

    def rate_batch(self, items: Sequence[tuple[bytes, str]], now: datetime) -> BatchResult:
        """Rate `(raw_bytes, source)` pairs in order. `source` names the delivery (e.g.
        "partition:offset"); a redelivery of the same source re-emits the original row."""
        return self.settler.settle(self.pricer.price(items, now))


# The conflict fingerprint: 64 bits of BLAKE2b over the canonical event, little-endian (a
# content change goes unnoticed with odds of 2^-64; CRC32's 32 bits collided within ~70 k
# variants of one event). Persisted in dedupe entries: it must never change (a test pins one).
# This is BLAKE2b-64 before any data: a copy of it hashes like blake2b(data, digest_size=8)
# without setting up the parameter block again (~0.2 us less per event).
_FP_STATE = blake2b(digest_size=8)


def _as_utc(ts: datetime) -> datetime:
    """`ts` as its UTC instant, for the future check: comparing two datetimes with the same
    tzinfo skips the offset arithmetic (~0.5 us). A time that has no UTC datetime (near year 1
    or 9999) is returned as given: it compares as before, and its conversion for the period
    fails later, where it always did."""
    try:
        return ts.astimezone(UTC)
    except (ValueError, ArithmeticError):
        return ts


def _normalized(ev: MeterEvent, quantity: Decimal) -> MeterEvent:
    """The meter event with its quantity in one spelling: 1, 1.0, 1.50 and 15e-1 are two numbers."""
    return msgspec.structs.replace(ev, quantity=quantity.normalize(_EXACT))


def _final_row(p: Row, outcome: tuple[int, int, int, int], balance_after: int) -> Row:
    covered, amount, fue, _ = outcome
    billable = p[9]
    return (*p[:2], "rated", *p[3:10], covered, billable - covered, p[12], fue == 1, amount,
            balance_after, *p[16:27])


def duplicate_row(p: Row, conflict: bool) -> Row:
    return (p[0], p[1], "duplicate", p[3], None, None, conflict, None, None, 0, 0, 0, None, False,
            0, None, None, None, None, None, None, p[21], p[22], None, None, None, p[26])


def rejected_row(raw: bytes, source: str, rej: Rejection) -> Row:
    try:
        ids = msgspec.json.decode(raw, type=_Ids)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        ids = _Ids()
    event_id = ids.event_id if isinstance(ids.event_id, str) else None
    account_id = ids.account_id if isinstance(ids.account_id, str) else None
    kind = ids.kind if ids.kind in ("call", "sms", "meter") else None
    return (event_id, account_id, "rejected", kind, rej.reason, rej.detail, False, None, None,
            0, 0, 0, None, False, 0, None, None, None, None, None, None, None, None, None,
            None, None, source)


def _wallet_events(row: Row, bits: int, thresholds: int, out: list[WalletEvent]) -> None:
    account_id, event_id, balance = row[1], row[0], row[15]
    for bit, name in BALANCE_EVENTS:
        if bits & bit:
            out.append(WalletEvent(type=name, account_id=account_id, event_id=event_id, balance=balance))
    for n, pct in enumerate(USAGE_THRESHOLDS):
        if thresholds & (1 << n):
            out.append(WalletEvent(type="usage_threshold", account_id=account_id, event_id=event_id,
                                   balance=balance, package_id=row[12], percent=pct))

