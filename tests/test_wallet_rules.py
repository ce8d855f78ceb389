"""SPEC wallet rules on the reference (memory) store."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from rating.accounts import Account
from rating.engine import Rater
from rating.wallet import (
    BALANCE_EVENTS,
    EV_UNBLOCKED,
    AllowanceKey,
    Applied,
    Debit,
    DedupeKey,
    Held,
    MemoryWalletStore,
    Prior,
    StaleSnapshot,
)
from tests.helpers import NOW, account, call, make_rater, rate

GB_2MIN = ("+442071234567", 61)  # payg: 0.04 per call


def _types(result) -> list[str]:  # noqa: ANN001
    return [e.type for e in result.wallet_events]


def test_prepaid_block_once_then_unblock_on_credit() -> None:
    r = make_rater([account(plan="payg", balance="0.05")])
    res = rate(r, call("e1", *GB_2MIN))  # 0.05 -> 0.01
    assert _types(res) == []
    res = rate(r, call("e2", *GB_2MIN))  # 0.01 -> -0.03: blocked
    assert _types(res) == ["blocked"]
    assert res.wallet_events[0].balance == -30_000
    res = rate(r, call("e3", *GB_2MIN))  # still charged (the call happened), no second block
    assert _types(res) == [] and res.rows[0][15] == -70_000
    store = r.store
    balance, bits = store.credit("acc-1", 50_000)  # type: ignore[attr-defined]
    assert (balance, bits) == (-20_000, 0)  # still not above 0
    balance, bits = store.credit("acc-1", 20_000)  # type: ignore[attr-defined]
    assert (balance, bits) == (0, 0)  # exactly 0 is still blocked ("must be positive")
    balance, bits = store.credit("acc-1", 1)  # type: ignore[attr-defined]
    assert (balance, bits) == (1, EV_UNBLOCKED)


def test_balance_reaching_exactly_zero_blocks() -> None:
    r = make_rater([account(plan="payg", balance="0.04")])
    assert _types(rate(r, call("e1", *GB_2MIN))) == ["blocked"]


def test_one_outstanding_topup_until_settled() -> None:
    r = make_rater([account(plan="payg", balance="0.10", auto_topup={"threshold": "0.08", "amount": "5.00"})])
    assert _types(rate(r, call("e1", *GB_2MIN))) == ["topup_requested"]  # 0.10 -> 0.06
    assert _types(rate(r, call("e2", *GB_2MIN))) == []  # 0.06 -> 0.02, request still open
    r.store.credit("acc-1", 100_000, settles_topup=True)  # type: ignore[attr-defined]  # 0.12
    assert _types(rate(r, call("e3", *GB_2MIN))) == []  # 0.12 -> 0.08: not below 0.08
    assert _types(rate(r, call("e4", *GB_2MIN))) == ["topup_requested"]  # 0.08 -> 0.04


def test_topup_crossing_is_strict() -> None:
    r = make_rater([account(plan="payg", balance="0.12", auto_topup={"threshold": "0.08", "amount": "5.00"})])
    assert _types(rate(r, call("e1", *GB_2MIN))) == []  # 0.12 -> 0.08: not below 0.08
    assert _types(rate(r, call("e2", *GB_2MIN))) == ["topup_requested"]  # 0.08 -> 0.04


def test_low_balance_once_per_crossing() -> None:
    r = make_rater([account(plan="payg", balance="0.10", low_balance_alert="0.07")])
    assert _types(rate(r, call("e1", *GB_2MIN))) == ["low_balance"]  # 0.10 -> 0.06
    assert _types(rate(r, call("e2", *GB_2MIN))) == []  # 0.06 -> 0.02
    r.store.credit("acc-1", 1_000_000)  # type: ignore[attr-defined]  # 1.02
    assert _types(rate(r, call("e3", *GB_2MIN))) == []  # 1.02 -> 0.98
    assert _types(rate(r, call("e4", "+4490123456", 60))) == ["blocked", "low_balance"]  # -> -0.52


def test_several_events_from_one_charge_in_fixed_order() -> None:
    r = make_rater([account(plan="payg", balance="1.00", low_balance_alert="0.50",
                            auto_topup={"threshold": "0.80", "amount": "10.00"})])
    res = rate(r, call("e1", "+4490123456", 60))  # 1.00 -> -0.50
    assert _types(res) == ["blocked", "topup_requested", "low_balance"]
    assert {e.balance for e in res.wallet_events} == {-500_000}


def test_usage_threshold_once_each_per_period() -> None:
    r = make_rater([account()])  # europe: 600 s
    res = rate(r, call("e1", "+4930123456", 299), call("e2", "+4930123456", 1))  # 299 s, 300 s = 50 %
    assert [(e.type, e.event_id, e.percent) for e in res.wallet_events] == [("usage_threshold", "e2", 50)]
    res = rate(r, call("e3", "+4930123456", 600))  # crosses 80 and 100 in one call
    assert [(e.percent, e.package_id) for e in res.wallet_events] == [(80, "europe"), (100, "europe")]
    assert _types(rate(r, call("e4", "+4930123456", 600))) == []  # nothing left to cross
    # next period starts again
    res = rate(r, call("e5", "+4930123456", 300, started_at="2026-10-31T10:00:00Z"))
    assert [e.percent for e in res.wallet_events] == [50]


def test_postpaid_accrues_and_blocks_only_past_credit_limit() -> None:
    r = make_rater([
        account("acc-b", plan="business", billing="postpaid", balance="0", credit_limit="0.10"),
        account("acc-n", plan="business", billing="postpaid", balance="0"),
    ])
    # business has no us-domestic: US calls are charged 0.01/min
    assert _types(rate(r, call("e1", "+12125550100", 540, account_id="acc-b"))) == []  # owes 0.09
    assert _types(rate(r, call("e2", "+12125550100", 60, account_id="acc-b"))) == []  # owes 0.10: at, not past
    res = rate(r, call("e3", "+12125550100", 60, account_id="acc-b"))  # owes 0.11
    assert _types(res) == ["blocked"] and res.rows[0][15] == -110_000
    # without a credit limit a postpaid account is never blocked
    assert _types(rate(r, call("e4", "+4490123456", 600, account_id="acc-n"))) == []


def test_prepaid_account_opening_at_zero_is_blocked_without_an_event() -> None:
    r = make_rater([account(plan="payg", balance="0")])
    assert r.store.wallet("acc-1").blocked  # type: ignore[attr-defined]
    assert _types(rate(r, call("e1", *GB_2MIN))) == []


class _HoldingStore(MemoryWalletStore):
    """The memory store with a dialer: live holds of package seconds per reservation."""

    def __init__(self, accounts: Mapping[str, Account], held: Held) -> None:
        super().__init__(accounts)
        self.held = held

    def lookup(self, dedupe: Sequence[DedupeKey], allowances: Sequence[AllowanceKey]
               ) -> tuple[list[Prior | None], list[int], Held]:
        priors, used, _ = super().lookup(dedupe, allowances)
        return priors, used, {k: dict(v) for k, v in self.held.items() if k in allowances}


def test_calls_cover_only_what_other_calls_holds_leave() -> None:
    """starter's europe package: 600 s in November (anchor 1). Reservation R holds 420 s.
    An unreserved 300 s call covers 180 s (what R leaves); R's own 500 s call covers its 420
    plus nothing more (the 180 s are gone); in the same batch, a later unreserved call no
    longer sees R's hold (settled with its debit) but nothing is left to cover."""
    base = make_rater([account(plan="starter", home_country="US", balance="5.00")])
    store = _HoldingStore(base.accounts, {("acc-1", "europe", "2026-11-01"): {"R": 420}})
    r = Rater(base.catalog, base.accounts, store)
    rows = r.rate_batch([(call("u1", "+442071234567", 300), "p:1"),
                         (call("r1", "+442071234567", 500, reservation_id="R"), "p:2"),
                         (call("u2", "+442071234567", 60), "p:3")], NOW).rows
    assert [(row[0], row[10], row[11]) for row in rows] == [("u1", 180, 120), ("r1", 420, 120), ("u2", 0, 60)]
    assert store.allowance_used[("acc-1", "europe", "2026-11-01")] == 600


