"""SPEC rating rules, one worked example each (numbers computed by hand in the comments)."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from rating.catalog import parse_catalog
from rating.periods import period_start
from tests.helpers import (
    account,
    call,
    catalog_dict,
    make_rater,
    meter,
    one,
    overlapping_packages_catalog,
    rate,
    records,
    sms,
)


def test_increments_60_60() -> None:
    r = make_rater([account(plan="payg")])
    # GB fixed 0.02/min, 60/60: 61 s -> 120 s billable -> 2 min * 0.02 = 0.04
    rec = one(r, call("e1", "+442071234567", 61))
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge) == (120, 0, 120, 40_000)
    assert (rec.country, rec.dest_class, rec.package_id) == ("GB", "fixed", None)
    # 1 s is still a whole first increment; 60 s exactly is one increment
    assert one(r, call("e2", "+442071234567", 1)).billable_s == 60
    assert one(r, call("e3", "+442071234567", 60)).billable_s == 60
    # unanswered: nothing billable, nothing charged
    rec = one(r, call("e4", "+442071234567", 0))
    assert (rec.billable_s, rec.charge) == (0, 0)


def test_increments_30_6_with_connect_fee() -> None:
    r = make_rater([account(plan="payg")])
    # GB mobile 0.08/min, connect 0.01, 30/6: 31 s -> 30 + 6 = 36 s -> 36*0.08/60 = 0.048 + 0.01
    rec = one(r, call("e1", "+447911123456", 31))
    assert (rec.billable_s, rec.charge) == (36, 58_000)
    # 10 s -> 30 s -> 0.04 + 0.01
    rec = one(r, call("e2", "+447911123456", 10))
    assert (rec.billable_s, rec.charge) == (30, 50_000)
    # 100 s -> 30 + ceil(70/6)*6 = 102 s -> 0.136 + 0.01
    rec = one(r, call("e3", "+447911123456", 100))
    assert (rec.billable_s, rec.charge) == (102, 146_000)


def test_increments_1_1_and_half_up_at_the_seventh_decimal() -> None:
    cat = catalog_dict()
    de = next(x for x in cat["rate_tables"]["standard"] if x["prefix"] == "49")
    de["per_minute"] = "0.0123445"
    r = make_rater([account(plan="payg")], cat)
    # 60 s at 0.0123445/min = 0.0123445 = 12344.5 micros -> half-up 12345 (banker's would give 12344)
    rec = one(r, call("e1", "+4930123456", 60))
    assert (rec.billable_s, rec.charge) == (60, 12_345)
    # 7 s -> 7 * 0.0123445 / 60 = 0.00144019166.. -> 1440 micros (rounded down below .5)
    rec = one(r, call("e2", "+4930123456", 7))
    assert (rec.billable_s, rec.charge) == (7, 1_440)
    # 43 s -> 0.00884689166.. -> 8847 (rounded up above .5)
    assert one(r, call("e3", "+4930123456", 43)).charge == 8_847


def test_rate_intervals_price_each_stretch() -> None:
    r = make_rater([account(plan="payg")])
    # PT mobile: first minute billed whole at 0.20, then per second at 0.10, connect 0.40
    # 75 s -> 60 + 15 = 75 s: 0.20 + 15*0.10/60 (0.025) + 0.40 = 0.625
    rec = one(r, call("e1", "+351912345678", 75))
    assert (rec.billable_s, rec.charge) == (75, 625_000)
    # 30 s -> the first interval is billed whole: 60 s, 0.20 + 0.40
    rec = one(r, call("e2", "+351912345678", 30))
    assert (rec.billable_s, rec.charge) == (60, 600_000)


def test_partial_package_coverage_with_connect_fee_and_usage_alerts() -> None:
    r = make_rater([account()])  # starter: europe package = 10 min = 600 s
    # DE fixed 1/1: 540 s all covered -> 90 % used (crosses 50 % and 80 %)
    res = r.rate_batch([(call("e1", "+4930123456", 540), "line:1")], now=_now())
    rec = res.records()[0]
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge, rec.package_id) == (540, 540, 0, 0, "europe")
    assert [(e.type, e.percent) for e in res.wallet_events] == [("usage_threshold", 50), ("usage_threshold", 80)]
    # GB mobile 30/6, 100 s -> 102 billable; 60 s left: covered 60, charged 42
    # 42 * 0.08 / 60 = 0.056 + connect 0.01 = 0.066
    res = r.rate_batch([(call("e2", "+447911123456", 100), "line:2")], now=_now())
    rec = res.records()[0]
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge) == (102, 60, 42, 66_000)
    assert [(e.type, e.percent) for e in res.wallet_events] == [("usage_threshold", 100)]
    # exhausted: package still named, nothing covered, full price incl. connect fee
    rec = one(r, call("e3", "+447911123456", 10))
    assert (rec.covered_s, rec.charged_s, rec.charge, rec.package_id) == (0, 30, 50_000, "europe")


def test_covered_seconds_are_the_first_and_charged_ones_priced_by_their_interval() -> None:
    r = make_rater([account()])
    one(r, call("e1", "+4930123456", 570))  # europe: 30 s left
    # PT mobile 75 s: covered 30 s (first interval), charged 30 s at 0.20 + 15 s at 0.10
    # = 0.10 + 0.025 + connect 0.40 = 0.525
    rec = one(r, call("e2", "+351912345678", 75))
    assert (rec.covered_s, rec.charged_s, rec.charge) == (30, 45, 525_000)


def test_fair_use_crossing_inside_one_call() -> None:
    r = make_rater([account()])  # us-domestic unlimited, fair use 10 min
    rec = one(r, call("e1", "+12125550100", 500))  # 540 s billable, covered
    assert (rec.covered_s, rec.charge, rec.fair_use_exceeded, rec.package_id) == (540, 0, False, "us-domestic")
    # 200 s -> 240 billable, 60 left: covered 60, charged 180 s at 0.01/min = 0.03
    rec = one(r, call("e2", "+12125550100", 200))
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge, rec.fair_use_exceeded) == (240, 60, 180, 30_000, True)
    rec = one(r, call("e3", "+12125550100", 60))
    assert (rec.covered_s, rec.charge, rec.fair_use_exceeded) == (0, 10_000, True)


def test_domestic_package_needs_home_country_and_premium_tollfree_never_covered() -> None:
    r = make_rater([account("acc-gb", home_country="GB"), account("acc-us")])
    # A GB account calling the US: us-domestic is domestic to US only -> charged
    rec = one(r, call("e1", "+12125550100", 60, account_id="acc-gb"))
    assert (rec.package_id, rec.charge) == (None, 10_000)
    # premium GB is never covered by europe
    rec = one(r, call("e2", "+449012345678", 60, account_id="acc-us"))
    assert (rec.dest_class, rec.package_id, rec.charge) == ("premium", None, 1_500_000)
    rec = one(r, call("e3", "+18005550100", 60, account_id="acc-us"))
    assert (rec.dest_class, rec.package_id, rec.charge) == ("tollfree", None, 0)


def test_period_boundary_by_anchor_day_and_allowance_per_period() -> None:
    r = make_rater([account(period_anchor_day=15)])
    before = one(r, call("e1", "+4930123456", 600, started_at="2026-11-14T23:59:59Z"))
    after = one(r, call("e2", "+4930123456", 600, started_at="2026-11-15T00:00:00Z"))
    # +01:00 at 00:30 on the 15th is still the 14th in UTC: previous period, already used up
    late = one(r, call("e3", "+4930123456", 60, started_at="2026-11-15T00:30:00+01:00"))
    assert before.period_start == date(2026, 10, 15) and before.covered_s == 600
    assert after.period_start == date(2026, 11, 15) and after.covered_s == 600
    assert late.period_start == date(2026, 10, 15) and late.covered_s == 0
    january = one(r, call("e4", "+4930123456", 1, started_at="2026-01-03T00:00:00Z"))
    assert january.period_start == date(2025, 12, 15)  # year boundary


def test_a_period_starting_before_1970_is_rejected_not_rated() -> None:
    """rated_usage.period_start is a ClickHouse Date (1970-01-01 and later): an event whose
    billing period starts earlier (a switch clock reset to the epoch, anchor day 28: period
    1969-12-28) is rejected invalid_field naming the field, never rated nor charged; the
    first storable period is rated."""
    r = make_rater([account(period_anchor_day=28)])
    epoch = one(r, call("epoch", "+442071234567", 60, started_at="1970-01-01T00:00:00Z"))
    assert (epoch.status, epoch.reason) == ("rejected", "invalid_field")
    assert epoch.detail == ("started_at: 1970-01-01T00:00:00+00:00 falls in the billing period "
                            "from 1969-12-28, before 1970-01-01 (the earliest period_start stored)")
    assert epoch.charge == 0 and epoch.balance_after is None
    first = one(r, call("first", "+442071234567", 60, started_at="1970-01-28T00:00:00Z"))
    assert first.status == "rated" and first.period_start == date(1970, 1, 28)


def test_inbound_calls_free_or_on_inbound_table() -> None:
    r = make_rater([account(), account("acc-b", plan="business", billing="postpaid", balance="0")])
    rec = one(r, call("e1", "+442071234567", 300, direction="inbound"))
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge) == (0, 0, 0, 0)
    rec = one(r, call("e2", "+18005550100", 61, direction="inbound", account_id="acc-b"))
    assert (rec.billable_s, rec.charged_s, rec.charge, rec.package_id) == (120, 120, 40_000, None)
    rec = one(r, call("e3", "+442071234567", 61, direction="inbound", account_id="acc-b"))
    assert (rec.billable_s, rec.charge) == (0, 0)


def test_sms_and_meters() -> None:
    r = make_rater([account(), account("acc-p", plan="payg")])
    assert one(r, sms("s1", "+15550002222", 3)).charge == 22_500  # 3 * 0.0075
    assert one(r, sms("s2", "+15550002222", 2, direction="inbound", account_id="acc-p")).charge == 2_000
    assert one(r, meter("m1", 1234567)).charge == 2_469_134  # 1234567 * 0.000002
    assert one(r, meter("m2", "12.5")).charge == 25
    assert one(r, meter("m3", "0.25")).charge == 1  # 0.5 micro -> half-up
    assert one(r, meter("m4", "0.24")).charge == 0
    # exact whatever the spelling of the number: 1.25e3 = 1250 tokens, 2500 micro-units...
    assert one(r, meter("m5", "1.25e3")).charge == one(r, meter("m6", "1250")).charge == 2_500
    assert one(r, meter("m7", "0.1")).quantity == Decimal("0.1")  # not the binary float 0.1000000000000000055...


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b'{"kind":"sms","event_id":"\xff\xfe","account_id":"acc-1"}', "invalid_json", None),
        (b"\xef\xbb\xbf{}", "invalid_json", None),
        (b'[1, 2]', "invalid_field", "(event)"),
        (b'{"kind":"call","event_id":"","account_id":"acc-1"}', "invalid_field", None),
        (b'{"kind":"call","event_id":"x","account_id":"acc-1","direction":"outbound","from":"+1555","started_at":"2026-11-10T10:00:00Z","duration_s":5}', "invalid_field", "to"),
        (call("x", "+4420", -1), "invalid_field", "duration_s"),
        (call("x", "+4420", 86_401), "invalid_field", "duration_s"),
        (call("x", "4420123", 5), "invalid_field", "to"),
        # a bare `$` in a regex also matches before a final newline: these must not pass
        (call("x", "+442071234567\n", 5), "invalid_field", "to"),
        (call("x", "+442071234567", 5, **{"from": "+1555\n"}), "invalid_field", "from"),
        (sms("x", "+442071234567\n"), "invalid_field", "to"),
        (call("x", "+4420", 5, started_at="2026-11-10T10:00:00"), "invalid_field", "started_at"),
        (call("x", "+4420", 5, direction="sideways"), "invalid_field", "direction"),
        # shifted to UTC it falls before year 1: datetime cannot hold it, the detail still names the field
        (call("x", "+4420", 5, started_at="0001-01-01T00:00:00+05:00"), "invalid_field", "started_at"),
        (sms("x", "+4420", 0), "invalid_field", "segments"),
        (meter("x", -1), "invalid_field", "quantity"),
        (meter("x", b'"1.5"'), "invalid_field", "quantity"),  # SPEC: a number, not a string
        (meter("x", b"true"), "invalid_field", "quantity"),
        (meter("x", b"null"), "invalid_field", "quantity"),
        (meter("x", b"[1]"), "invalid_field", "quantity"),
        (meter("x", b"1e13"), "invalid_field", "quantity"),
        # Decimal(18, 6) in ClickHouse: below 1e12 once rounded half-up to 6 places
        (meter("x", b"1000000000000"), "invalid_field", "quantity"),
        (meter("x", b"999999999999.9999995"), "invalid_field", "quantity"),
        (sms("x", "+15550002222", 256), "invalid_field", "segments"),
        (b'{"kind":"fax","event_id":"x","account_id":"acc-1"}', "unknown_kind", "kind"),
        # "kind" twice, both valid: not an unknown kind (the detail used to say "'sms' is not sms")
        (b'{"kind":"call","kind":"sms","event_id":"x","account_id":"acc-1"}', "invalid_field", "kind"),
        # bad bytes in a field the decoder skips are still bad input
        (call("x", "+4420", 5)[:-1] + b',"vendor":"\xff\xfe"}', "invalid_json", None),
        # nested deeper than the decoder goes (~1000): a reject, never a crash of the stream
        (call("x", "+4420", 5)[:-1] + b',"vendor":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}",
         "invalid_json", "(event)"),
        (call("x", "+4420", 5, account_id="nobody"), "unknown_account", "account_id"),
        (call("x", "+99912345", 5), "unknown_destination", "to"),
        (call("x", "+8610123456", 5), "no_rate", "to"),
        (meter("x", 5, name="gpu_seconds"), "unknown_meter", "meter"),
        (call("x", "+4420", 5, started_at="2026-11-21T12:00:01Z"), "future_timestamp", "started_at"),
        # before 1970 in UTC: rated_usage.period_start (Date) cannot hold the period; once rated
        # and debited, such a row stopped every ClickHouse insert of its batch, forever
        (call("x", "+4420", 5, started_at="1970-01-01T00:30:00+01:00"), "invalid_field", "started_at"),
        (sms("x", "+4420", sent_at="1960-05-01T00:00:00Z"), "invalid_field", "sent_at"),
        (meter("x", 5, at="1899-12-31T23:00:00-05:00"), "invalid_field", "at"),
    ],
)
def test_each_reject_reason_names_the_field(raw: bytes, reason: str, field: str | None) -> None:
    r = make_rater([account()])
    rec = one(r, raw)
    assert rec.status == "rejected"
    assert rec.reason == reason
    assert rec.detail
    if field is not None:
        assert rec.detail.startswith(f"{field}:"), rec.detail
    assert rec.charge == 0 and rec.balance_after is None


def test_route_rejects_say_where_the_number_is_missing() -> None:
    r = make_rater([account()])
    assert one(r, call("x", "+8610123456", 5)).detail == (
        "to: +8610123456 has no prefix in rate table 'standard' (plan 'starter')")
    assert one(r, call("y", "+99912345", 5)).detail == "to: +99912345 matches no destination prefix"


def test_quantity_and_charge_limits() -> None:
    """The largest storable quantity is rated; a meter event costing more than the per-event
    maximum (1e9 units: Redis scripts are exact below 2**53 micros) is rejected, not charged."""
    cat = catalog_dict()
    cat["plans"]["starter"]["meters"] = {"llm_tokens": "0.000002", "gpu_hours": "0.01"}
    r = make_rater([account()], cat)
    rec = one(r, meter("q1", b"999999999999.9999994"))
    assert rec.status == "rated" and rec.charge == 2_000_000_000_000  # 1999999.9999999999988 half-up
    assert one(r, meter("q2", 255, name="gpu_hours")).charge == 2_550_000
    assert one(r, sms("q3", "+15550002222", 255)).charge == 1_912_500  # 255 * 0.0075
    rec = one(r, meter("q4", b"100000000000", name="gpu_hours"))  # 1e11 * 0.01 = 1e9: the maximum
    assert rec.status == "rated" and rec.charge == 10**15
    rec = one(r, meter("q5", b"100000000000.0001", name="gpu_hours"))
    assert (rec.status, rec.reason) == ("rejected", "invalid_field")
    assert rec.detail == ("quantity: 100000000000.0001 gpu_hours would cost 1000000000.000001, "
                          "more than the per-event maximum 1000000000.000000")


def test_future_timestamp_limit_is_24_hours() -> None:
    r = make_rater([account()])
    # NOW is 2026-11-20T12:00Z: exactly +24 h is accepted, one second more is not
    assert one(r, call("a", "+4420", 5, started_at="2026-11-21T12:00:00Z")).status == "rated"
    assert one(r, call("b", "+4420", 5, started_at="2026-11-21T12:00:01Z")).reason == "future_timestamp"


def test_a_rejected_event_is_not_seen_and_a_corrected_resend_is_rated() -> None:
    r = make_rater([account(plan="payg")])
    assert one(r, call("e1", "+4420", -5)).status == "rejected"
    assert one(r, call("e1", "+442071234567", 61)).status == "rated"


def test_duplicates_are_never_charged_and_conflicts_are_flagged() -> None:
    r = make_rater([account(plan="payg")])
    first, same, changed = records(
        r, call("e1", "+442071234567", 61), call("e1", "+442071234567", 61), call("e1", "+442071234567", 999)
    )
    assert first.status == "rated" and first.balance_after == 100_000_000 - 40_000
    assert (same.status, same.conflict, same.charge) == ("duplicate", False, 0)
    assert (changed.status, changed.conflict, changed.charge) == ("duplicate", True, 0)
    # across batches too
    again = one(r, call("e1", "+442071234567", 61))
    assert again.status == "duplicate" and not again.conflict
    assert r.store.wallet("acc-1").balance == 100_000_000 - 40_000  # type: ignore[attr-defined]


def test_conflict_compares_content_not_bytes() -> None:
    r = make_rater([account(plan="payg")])
    doc = {"kind": "call", "event_id": "e1", "account_id": "acc-1", "direction": "outbound",
           "from": "+15550001111", "to": "+442071234567", "started_at": "2026-11-10T10:00:00Z",
           "duration_s": 61}
    first = json.dumps(doc).encode()  # ", " and ": " separators
    reordered = json.dumps(dict(reversed(list(doc.items()))), separators=(",", ":")).encode()
    same_instant = json.dumps({**doc, "started_at": "2026-11-10T15:30:00+05:30"}).encode()
    longer = json.dumps({**doc, "duration_s": 62}).encode()
    other_to = json.dumps({**doc, "to": "+442071234568"}).encode()
    rows = records(r, first, reordered, same_instant, longer, other_to)
    assert [(x.status, x.conflict) for x in rows] == [
        ("rated", False), ("duplicate", False), ("duplicate", False), ("duplicate", True), ("duplicate", True),
    ]


def test_conflict_is_seen_where_crc32_collided_and_a_quantity_has_one_spelling() -> None:
    """Two calls that differ (from, duration: 1.60 vs 28.20 of usage) but whose CRC32
    fingerprints collided (found by a birthday search over ~70 k variants): the fingerprint is
    64 bits of BLAKE2b now. A meter quantity written 1.5, 1.50 or 15e-1 is one number."""
    import zlib

    r = make_rater([account("B", plan="payg"), account("M", plan="starter")])
    base = ('{"event_id":"col","account_id":"B","kind":"call","direction":"outbound","from":"%s",'
            '"to":"+442071234567","started_at":"2026-11-16T10:00:00Z","duration_s":%d}')
    a, b = (base % ("+15550001706", 4800)).encode(), (base % ("+15550004880", 84600)).encode()
    from schemas.events import event_decoder

    enc = msgspec.msgpack.Encoder()
    canon = [enc.encode(event_decoder().decode(x)) for x in (a, b)]
    assert canon[0] != canon[1] and zlib.crc32(canon[0]) == zlib.crc32(canon[1])  # the collision
    first, second = records(r, a, b)
    assert first.status == "rated" and (second.status, second.conflict) == ("duplicate", True)

    m = '{"event_id":"q","account_id":"M","kind":"meter","meter":"llm_tokens","quantity":%s,"at":"2026-11-16T10:00:00Z"}'
    rows = records(r, *((m % q).encode() for q in ("1.5", "1.50", "15e-1", "1.500000000000000000000001", "1.6")))
    assert [(x.status, x.conflict) for x in rows] == [
        ("rated", False), ("duplicate", False), ("duplicate", False), ("duplicate", True), ("duplicate", True)]
    rows = records(r, *((m.replace('"q"', '"q2"') % q).encode() for q in ("100", "1E2", "100.0", "1e+2")))
    assert [x.conflict for x in rows] == [False] * 4


def test_a_redelivered_message_re_emits_its_original_row() -> None:
    r = make_rater([account(plan="payg")])
    raw = call("e1", "+442071234567", 61)
    first = r.rate_batch([(raw, "0:17")], now=_now())
    replay = r.rate_batch([(raw, "0:17")], now=_now())
    assert replay.rows == first.rows
    assert r.store.wallet("acc-1").balance == 100_000_000 - 40_000  # type: ignore[attr-defined]


def _now():  # noqa: ANN202
    from tests.helpers import NOW

    return NOW


def test_a_conflicting_repeat_is_counted_and_logged_with_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    """SPEC: a conflicting repeat is counted for alerting; the worker also logs which account
    and event, so an operator can find the switch that re-sent it."""
    from prometheus_client import REGISTRY

    from metering.workers.common import count_rows

    r = make_rater([account(plan="payg")])
    rows = rate(r, call("e1", "+442071234567", 61), call("e1", "+442071234567", 999)).rows
    before = REGISTRY.get_sample_value("metering_duplicates_total", {"conflict": "true"}) or 0
    with caplog.at_level("WARNING", logger="metering.worker"):
        counts = count_rows(rows)
    assert counts["duplicate"] == 1
    assert REGISTRY.get_sample_value("metering_duplicates_total", {"conflict": "true"}) == before + 1
    [record] = [x for x in caplog.records if "other content" in x.getMessage()]
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["account_id"], fields["event_id"]) == ("acc-1", "e1") and fields["source"] == rows[1][26]


def test_hot_path_shortcuts_agree_with_the_schema_and_the_fingerprint() -> None:
    """The fingerprint (persisted in dedupe entries: it must never change) is BLAKE2b-64,
    little-endian, of the event's msgpack form; the engine's own E.164 check is the schema's
    pattern, and the error reported is still the schema's first in the document."""
    import hashlib
    import re

    from rating.engine import P_FINGERPRINT
    from schemas.events import E164, event_decoder

    pattern = re.compile(E164.__metadata__[0].pattern)
    pricer = make_rater([account(plan="payg")]).pricer
    for number in ("+1", "+123456789012345", "+1234567890123456", "+", "", "1", "++1", "+12\n", "+12\r",
                   " +12", "+12 ", "+1\u00b2", "+\u0661\u0662", "+\uff11", "+12\x00", "+1a"):
        for field, raw in (("to", call("n", number, 5)), ("from", call("n", "+12025550123", 5, **{"from": number}))):
            row = pricer.price([(raw, "0:1")], _now())[0]
            refused = row[2] == "rejected" and row[4] == "invalid_field" and row[5].startswith(f"{field}:")
            assert refused != bool(pattern.search(number)), (field, number, row[2:6])
    raw = call("e1", "+442071234567", 61)
    row = make_rater([account(plan="payg")]).pricer.price([(raw, "0:1")], _now())[0]
    canon = msgspec.msgpack.encode(event_decoder().decode(raw))
    assert row[P_FINGERPRINT] == int.from_bytes(hashlib.blake2b(canon, digest_size=8).digest(), "little")
    assert row[P_FINGERPRINT] == 3914204990477460262
    body = ('{"kind":"call","event_id":"x","account_id":"acc-1","direction":"outbound","from":"+1555",'
            '"started_at":"2026-11-10T10:00:00Z",')
    bad_to_first = (body + '"to":"+44\\u0661","duration_s":-1}').encode()
    bad_duration_first = (body + '"duration_s":-1,"to":"+44\\u0661"}').encode()
    r = make_rater([account(plan="payg")])
    assert [(x.reason, (x.detail or "").split(":")[0]) for x in records(r, bad_to_first, bad_duration_first)] == [
        ("invalid_field", "to"), ("invalid_field", "duration_s")]


