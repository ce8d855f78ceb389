"""Property tests (hypothesis) for the invariants the business relies on."""

from __future__ import annotations

import json
from collections import defaultdict
from fractions import Fraction
from math import ceil

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating.catalog import parse_catalog
from rating.money import PICO
from rating.pricing import billed_parts
from tests.helpers import NOW, account, call, catalog_dict, make_rater, meter, sms

NUMBERS = ["+12125550100", "+18005550100", "+442071234567", "+447911123456", "+4490123456",
           "+4930123456", "+351212345678", "+351912345678", "+81312345678", "+8610123456",
           "+99912345"]
ACCOUNTS = [
    account("a-us", balance="1.00", auto_topup={"threshold": "0.50", "amount": "10.00"}, low_balance_alert="0.80"),
    account("a-gb", home_country="GB", balance="0.30"),
    account("a-payg", plan="payg", balance="0.10"),
    account("a-post", plan="business", billing="postpaid", balance="0", credit_limit="0.20", period_anchor_day=20),
]
IDS = [a["id"] for a in ACCOUNTS]
DAYS = ["2026-10-18T08:00:00Z", "2026-10-25T23:59:59Z", "2026-11-01T00:00:00Z", "2026-11-19T12:00:00+05:00",
        "2026-11-20T00:00:00Z"]

event_st = st.one_of(
    st.builds(lambda n, acc, to, d, direction, day: call(f"c{n}", to, d, account_id=acc, direction=direction, started_at=day),
              st.integers(0, 40), st.sampled_from(IDS), st.sampled_from(NUMBERS),
              st.one_of(st.integers(0, 200), st.integers(0, 86_400)), st.sampled_from(["outbound", "outbound", "inbound"]),
              st.sampled_from(DAYS)),
    st.builds(lambda n, acc, seg: sms(f"s{n}", "+442071234567", seg, account_id=acc),
              st.integers(0, 10), st.sampled_from(IDS), st.integers(1, 5)),
    st.builds(lambda n, acc, q: meter(f"m{n}", q, account_id=acc),
              st.integers(0, 10), st.sampled_from(IDS), st.decimals(0, 10**7, places=3, allow_nan=False)),
    st.sampled_from([b"{bad", b"", call("x", "+4420", -1)]),
)
stream_st = st.lists(event_st, min_size=1, max_size=60)
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(stream: list[bytes], cuts: list[int] | None = None, sources: list[str] | None = None):  # noqa: ANN202
    r = make_rater(ACCOUNTS)
    items = [(raw, sources[i] if sources else f"line:{i}") for i, raw in enumerate(stream)]
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in (cuts or []))})
    rows, events = [], []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        res = r.rate_batch(items[lo:hi], NOW)
        rows.extend(res.rows)
        events.extend(res.wallet_events)
    return r, rows, events


@FAST
@given(stream_st)
def test_record_invariants(stream: list[bytes]) -> None:
    _, rows, _ = _run(stream)
    assert len(rows) == len(stream)
    for row, raw in zip(rows, stream, strict=True):
        billable, covered, charged, charge = row[9], row[10], row[11], row[14]
        assert billable == covered + charged
        assert covered >= 0 and charged >= 0 and charge >= 0
        if row[2] == "rated" and row[3] == "call" and billable:
            assert billable >= int(raw.split(b'"duration_s":')[1].split(b"}")[0])


@FAST
@given(stream_st)
def test_balance_change_equals_minus_sum_of_charges(stream: list[bytes]) -> None:
    r, rows, _ = _run(stream)
    charged: dict[str, int] = defaultdict(int)
    for row in rows:
        if row[2] == "rated":
            charged[row[1]] += row[14]
    opening = {a.account_id: a.balance for a in r.accounts.values()}
    for acc_id in IDS:
        balance = r.store.wallet(acc_id).balance  # type: ignore[attr-defined]
        assert balance == opening[acc_id] - charged[acc_id]