# ------------------------------------------------------------- thresholds hit exactly
# Every boundary of the wallet rules reached exactly, as a script of steps with the balance and
# wallet events each step must give. Run here on the reference store and, in
# test_store_equivalence.py, on the Redis store (apply.lua for calls, credit.lua for credits
# and fees): the random interleavings there almost never land on a boundary to the micro.
# GB fixed on payg: 61 s -> 120 s billable * 0.02/min = 0.04; US fixed on business: 0.01/min.
BOUNDARY_ACCOUNTS = [
    account("z-block", plan="payg", balance="0.04"),
    account("z-post", plan="business", billing="postpaid", balance="0", credit_limit="0.10"),
    account("z-topup", plan="payg", balance="0.12", auto_topup={"threshold": "0.08", "amount": "5.00"}),
    account("z-alert", plan="payg", balance="0.10", low_balance_alert="0.06"),
    account("z-post-alerts", plan="business", billing="postpaid", balance="0",
            auto_topup={"threshold": "0", "amount": "5.00"}, low_balance_alert="0"),
]
# (account, step, expected balance after, expected wallet events); step: ("call", to, seconds)
# or ("credit", kind, signed micros) with kind credit | topup (settles the request) | adjustment
BOUNDARY_STEPS: list[tuple[str, tuple[str, str, int], int, list[str]]] = [
    # prepaid: 0.04 - 0.04 lands on exactly 0: blocked; one micro above 0 unblocks
    ("z-block", ("call", *GB_2MIN), 0, ["blocked"]),
    ("z-block", ("credit", "credit", 1), 1, ["unblocked"]),
    # postpaid, credit limit 0.10: owing exactly 0.10 is at the limit, not past it
    ("z-post", ("call", "+12125550100", 540), -90_000, []),
    ("z-post", ("call", "+12125550100", 60), -100_000, []),
    ("z-post", ("call", "+12125550100", 60), -110_000, ["blocked"]),
    ("z-post", ("credit", "credit", 10_000), -100_000, ["unblocked"]),  # back to exactly the limit
    ("z-post", ("credit", "adjustment", -1), -100_001, ["blocked"]),  # a fee past it
    ("z-post", ("call", "+12125550100", 60), -110_001, []),  # already blocked: no second event
    # auto top-up at 0.08: landing on the threshold is not below it; leaving it from exactly
    # the threshold is a crossing
    ("z-topup", ("call", *GB_2MIN), 80_000, []),
    ("z-topup", ("call", *GB_2MIN), 40_000, ["topup_requested"]),
    # a plain credit does not settle the request: crossing again (by a call, then by a fee)
    # asks for nothing while it is open
    ("z-topup", ("credit", "credit", 100_000), 140_000, []),
    ("z-topup", ("call", *GB_2MIN), 100_000, []),
    ("z-topup", ("call", *GB_2MIN), 60_000, []),
    ("z-topup", ("credit", "credit", 60_000), 120_000, []),
    ("z-topup", ("credit", "adjustment", -80_000), 40_000, []),
    # the top-up settles it; then a fee landing on the threshold asks nothing, the next one does
    ("z-topup", ("credit", "topup", 80_000), 120_000, []),
    ("z-topup", ("credit", "adjustment", -40_000), 80_000, []),
    ("z-topup", ("credit", "adjustment", -40_000), 40_000, ["topup_requested"]),
    # low-balance alert at 0.06: the same two boundaries, by calls and by fees
    ("z-alert", ("call", *GB_2MIN), 60_000, []),
    ("z-alert", ("call", *GB_2MIN), 20_000, ["low_balance"]),
    ("z-alert", ("credit", "credit", 80_000), 100_000, []),
    ("z-alert", ("credit", "adjustment", -40_000), 60_000, []),
    ("z-alert", ("credit", "adjustment", -40_000), 20_000, ["low_balance"]),
    # postpaid: auto top-up and the alert are prepaid rules (README); 0 -> -0.01 crosses both
    ("z-post-alerts", ("call", "+12125550100", 60), -10_000, []),
    ("z-post-alerts", ("credit", "adjustment", -10_000), -20_000, []),
]