def test_a_partly_covered_charge_is_rounded_half_up_once() -> None:
    cat = catalog_dict()
    de = next(x for x in cat["rate_tables"]["standard"] if x["prefix"] == "49")
    de["per_minute"] = "0.0123445"
    r = make_rater([account()], cat)  # starter: europe 600 s covers DE
    one(r, call("e1", "+4930123456", 540))  # 60 s of the package left
    # 120 s: covered 60, charged 60 s at 0.0123445/min = 12344.5 micros -> half-up 12345
    # (priced from the covered split, not the fast path: a tie rounded down would be 12344)
    rec = one(r, call("e2", "+4930123456", 120))
    assert (rec.covered_s, rec.charged_s, rec.charge) == (60, 60, 12_345)


def test_sms_charge_is_rounded_half_up() -> None:
    cat = catalog_dict()
    cat["plans"]["payg"]["sms"]["outbound"] = "0.0000005"  # half a micro per segment
    r = make_rater([account(plan="payg")], cat)
    assert one(r, sms("s1", "+442071234567", 1)).charge == 1  # 0.5 micro -> 1
    assert one(r, sms("s2", "+442071234567", 2)).charge == 1  # 1.0
    assert one(r, sms("s3", "+442071234567", 3)).charge == 2  # 1.5 -> 2