@FAST
@given(stream_st, st.lists(st.integers(0, 59), max_size=40), st.lists(st.integers(0, 10_000), max_size=6))
def test_replaying_with_duplicates_changes_nothing(stream: list[bytes], picks: list[int], cuts: list[int]) -> None:
    r1, rows1, events1 = _run(stream)
    extra = [stream[p % len(stream)] for p in picks]  # re-sent messages (new deliveries)
    r2, rows2, events2 = _run(stream + extra, cuts)
    assert rows2[: len(stream)] == rows1
    assert all(row[2] in ("duplicate", "rejected") and row[14] == 0 for row in rows2[len(stream):])
    assert events2 == events1
    for acc_id in IDS:
        assert r2.store.wallet(acc_id).balance == r1.store.wallet(acc_id).balance  # type: ignore[attr-defined]
    assert r2.store.allowance_used == r1.store.allowance_used  # type: ignore[attr-defined]


@FAST
@given(stream_st, st.lists(st.integers(0, 10_000), max_size=8))
def test_rating_does_not_depend_on_batch_split(stream: list[bytes], cuts: list[int]) -> None:
    _, whole, events_whole = _run(stream)
    _, split, events_split = _run(stream, cuts)
    assert split == whole and events_split == events_whole


@FAST
@given(stream_st, st.lists(st.integers(0, 10_000), max_size=4))
def test_redelivery_of_the_same_messages_re_emits_identical_rows(stream: list[bytes], cuts: list[int]) -> None:
    r, rows, events = _run(stream)
    sources = [f"line:{i}" for i in range(len(stream))]
    items = list(zip(stream, sources, strict=True))
    again = r.rate_batch(items, NOW)  # e.g. a consumer rewind after a crash
    assert again.rows == rows and again.wallet_events == events
    _, rows_fresh, _ = _run(stream)
    assert rows_fresh == rows


@FAST
@given(stream_st, st.lists(st.integers(0, 10_000), max_size=4))
def test_movements_are_numbered_per_wallet_and_their_balances_chain(stream: list[bytes], cuts: list[int]) -> None:
    """Every row that moved money gets its wallet's next seq (1, 2, 3... per account, however
    the stream is cut into batches); along seq each balance is the last minus the charge; a
    redelivery re-emits the same seqs."""
    r = make_rater(ACCOUNTS)
    items = [(raw, f"line:{i}") for i, raw in enumerate(stream)]
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    rows: list[tuple] = []  # type: ignore[type-arg]
    seqs: dict[int, int] = {}
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        res = r.rate_batch(items[lo:hi], NOW)
        seqs.update({lo + i: seq for i, seq in res.seqs.items()})
        rows.extend(res.rows)
    balance = {a: acc.balance for a, acc in r.accounts.items()}
    count: dict[str, int] = defaultdict(int)
    for i, row in enumerate(rows):
        moved = row[2] == "rated" and row[14] > 0
        assert (i in seqs) == moved
        if moved:
            count[row[1]] += 1
            balance[row[1]] -= row[14]
            assert seqs[i] == count[row[1]] and row[15] == balance[row[1]]
    again = r.rate_batch(items, NOW)  # everything redelivered at once
    assert dict(again.seqs) == seqs


@FAST
@given(stream_st)
def test_allowance_never_exceeds_the_package_per_period(stream: list[bytes]) -> None:
    r, rows, _ = _run(stream)
    covered: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in rows:
        if row[2] == "rated" and row[12] is not None:
            covered[(row[1], row[12], row[20].isoformat())] += row[10]
    for (acc, pkg_id, _period), seconds in covered.items():
        limit = r.catalog.packages[pkg_id].limit_s
        if limit is not None:
            assert seconds <= limit, (acc, pkg_id, seconds, limit)


CAT = parse_catalog(catalog_dict())


@given(st.sampled_from(sorted(CAT.raw_rates["standard"])), st.integers(0, 86_400), st.integers(0, 90_000))
@settings(max_examples=300, deadline=None)
def test_charge_matches_an_independent_fraction_oracle(prefix: str, duration: int, covered_req: int) -> None:
    """Recompute each call charge second by second with Fractions from the rate definition."""
    from rating.engine import call_charge

    rate = CAT.raw_rates["standard"][prefix]
    billable = sum(s for s, _ in billed_parts(rate, duration))
    covered = min(covered_req, billable)
    # oracle: walk the intervals, billing each interval's part rounded up to its increment
    total = Fraction(0)
    pos = 0  # billable seconds so far
    for iv in rate.intervals:
        if duration <= iv.from_s:
            break
        end = duration if iv.end_s is None else min(duration, iv.end_s)
        part = ceil((end - iv.from_s) / iv.increment_s) * iv.increment_s
        for _ in range(part):
            if pos >= covered:
                total += Fraction(iv.per_minute_pico, 60 * PICO)
            pos += 1
    assert pos == billable
    if billable - covered > 0:
        total += Fraction(rate.connect_fee_pico, PICO)
    micros = total * 1_000_000
    expected = int(micros) + (1 if micros - int(micros) >= Fraction(1, 2) else 0)
    assert call_charge(rate, duration, covered) == expected