def run_boundary_steps(rater: Rater, credit: Callable[[str, str, int], tuple[int, int]]
                       ) -> list[tuple[str, int, list[str]]]:
    """(account, balance after, wallet event types) per BOUNDARY_STEPS step; `credit(account,
    kind, micros)` returns the store's (balance, EV_* bits)."""
    out: list[tuple[str, int, list[str]]] = []
    for n, (acc, step, _, _) in enumerate(BOUNDARY_STEPS):
        what, arg, number = step
        if what == "call":
            res = rate(rater, call(f"b{n}", arg, number, account_id=acc))
            assert res.rows[0][2] == "rated", res.rows[0]
            out.append((acc, res.rows[0][15], _types(res)))
        else:
            balance, bits = credit(acc, arg, number)
            out.append((acc, balance, [name for bit, name in BALANCE_EVENTS if bits & bit]))
    return out


def test_wallet_rule_boundaries_on_the_reference_store() -> None:
    r = make_rater(BOUNDARY_ACCOUNTS)
    store = r.store
    assert isinstance(store, MemoryWalletStore)

    def credit(acc: str, kind: str, micros: int) -> tuple[int, int]:
        return store.credit(acc, micros, settles_topup=kind == "topup")

    assert run_boundary_steps(r, credit) == [(acc, bal, ev) for acc, _, bal, ev in BOUNDARY_STEPS]


def test_a_batch_sent_round_again_is_told_and_then_settled_once() -> None:
    """A store that finds its lookup stale (a concurrent write) makes the settler look up and
    apply again; each round is reported (the workers count them: metering_stale_snapshot_total)."""
    r = make_rater([account(plan="payg", balance="1.00")])
    store = r.settler.store
    real_apply = store.apply
    refusals = [StaleSnapshot("holds test"), StaleSnapshot("holds test")]

    def apply(debits: Sequence[Debit], limits: Mapping[AllowanceKey, int] | None = None) -> list[Applied]:
        if refusals:
            raise refusals.pop()
        return real_apply(debits, limits)

    store.apply = apply  # type: ignore[method-assign]
    told: list[int] = []
    r.settler.on_stale = lambda: told.append(1)
    rec = rate(r, call("e1", "+12025550123", 60)).records()[0]
    assert (rec.status, rec.charge, rec.balance_after) == ("rated", 10_000, 990_000)
    assert len(told) == 2