def test_the_first_covering_package_in_plan_order_is_used() -> None:
    r = make_rater([account("acc-gb", home_country="GB"), account("acc-us")], overlapping_packages_catalog())
    # GB fixed 0.02/min 60/60, 150 s -> 180 billable.
    # Home GB: gb-home (first in the plan) covers 120, charged 60 s = 0.02
    rec = one(r, call("e1", "+442071234567", 150, account_id="acc-gb"))
    assert (rec.package_id, rec.covered_s, rec.charged_s, rec.charge) == ("gb-home", 120, 60, 20_000)
    # Home US: gb-home is domestic to GB only, so uk-intl (next, before europe): covers 60,
    # charged 120 s = 0.04
    rec = one(r, call("e2", "+442071234567", 150, account_id="acc-us"))
    assert (rec.package_id, rec.covered_s, rec.charged_s, rec.charge) == ("uk-intl", 60, 120, 40_000)
    # GB mobile is not in gb-home's classes: uk-intl for the GB account too (its 60 s are left)
    rec = one(r, call("e3", "+447911123456", 20, account_id="acc-gb"))
    assert (rec.package_id, rec.covered_s, rec.charge) == ("uk-intl", 30, 0)


def test_inbound_calls_never_use_packages() -> None:
    cat = catalog_dict()
    cat["rate_tables"]["inbound"].append({"prefix": "44", "per_minute": "0.0200", "increments": [60, 60]})
    r = make_rater([account("acc-b", plan="business", billing="postpaid", balance="0")], cat)
    # business has europe (covers GB fixed outbound); inbound from GB on the inbound table:
    # 61 s -> 120 s at 0.02 = 0.04, nothing covered
    rec = one(r, call("e1", "+442071234567", 61, direction="inbound", account_id="acc-b"))
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge, rec.package_id) == (120, 0, 120, 40_000, None)
    out = one(r, call("e2", "+442071234567", 61, account_id="acc-b"))
    assert (out.covered_s, out.charge, out.package_id) == (120, 0, "europe")  # outbound: covered


