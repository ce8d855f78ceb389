"""Dialer authorization decisions (pure logic, SPEC "Dialer authorization"), with worked
examples and a cross-check against the rating engine's own charges."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating.accounts import Account, parse_accounts
from rating.catalog import Catalog, parse_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from tests.helpers import NOW, account, call, catalog_dict, overlapping_packages_catalog
from wallet_debiter.authorize import MAX_CALL_S, Authorizer, Decision, WalletView, authorize

GB_MOBILE = "+447700900123"  # 0.08/min, increments 30/6, connect 0.01; europe package
GB_FIXED = "+442071234567"  # 0.02/min 60/60; europe package
GB_PREMIUM = "+449012345678"  # 1.50/min 60/60, never covered
US_FIXED = "+12025550123"  # 0.01/min 60/60; us-domestic (unlimited, fair use 10 min)
US_TOLLFREE = "+18005550123"  # rate 0
PT_MOBILE = "+351912345678"  # connect 0.40, first minute 0.20 whole, then 0.10/min per second
JP_FIXED = "+81312345678"  # 0.06/min 60/60, no package
DE_FIXED = "+4930123456"  # 0.0123457/min, 1/1; europe package
CN_FIXED = "+8610123456"  # destination known, no rate in the standard table


def _catalog(**changes: Any) -> Catalog:
    return parse_catalog(catalog_dict(**changes))


CAT = _catalog()


def _acc(plan: str = "payg", **kw: Any) -> Account:
    return parse_accounts({"accounts": [account(plan=plan, **kw)]}, CAT)["acc-1"]


def _decide(acc: Account, to: str, balance: int, *, catalog: Catalog = CAT, blocked: bool = False,
            **kw: Any) -> Decision:
    return authorize(catalog, acc, balance=balance, blocked=blocked, to=to, now=NOW, **kw)


def test_worked_example_gb_mobile_balance_010() -> None:
    # charge(d) = 0.01 connect + billable * 0.08 / 60; billable 30, 36, 42, ... (30/6)
    # billable 66 -> 0.098000 <= 0.10; billable 72 -> 0.106000 > 0.10: 66 s.
    d = _decide(_acc(), GB_MOBILE, 100_000)
    assert d.as_json() == {"allowed": True, "reason": "ok", "max_duration_s": 66, "balance": "0.100000"}
    assert d.quote(66).charge == 98_000
    assert d.quote(67).charge == 106_000


def test_package_remaining_plus_money() -> None:
    # starter: europe package 10 min, 8 used -> 120 s covered; 0.10 then buys billable
    # seconds beyond: 0.01 + (b - 120) * 0.08/60 <= 0.10 -> b - 120 = 66 -> 186 s.
    acc = _acc("starter")
    d = _decide(acc, GB_MOBILE, 100_000, used_s={"europe": 480})
    assert (d.allowed, d.max_duration_s, d.package_id, d.remaining_s) == (True, 186, "europe", 120)
    # Seconds held by other reservations count as used: 60 left -> 60 + 66 = 126.
    d = _decide(acc, GB_MOBILE, 100_000, used_s={"europe": 480}, held_s={"europe": 60})
    assert d.max_duration_s == 126
    # Fully covered call, almost no money: the allowance alone (600 s at 60/60).
    d = _decide(acc, GB_FIXED, 1)
    assert (d.allowed, d.max_duration_s) == (True, 600)
    # Allowance exhausted: money only (0.02/min, 0.10 -> 5 min).
    d = _decide(acc, GB_FIXED, 100_000, used_s={"europe": 600})
    assert d.max_duration_s == 300


def test_holds_reduce_available_money() -> None:
    acc = _acc()
    assert _decide(acc, GB_MOBILE, 100_000, held_money=50_000).max_duration_s == 30
    d = _decide(acc, GB_MOBILE, 100_000, held_money=60_000)  # 0.04 left: not the first 30 s
    assert d.as_json() == {"allowed": False, "reason": "insufficient_balance", "max_duration_s": 0,
                           "balance": "0.100000"}


def test_cannot_afford_first_increment() -> None:
    d = _decide(_acc(), GB_MOBILE, 5_000)  # connect fee alone is 0.01
    assert (d.allowed, d.reason, d.max_duration_s) == (False, "insufficient_balance", 0)
    d = _decide(_acc(), GB_MOBILE, 10_000 + 666)  # 0.010666 < 0.010000 + 30 * 0.08 / 60
    assert d.reason == "insufficient_balance"
    assert _decide(_acc(), GB_MOBILE, 50_000).max_duration_s == 30


def test_premium() -> None:
    cat = catalog_dict()
    cat["plans"]["payg"]["allow_premium"] = False
    no_premium = parse_catalog(cat)
    d = _decide(_acc(), GB_PREMIUM, 100_000_000, catalog=no_premium)
    assert d.as_json() == {"allowed": False, "reason": "premium_not_allowed", "max_duration_s": 0,
                           "balance": "100.000000"}
    # Allowed elsewhere: 1.50/min, 100.00 -> 66 whole minutes.
    d = _decide(_acc(), GB_PREMIUM, 100_000_000)
    assert (d.allowed, d.max_duration_s) == (True, 66 * 60)
    # Premium is never covered by a package, even on a plan whose package covers GB.
    assert _decide(_acc("starter"), GB_PREMIUM, 1_500_000).max_duration_s == 60


def test_blocked() -> None:
    d = _decide(_acc(), GB_MOBILE, 100_000_000, blocked=True)
    assert d.as_json() == {"allowed": False, "reason": "blocked", "max_duration_s": 0,
                           "balance": "100.000000"}
    # Destination problems are reported before the block.
    assert _decide(_acc(), "+999123", 0, blocked=True).reason == "unknown_destination"


def test_postpaid_credit_limit() -> None:
    acc = _acc("business", billing="postpaid", credit_limit="1.00", balance="-0.50")
    # JP fixed 0.06/min (1000 micros/s): 0.50 of credit left -> 500 s -> 480 (60/60).
    d = _decide(acc, JP_FIXED, -500_000)
    assert d.as_json() == {"allowed": True, "reason": "ok", "max_duration_s": 480, "balance": "-0.500000"}
    assert _decide(acc, JP_FIXED, -500_000, held_money=100_000).max_duration_s == 360
    assert _decide(acc, JP_FIXED, -980_000).reason == "insufficient_balance"  # 0.02 < one minute


def test_no_limit_is_null() -> None:
    # Postpaid without a credit limit.
    acc = _acc("business", billing="postpaid", balance="-1000.00")
    d = _decide(acc, JP_FIXED, -1_000_000_000)
    assert d.as_json() == {"allowed": True, "reason": "ok", "max_duration_s": None, "balance": "-1000.000000"}
    # Unlimited package without fair use: whatever was used, whatever the balance. The catalog
    # refuses one (fair_use_minutes is required); Package still allows it, so it is checked here.
    unlimited = parse_catalog(catalog_dict())
    unlimited.packages["us-domestic"] = dataclasses.replace(unlimited.packages["us-domestic"], fair_use_s=None)
    d = _decide(_acc("starter"), US_FIXED, 1, catalog=unlimited, used_s={"us-domestic": 10**9})
    assert (d.allowed, d.max_duration_s) == (True, None)
    # A free destination.
    assert _decide(_acc(), US_TOLLFREE, 1).max_duration_s is None


def test_fair_use_and_domestic_scope() -> None:
    starter = _acc("starter")  # home US: us-domestic, fair use 10 min
    assert _decide(starter, US_FIXED, 50_000, used_s={"us-domestic": 600}).max_duration_s == 300
    assert _decide(starter, US_FIXED, 50_000, used_s={"us-domestic": 540}).max_duration_s == 360
    # Home GB: the domestic package does not apply to US calls.
    gb = _acc("starter", home_country="GB")
    d = _decide(gb, US_FIXED, 50_000)
    assert (d.package_id, d.max_duration_s) == (None, 300)


def test_rate_intervals() -> None:
    # 0.40 connect + 0.20 (first minute, whole) + 0.10/min per second: 1.00 -> 60 + 240 s.
    d = _decide(_acc(), PT_MOBILE, 1_000_000)
    assert d.max_duration_s == 300
    assert d.quote(300).charge == 1_000_000 and d.quote(301).charge > 1_000_000


def test_per_second_rounding() -> None:
    # DE 0.0123457/min per second: charge rounded once, half-up, exactly like the engine.
    d = _decide(_acc(), DE_FIXED, 1_000)
    assert d.quote(d.max_duration_s or 0).charge <= 1_000 < d.quote((d.max_duration_s or 0) + 1).charge


def test_cap_at_longest_call() -> None:
    assert _decide(_acc(), US_FIXED, 10**12).max_duration_s == MAX_CALL_S


def test_unknown_destination_and_no_rate() -> None:
    for to in ("+999123", CN_FIXED):  # no destination; destination without a rate (no_rate)
        d = _decide(_acc(), to, 100_000)
        assert d.as_json() == {"allowed": False, "reason": "unknown_destination", "max_duration_s": 0,
                               "balance": "0.100000"}


def test_plan_missing_from_catalog_is_unknown_account() -> None:
    wallet = {"plan": "gone", "home_country": "US", "billing": "prepaid", "period_anchor_day": "1",
              "credit_limit": ""}
    d = authorize(CAT, wallet, balance=5, blocked=False, to=GB_MOBILE, now=NOW)
    assert d.as_json() == {"allowed": False, "reason": "unknown_account", "max_duration_s": None,
                           "balance": None}


def test_wallet_hash_as_input() -> None:
    # The fields RedisWalletStore.wallet() returns (strings; credit_limit "" is none).
    wallet = {"plan": "payg", "home_country": "US", "billing": "prepaid", "period_anchor_day": "1",
              "credit_limit": "", "balance": "100000"}
    assert authorize(CAT, wallet, balance=100_000, blocked=False, to=GB_MOBILE, now=NOW).max_duration_s == 66
    raw = {k.encode(): v.encode() for k, v in wallet.items()}
    assert WalletView.of(raw) == WalletView.of(_acc())


def test_bad_number_is_an_error() -> None:
    for to in ("447700900123", "+", "+1234567890123456", "+44 20", ""):
        with pytest.raises(ValueError):
            _decide(_acc(), to, 1)


def test_period_of_allowance() -> None:
    acc = _acc("starter", period_anchor_day=25)
    d = authorize(CAT, acc, balance=1, blocked=False, to=GB_FIXED, now=datetime(2026, 11, 20, tzinfo=UTC))
    assert (d.period, d.allowance_field) == ("2026-10-25", "europe|2026-10-25")


# ------------------------------------------------------------------- against the engine

_NUMBERS = [GB_MOBILE, GB_FIXED, US_FIXED, PT_MOBILE, DE_FIXED, JP_FIXED, GB_PREMIUM]
_ACCOUNTS = {
    "payg": account("payg", plan="payg"),
    "starter-us": account("starter-us", plan="starter"),
    "starter-gb": account("starter-gb", plan="starter", home_country="GB"),
}
_ACCS = parse_accounts({"accounts": list(_ACCOUNTS.values())}, CAT)
_AUTH = Authorizer(CAT)


def _engine_charge(acc: Account, to: str, duration: int, used: dict[str, int]) -> int:
    store = MemoryWalletStore(_ACCS)
    for package_id, seconds in used.items():
        store.allowance_used[(acc.account_id, package_id, "2026-11-01")] = seconds
    rater = Rater(CAT, _ACCS, store)
    row = rater.rate_batch([(call("x", to, duration, account_id=acc.account_id), "t:1")], NOW).records()[0]
    assert row.status == "rated", row
    return int(row.charge)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    acc_id=st.sampled_from(sorted(_ACCOUNTS)),
    to=st.sampled_from(_NUMBERS),
    balance=st.integers(min_value=1, max_value=3_000_000),
    held=st.integers(min_value=0, max_value=200_000),
    used=st.integers(min_value=0, max_value=700),
)
def test_max_duration_is_exactly_what_the_engine_charges(acc_id: str, to: str, balance: int,
                                                         held: int, used: int) -> None:
    acc = _ACCS[acc_id]
    used_s = {"europe": used, "us-domestic": used}
    d = _AUTH.decide(acc, balance=balance, blocked=False, to=to, now=NOW, held_money=held, used_s=used_s)
    available = balance - held
    longest = d.max_duration_s
    assert longest is not None
    if d.allowed:
        charge = _engine_charge(acc, to, longest, used_s)
        assert charge == d.quote(longest).charge
        assert charge == 0 or charge <= available
    else:
        assert d.reason == "insufficient_balance" and longest == 0
    if longest < MAX_CALL_S:
        over = _engine_charge(acc, to, longest + 1, used_s)
        assert over > 0 and over > available


def test_exactly_one_affordable_second_is_allowed() -> None:
    # DE 0.0123457/min per second: 1 s = 205.761.. micros -> 206 (half-up); 2 s -> 412
    d = _decide(_acc(), DE_FIXED, 206)
    assert (d.allowed, d.reason, d.max_duration_s) == (True, "ok", 1)
    assert _decide(_acc(), DE_FIXED, 411).max_duration_s == 1
    d = _decide(_acc(), DE_FIXED, 205)
    assert (d.allowed, d.reason, d.max_duration_s) == (False, "insufficient_balance", 0)


def test_allowance_used_beyond_the_package_leaves_nothing_not_less() -> None:
    # starter's europe: 600 s, 700 used (the package was made smaller mid-period): 0 left,
    # as when exactly used up -> money only, 0.10 at 0.02/min 60/60 = 300 s
    d = _decide(_acc("starter"), GB_FIXED, 100_000, used_s={"europe": 700})
    assert (d.remaining_s, d.max_duration_s) == (0, 300)
    assert d.quote(300).charge == 100_000


def test_the_first_covering_package_in_plan_order_decides() -> None:
    cat = parse_catalog(overlapping_packages_catalog())
    gb = parse_accounts({"accounts": [account(plan="starter", home_country="GB")]}, cat)["acc-1"]
    us = parse_accounts({"accounts": [account(plan="starter")]}, cat)["acc-1"]
    # GB fixed 0.02/min 60/60, balance 0.02 buys one minute beyond the package:
    # home GB: gb-home (2 min) -> 180 s; home US: uk-intl (1 min, before europe's 10) -> 120 s
    d = _decide(gb, GB_FIXED, 20_000, catalog=cat)
    assert (d.package_id, d.remaining_s, d.max_duration_s) == ("gb-home", 120, 180)
    d = _decide(us, GB_FIXED, 20_000, catalog=cat)
    assert (d.package_id, d.remaining_s, d.max_duration_s) == ("uk-intl", 60, 120)


def test_a_covered_call_is_allowed_whatever_the_money() -> None:
    # starter's europe covers GB fixed (600 s unused); holds exceed the balance: available
    # 0.05 - 0.06 < 0, yet the package alone allows 600 s (charge 0)
    d = _decide(_acc("starter"), GB_FIXED, 50_000, held_money=60_000)
    assert (d.allowed, d.reason, d.available, d.max_duration_s) == (True, "ok", -10_000, 600)
    assert d.quote(600).charge == 0 and d.quote(601).charge > 0
