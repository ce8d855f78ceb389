"""Dialer authorization: may this account call this number now, and for how long?

SPEC "Dialer authorization". Pure decision logic: no I/O, integer micros only. The API
(`wallet_debiter.api`) reads the live state from Redis in one round trip and asks
`Authorizer.decide`; reservations (`wallet_debiter.reservations`) use the same decision and
`Decision.quote` to size a hold.

Rules, in the order they are checked:

1. The account's plan is missing from the catalog -> `unknown_account` (as the rating engine
   rejects such an account's events).
2. No destination prefix for `to` -> `unknown_destination`. A destination the plan's rate
   table has no prefix for (the engine's `no_rate`) is reported as `unknown_destination` too:
   the dialer's reason list has no `no_rate`, and for the dialer both mean "this number cannot
   be rated on this account, do not call it".
3. A `premium` destination on a plan with `allow_premium: false` -> `premium_not_allowed`.
4. The wallet's outbound block flag -> `blocked` (whatever the destination costs: the block is
   the wallet's decision, set and cleared by debits and credits).
5. `max_duration_s`: the longest call (at most 86 400 s, the longest call the pipeline rates)
   whose charge, computed exactly as the rating engine will compute it, fits the money
   available. The package that applies is the engine's (first plan package covering the
   destination's country and class; a domestic one only for the home country); its remaining
   allowance is `limit - used - held` for the current billing period, and the first billable
   seconds are covered, as the engine covers them. Money available: prepaid
   `balance - holds`; postpaid `credit_limit + balance - holds`, no limit without a
   `credit_limit`. A call costing nothing (covered by the allowance) is affordable whatever the
   money. Found by binary search: the charge never decreases with the duration, and the answer
   lands on an increment boundary by itself.
   `null` means no limit at all: an unlimited package without fair use, a free rate, or a
   postpaid account without a credit limit.
6. `max_duration_s < 1` (not even the first increment is affordable) -> `insufficient_balance`.

A refusal for a known account answers `max_duration_s: 0` and the live balance; an unknown
account answers the SPEC body (`max_duration_s` and `balance` null).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from rating.accounts import Account
from rating.catalog import Catalog, Package, Plan, Rate
from rating.engine import Pricer, Rejection, call_charge
from rating.money import format_micros
from rating.periods import period_start
from rating.pricing import billable_seconds

MAX_CALL_S: Final = 86_400
E164_RE: Final = re.compile(r"^\+[0-9]{1,15}$")

OK: Final = "ok"
BLOCKED: Final = "blocked"
INSUFFICIENT_BALANCE: Final = "insufficient_balance"
UNKNOWN_ACCOUNT: Final = "unknown_account"
UNKNOWN_DESTINATION: Final = "unknown_destination"
PREMIUM_NOT_ALLOWED: Final = "premium_not_allowed"
REASONS: Final = (OK, BLOCKED, INSUFFICIENT_BALANCE, UNKNOWN_ACCOUNT, UNKNOWN_DESTINATION,
                  PREMIUM_NOT_ALLOWED)

_EMPTY: Final[Mapping[str, int]] = {}


class WalletDataError(ValueError):
    """A wallet record that cannot be read (a corrupt hash: an operator problem, not input)."""


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


@dataclass(frozen=True, slots=True)
class WalletView:
    """What authorization needs to know about an account besides its live balance."""

    plan_id: str
    home_country: str
    billing: str  # prepaid | postpaid
    period_anchor_day: int
    credit_limit: int | None  # micros; postpaid only

    @classmethod
    def of(cls, account: Account | Mapping[Any, Any] | WalletView) -> WalletView:
        """From an `Account`, or a wallet hash as Redis holds it (`w:{A}`: plan, home_country,
        billing, period_anchor_day, credit_limit micros or ""; str or bytes keys and values)."""
        if isinstance(account, WalletView):
            return account
        if isinstance(account, Account):
            return cls(account.plan_id, account.home_country, account.billing,
                       account.period_anchor_day, account.credit_limit)

        def get(name: str) -> str | None:
            value = account.get(name)
            return _text(account.get(name.encode()) if value is None else value)

        try:
            plan = get("plan")
            home = get("home_country")
            billing = get("billing") or "prepaid"
            anchor = int(get("period_anchor_day") or "1")
            limit_text = get("credit_limit")
            limit = int(limit_text) if limit_text else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise WalletDataError(f"unreadable wallet record: {exc}") from None
        if not plan or home is None:
            raise WalletDataError("wallet record without plan or home_country")
        if billing not in ("prepaid", "postpaid") or not 1 <= anchor <= 28:
            raise WalletDataError(f"wallet record with billing {billing!r}, anchor day {anchor}")
        return cls(plan, home, billing, anchor, limit)


@dataclass(frozen=True, slots=True)
class Quote:
    """What a call of `duration_s` seconds would consume, as the engine will rate it."""

    duration_s: int
    billable_s: int
    covered_s: int  # package seconds the call uses
    held_s: int  # package seconds to hold (covered_s for a package with a limit, else 0)
    charge: int  # micros


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    max_duration_s: int | None  # None: no limit at all (or unknown account)
    balance: int | None  # live balance, micros (None: unknown account)
    # What sizing a reservation needs (None when refused before routing):
    rate: Rate | None = None
    package_id: str | None = None  # the package the call would use
    period: str | None = None  # its billing period (ISO date of the period start)
    limit_s: int | None = None  # the package's seconds per period (None: unlimited, no fair use)
    remaining_s: int | None = None  # package seconds left after use and holds
    available: int | None = None  # money available after holds (None: no limit)

    def as_json(self) -> dict[str, Any]:
        """The SPEC answer: allowed, reason, max_duration_s, balance (6-place string)."""
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "max_duration_s": self.max_duration_s,
            "balance": None if self.balance is None else format_micros(self.balance),
        }

    @property
    def allowance_field(self) -> str:
        """The `u:{A}` field of the package and period ("" when no package limit applies)."""
        if self.package_id is None or self.limit_s is None:
            return ""
        return f"{self.package_id}|{self.period}"

    def quote(self, duration_s: int) -> Quote:
        """Billable, covered seconds and charge of a call of `duration_s` on this route."""
        rate = self.rate
        if rate is None or duration_s <= 0:
            return Quote(max(duration_s, 0), 0, 0, 0, 0)
        billable = billable_seconds(rate, duration_s)
        if self.package_id is None:
            covered = held = 0
        elif self.limit_s is None:
            covered, held = billable, 0
        else:
            covered = held = min(billable, self.remaining_s or 0)
        return Quote(duration_s, billable, covered, held, call_charge(rate, duration_s, covered))


def unknown_account() -> Decision:
    return Decision(False, UNKNOWN_ACCOUNT, None, None)


def _is_free(rate: Rate) -> bool:
    return rate.connect_fee_pico == 0 and all(iv.per_minute_pico == 0 for iv in rate.intervals)


def max_duration(rate: Rate, remaining_s: int | None, available: int | None,
                 package: bool) -> int | None:
    """Longest affordable call in seconds (<= MAX_CALL_S), None when nothing limits it.

    `package`: a package covers the destination; `remaining_s` its seconds left (None:
    unlimited). `available`: money in micros (None: no limit).
    """
    if (package and remaining_s is None) or available is None or _is_free(rate):
        return None
    covered = remaining_s if package and remaining_s is not None else 0

    def affordable(d: int) -> bool:
        # call_charge skips at most the billable seconds: passing the remaining allowance is
        # exactly the engine's covered_s = min(billable_s, remaining).
        c = call_charge(rate, d, covered)
        return c == 0 or c <= available

    if affordable(MAX_CALL_S):
        return MAX_CALL_S
    lo, hi = 0, MAX_CALL_S  # affordable(lo), not affordable(hi); affordable(0): charge 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if affordable(mid):
            lo = mid
        else:
            hi = mid
    return lo


class Authorizer:
    """Decisions on one catalog; caches routes (per plan and number prefix) like the engine."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._pricer = Pricer(catalog, {})
        self._candidates: dict[tuple[str, str], tuple[str, ...]] = {}

    def candidate_packages(self, to: str) -> tuple[str, ...]:
        """Every catalog package that could cover `to` on some plan (what to read from
        `u:{A}` before the account's plan is known)."""
        dest = self.catalog.destinations.lookup(to[1:])
        if dest is None:
            return ()
        key = (dest.country, dest.dest_class)
        hit = self._candidates.get(key)
        if hit is None:
            hit = self._candidates[key] = tuple(
                p.package_id for p in self.catalog.packages.values()
                if dest.dest_class in p.classes and dest.country in p.countries
            )
        return hit

    def decide(
        self,
        account: Account | Mapping[Any, Any] | WalletView,
        *,
        balance: int,
        blocked: bool,
        to: str,
        now: datetime,
        held_money: int = 0,
        held_s: Mapping[str, int] | None = None,
        used_s: Mapping[str, int] | None = None,
    ) -> Decision:
        """Decide for a call to `to` (E.164) at `now` (aware).

        `balance`: live balance (micros); `blocked`: the wallet's outbound block flag;
        `held_money`: sum of active holds (micros); `held_s` / `used_s`: package seconds held
        by active holds / used so far, per package id, in the current billing period.
        """
        if not E164_RE.fullmatch(to):
            raise ValueError(f"to: expected E.164 (+ then 1..15 digits), got {to!r}")
        wallet = WalletView.of(account)
        plan: Plan | None = self.catalog.plans.get(wallet.plan_id)
        if plan is None:
            return unknown_account()
        try:
            route = self._pricer.route(plan, "outbound", to)
        except Rejection:  # unknown_destination or no_rate
            return Decision(False, UNKNOWN_DESTINATION, 0, balance)
        if route.dest_class == "premium" and not plan.allow_premium:
            return Decision(False, PREMIUM_NOT_ALLOWED, 0, balance)
        if blocked:
            return Decision(False, BLOCKED, 0, balance)
        rate = route.rate
        assert rate is not None  # outbound routes always carry a rate (else no_rate)

        package: Package | None = None
        for cand in route.packages:
            if cand.scope != "domestic" or route.country == wallet.home_country:
                package = cand
                break
        period = period_start(now, wallet.period_anchor_day).isoformat()
        limit: int | None = None
        remaining: int | None = None
        if package is not None:
            limit = package.limit_s
            if limit is not None:
                used = (used_s or _EMPTY).get(package.package_id, 0)
                held = (held_s or _EMPTY).get(package.package_id, 0)
                remaining = max(0, limit - used - held)

        available: int | None
        if wallet.billing == "postpaid":
            available = None if wallet.credit_limit is None else wallet.credit_limit + balance - held_money
        else:
            available = balance - held_money

        longest = max_duration(rate, remaining, available, package is not None)
        ok = longest is None or longest >= 1
        return Decision(
            allowed=ok,
            reason=OK if ok else INSUFFICIENT_BALANCE,
            max_duration_s=longest if ok else 0,
            balance=balance,
            rate=rate,
            package_id=None if package is None else package.package_id,
            period=period,
            limit_s=limit,
            remaining_s=remaining,
            available=available,
        )


def authorize(
    catalog: Catalog,
    account: Account | Mapping[Any, Any] | WalletView,
    *,
    balance: int,
    blocked: bool,
    to: str,
    now: datetime,
    held_money: int = 0,
    held_s: Mapping[str, int] | None = None,
    used_s: Mapping[str, int] | None = None,
) -> Decision:
    """One-off `Authorizer(catalog).decide(...)` (the API keeps an Authorizer per catalog)."""
    return Authorizer(catalog).decide(account, balance=balance, blocked=blocked, to=to, now=now,
                                      held_money=held_money, held_s=held_s, used_s=used_s)