def test_usage_threshold_at_exactly_80_percent_once() -> None:
    r = make_rater([account()])  # europe: 600 s; 80 % = 480 s
    res = rate(r, call("e1", "+4930123456", 480))  # DE 1/1: 0 -> 480 s, reaches 50 % and exactly 80 %
    assert [(e.type, e.percent) for e in res.wallet_events] == [("usage_threshold", 50), ("usage_threshold", 80)]
    res = rate(r, call("e2", "+4930123456", 1))  # 480 -> 481: 80 % was reached already
    assert res.wallet_events == []


def test_a_finite_package_used_up_is_charged_without_fair_use() -> None:
    r = make_rater([account()])  # europe: 600 s, finite
    # DE 1/1, 660 s: covered 600, charged 60 s at 0.0123457/min = 12345.7 micros -> 12346;
    # fair_use_exceeded is for unlimited packages only
    rec = one(r, call("e1", "+4930123456", 660))
    assert (rec.covered_s, rec.charged_s, rec.charge, rec.package_id) == (600, 60, 12_346, "europe")
    assert rec.fair_use_exceeded is False


def test_an_unlimited_package_emits_no_usage_thresholds() -> None:
    r = make_rater([account()])  # us-domestic: unlimited, fair use 10 min
    # 300 s (50 % of fair use), then 360 s (past it: 300 covered, 60 charged at 0.01/min)
    res = rate(r, call("e1", "+12125550100", 300), call("e2", "+12125550100", 360))
    assert [(row[10], row[14], row[13]) for row in res.rows] == [(300, 0, False), (300, 10_000, True)]
    assert res.wallet_events == []  # usage_threshold is for finite packages