@given(
    fp=st.integers(0, 2**64 - 1),
    source=st.text(min_size=1, max_size=40),
    covered=st.integers(0, 10**7),
    charge=st.integers(0, 2**70),
    fue=st.integers(0, 1),
    thresholds=st.integers(0, 7),
    opening=st.integers(-(2**70), 2**70),
)
def test_a_dedupe_entry_comes_back_exactly_as_stored(fp: int, source: str, covered: int, charge: int, fue: int,
                                                     thresholds: int, opening: int) -> None:
    """The memory store packs its entries into bytes; any value (beyond 64 bits too) comes
    back from lookup as it went into apply."""
    from rating.accounts import Account
    from rating.wallet import MemoryWalletStore, Prior

    store = MemoryWalletStore({"a": Account("a", "payg", "US", "prepaid", opening, 1)})
    outcome = (covered, charge, fue, thresholds)
    [(balance, bits, seq)] = store.apply([("a", "e1", charge, None, 0, fp, source, outcome, None)])
    assert balance == opening - charge
    assert seq == (1 if charge else 0)  # the wallet's first balance change
    priors, _, _ = store.lookup([("a", "e1"), ("a", "e2")], [])
    assert priors == [Prior(fp, source, outcome, balance, bits, seq), None]


SPEC_REASONS = {"invalid_json", "invalid_field", "unknown_kind", "unknown_account", "unknown_destination", "no_rate",
                "unknown_meter", "future_timestamp"}
_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=140), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.none(), max_size=2),
    st.sampled_from(["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2026-06-30T23:59:60Z", "x" * 129,
                     "+1234567890123456", "+4420\n", "\u0664\u0664", 86_400, 86_401, 255, 256, 0, -0.0, 1e-30, 1e30]),
)
_RAW_TOKENS = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"9" * 5000, b"[" * 2000 + b"]" * 2000,
                               b'"\\ud800"', b"01", b"1."])
_VALID = {
    "call": {"kind": "call", "event_id": "e1", "account_id": "a-us", "direction": "outbound", "from": "+15550001111",
             "to": "+442071234567", "started_at": "2026-11-19T10:00:00Z", "duration_s": 61, "reservation_id": None},
    "sms": {"kind": "sms", "event_id": "e1", "account_id": "a-us", "direction": "outbound", "from": "+15550001111",
            "to": "+442071234567", "sent_at": "2026-11-19T10:00:00+01:00", "segments": 2},
    "meter": {"kind": "meter", "event_id": "e1", "account_id": "a-us", "meter": "llm_tokens", "quantity": 1500,
              "at": "2026-11-19T10:00:00Z"},
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_VALID)), st.data())
def test_an_event_with_one_field_mutated_is_one_row_rated_or_rejected_naming_the_field(kind: str, data: st.DataObject) -> None:
    """Fuzz: a valid event with one field replaced (another type, a huge or negative number, an
    out-of-range time, a bad token, deep nesting) or removed gives exactly one row, never an
    exception: rated, or rejected with a SPEC reason whose detail names the field."""
    doc = dict(_VALID[kind])
    field = data.draw(st.sampled_from(sorted(doc)))
    how = data.draw(st.sampled_from(["value", "token", "drop"]))
    if how == "drop":
        del doc[field]
        raw = msgspec.json.encode(doc)
    elif how == "token":
        doc[field] = "@@"
        raw = msgspec.json.encode(doc).replace(b'"@@"', data.draw(_RAW_TOKENS))
    else:
        doc[field] = data.draw(_ODD_VALUES)
        raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    (rec,) = make_rater(ACCOUNTS).rate_batch([(raw, "line:1")], NOW).records()
    assert rec.status in ("rated", "rejected"), rec
    if rec.status == "rejected":
        assert rec.reason in SPEC_REASONS and rec.detail, rec
        if rec.reason != "invalid_json" and field not in ("kind", "reservation_id"):
            assert rec.detail.startswith(f"{field}:"), (field, rec)