def test_a_package_shrunk_below_its_use_covers_nothing() -> None:
    r = make_rater([account()])
    one(r, call("e1", "+4930123456", 600))  # europe: all 600 s used
    cat = catalog_dict()
    cat["packages"]["europe"]["minutes"] = 5  # reloaded mid-period: 300 s, 600 already used
    r.set_catalog(parse_catalog(cat))
    # DE 60 s: nothing covered (not a negative cover), 60 s at 0.0123457/min -> 12346
    res = rate(r, call("e2", "+4930123456", 60))
    rec = res.records()[0]
    assert (rec.billable_s, rec.covered_s, rec.charged_s, rec.charge) == (60, 0, 60, 12_346)
    assert r.store.allowance_used[("acc-1", "europe", "2026-11-01")] == 600  # type: ignore[attr-defined]
    assert res.wallet_events == []


def test_period_start_uses_the_utc_day() -> None:
    # 00:30 on the 15th at +01:00 is 23:30 on the 14th UTC: the period from October 15th
    # (reached directly by `metering fees charge --on` with an offset; the engine converts first)
    plus_one = timezone(timedelta(hours=1))
    assert period_start(datetime(2026, 11, 15, 0, 30, tzinfo=plus_one), 15) == date(2026, 10, 15)
    assert period_start(datetime(2026, 11, 15, 1, 0, tzinfo=plus_one), 15) == date(2026, 11, 15)


def test_a_conflicting_repeat_in_a_later_batch_is_flagged() -> None:
    r = make_rater([account(plan="payg")])
    assert one(r, call("e1", "+442071234567", 61)).charge == 40_000
    # another delivery, in another batch, of e1 with another duration: not charged, conflict
    again = one(r, call("e1", "+442071234567", 999))
    assert (again.status, again.conflict, again.charge) == ("duplicate", True, 0)
    assert r.store.wallet("acc-1").balance == 100_000_000 - 40_000  # type: ignore[attr-defined]


def test_a_redelivered_message_re_emits_its_usage_threshold() -> None:
    r = make_rater([account()])  # europe: 600 s
    raw = call("e1", "+4930123456", 300)  # DE: 300 s covered = 50 %
    first = r.rate_batch([(raw, "0:5")], now=_now())
    assert [(e.type, e.percent) for e in first.wallet_events] == [("usage_threshold", 50)]
    replay = r.rate_batch([(raw, "0:5")], now=_now())  # the same delivery again (a rewind)
    assert replay.rows == first.rows and replay.wallet_events == first.wallet_events
    assert r.store.allowance_used[("acc-1", "europe", "2026-11-01")] == 300  # type: ignore[attr-defined]
