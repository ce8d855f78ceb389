"""ClickHouse sink against a real embedded ClickHouse (chDB) in a temporary directory.

No mocks and no skipping: if chdb or clickhouse-connect is missing, these tests fail.
chDB hosts one engine per process, so each test closes its sink before the next one opens a
different directory (the fixture does it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from metering.report import queries
from metering.storage.clickhouse_sink import (
    ClickHouseSink,
    PackageAllowance,
    datetime_to_ms,
    micros_to_decimal,
    split_sql,
)
from schemas.records import Movement, RatedRecord, WalletEvent
from tests.chdb_http import clickhouse_dsn
from tests.helpers import NOW, account, make_rater
from tests.helpers import call as rate_call

pytestmark = pytest.mark.integration

DB = "metering"
TOPIC = "usage.events"
NOV = date(2026, 11, 1)
NOV15 = date(2026, 11, 15)
CET = timezone(timedelta(hours=1))
RATED_AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# The hand-made dataset. Money in integer micros, as the engine produces it.


def call(
    account: str,
    event: str,
    to: str,
    country: str,
    dest_class: str,
    *,
    billable: int,
    covered: int = 0,
    package: str | None = None,
    charge: int = 0,
    balance: int = 0,
    direction: str = "outbound",
    period: date = NOV,
    at: datetime | None = None,
    fair_use_exceeded: bool = False,
) -> RatedRecord:
    return RatedRecord(
        event_id=event,
        account_id=account,
        status="rated",
        kind="call",
        country=country,
        dest_class=dest_class,
        billable_s=billable,
        covered_s=covered,
        charged_s=billable - covered,
        package_id=package,
        fair_use_exceeded=fair_use_exceeded,
        charge=charge,
        balance_after=balance,
        direction=direction,
        from_number="+12025550199",
        to_number=to,
        at=at or datetime(2026, 11, 3, 10, 0, tzinfo=CET),
        period_start=period,
        plan_id="starter",
        catalog_version="2026-11-01",
    )


def sms(account: str, event: str, segments: int, charge: int, balance: int) -> RatedRecord:
    return RatedRecord(
        event_id=event,
        account_id=account,
        status="rated",
        kind="sms",
        country="GB",
        dest_class="mobile",
        charge=charge,
        balance_after=balance,
        direction="outbound",
        from_number="+12025550199",
        to_number="+447700900123",
        at=datetime(2026, 11, 4, 9, 30, tzinfo=UTC),
        period_start=NOV,
        plan_id="starter",
        catalog_version="2026-11-01",
        quantity=Decimal(segments),
    )


def meter(account: str, event: str, quantity: str, charge: int, balance: int, name: str = "llm_tokens") -> RatedRecord:
    return RatedRecord(
        event_id=event,
        account_id=account,
        status="rated",
        kind="meter",
        meter=name,
        quantity=Decimal(quantity),
        charge=charge,
        balance_after=balance,
        at=datetime(2026, 11, 5, 0, 0, tzinfo=UTC),
        period_start=NOV,
        plan_id="starter",
        catalog_version="2026-11-01",
    )


def dataset() -> list[RatedRecord]:
    return [
        # acc-1, period 2026-11-01
        call(
            "acc-1",
            "e1",
            "+442071234567",
            "GB",
            "fixed",
            billable=120,
            covered=120,
            package="europe",
        ),
        call(
            "acc-1",
            "e2",
            "+447700900123",
            "GB",
            "mobile",
            billable=90,
            covered=60,
            package="europe",
            charge=50_000,
        ),  # 0.01 connect + 30 s * 0.08/60
        call(
            "acc-1",
            "e3",
            "+12025550100",
            "US",
            "fixed",
            billable=60,
            covered=60,
            package="us-domestic",
        ),
        call("acc-1", "e7", "+12025550199", "US", "fixed", billable=0, direction="inbound"),
        sms("acc-1", "e4", segments=2, charge=15_000, balance=9_935_000),
        meter("acc-1", "e5", "1500", charge=3_000, balance=9_932_000),
        meter("acc-1", "e6", "0.5", charge=1, balance=9_931_999, name="stt_seconds"),  # one micro
        # acc-2 reuses event_id "e1": event ids are unique per account only
        call(
            "acc-2",
            "e1",
            "+449012345678",
            "GB",
            "premium",
            billable=120,
            charge=3_000_000,
            balance=-1_000_000,
            period=NOV15,
            at=datetime(2026, 11, 16, 8, 0, tzinfo=UTC),
        ),
        # not usage: must not reach rated_usage
        RatedRecord(event_id="bad", account_id="acc-1", status="rejected", reason="invalid_field"),
        RatedRecord(event_id="e1", account_id="acc-1", status="duplicate", kind="call", charge=999),
    ]


def movements() -> list[Movement]:
    t = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    return [
        Movement(
            movement_id="m1",
            account_id="acc-1",
            at=t,
            type="credit",
            amount=59_000_000,
            balance_after=59_000_000,
            reference="op:initial",
        ),
        Movement(
            movement_id="m2",
            account_id="acc-1",
            at=t,
            type="adjustment",
            amount=-49_000_000,
            balance_after=10_000_000,
            reference="fee:2026-11-01:starter",
        ),
        Movement(
            movement_id="m3",
            account_id="acc-1",
            at=t,
            type="debit",
            amount=-50_000,
            balance_after=9_950_000,
            reference="e2",
            seq=3,
        ),
        # an adjustment that is not a fee is not recurring
        Movement(
            movement_id="m4",
            account_id="acc-1",
            at=t,
            type="adjustment",
            amount=-1,
            balance_after=9_949_999,
            reference="goodwill",
            seq=4,  # applied last, although listed with the others' time: the report's balance
        ),
        Movement(
            movement_id="m5",
            account_id="acc-2",
            at=datetime(2026, 11, 15, tzinfo=UTC),
            type="adjustment",
            amount=-49_000_000,
            balance_after=2_000_000,
            reference="fee:2026-11-15",
        ),
    ]


def rejected() -> list[tuple[bytes, str, str | None, str, int, int, datetime]]:
    at = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)
    return [
        (b"\xff{not json", "invalid_json", None, TOPIC, 0, 41, at),
        (b'{"kind":"fax"}', "unknown_kind", "kind", TOPIC, 1, 7, at),
    ]


ALLOWANCES = [
    PackageAllowance("europe", 1000),
    PackageAllowance("us-domestic", None, 5000),
]


def write_all(sink: ClickHouseSink) -> None:
    records = dataset()
    sink.insert_rated(
        records,
        topic=TOPIC,
        partitions=[0] * len(records),
        offsets=list(range(100, 100 + len(records))),
        rated_at=RATED_AT,
    )
    sink.insert_movements(movements())
    sink.insert_rejected(rejected())
    sink.insert_wallet_events(
        [
            WalletEvent(type="blocked", account_id="acc-2", event_id="e1", balance=-1_000_000),
            WalletEvent(
                type="usage_threshold",
                account_id="acc-1",
                event_id="e1",
                balance=9_950_000,
                package_id="europe",
                percent=50,
            ),
        ],
        at=datetime(2026, 11, 16, 8, 0, tzinfo=UTC),
    )
    sink.replace_package_allowances(
        ALLOWANCES, catalog_version="2026-11-01", loaded_at=datetime(2026, 11, 1, tzinfo=UTC)
    )


# Expected view contents for the dataset, written out by hand.
D = Decimal
EXPECTED_CATEGORIES = {
    # (account, period, category, meter): (events, quantity, billable_s, billable_minutes, charge)
    ("acc-1", NOV, "calls", None): (4, D("4"), 270, 4.5, D("0.050000")),
    ("acc-1", NOV, "sms", None): (1, D("2"), 0, 0.0, D("0.015000")),
    # one row per meter: 1500 tokens and 0.5 s of speech are not added together
    ("acc-1", NOV, "meters", "llm_tokens"): (1, D("1500"), 0, 0.0, D("0.003000")),
    ("acc-1", NOV, "meters", "stt_seconds"): (1, D("0.5"), 0, 0.0, D("0.000001")),
    ("acc-1", NOV, "recurring", None): (1, D("1"), 0, 0.0, D("49.000000")),
    ("acc-2", NOV15, "calls", None): (1, D("1"), 120, 2.0, D("3.000000")),
    ("acc-2", NOV15, "recurring", None): (1, D("1"), 0, 0.0, D("49.000000")),
}
EXPECTED_PACKAGES = {
    # (account, period, package): (calls, used_s, used_minutes, overage_s, unlimited,
    #                              allowance_minutes, remaining_minutes, fair_use_remaining)
    ("acc-1", NOV, "europe"): (2, 180, 3.0, 30, 0, 1000, 997.0, None),
    ("acc-1", NOV, "us-domestic"): (1, 60, 1.0, 0, 1, None, None, 4999.0),
}
EXPECTED_DESTINATIONS = {
    # (country, class): (calls, minutes, revenue) -- outbound calls only
    ("GB", "fixed"): (1, 2.0, D("0")),
    ("GB", "mobile"): (1, 1.5, D("0.05")),
    ("US", "fixed"): (1, 1.0, D("0")),
    ("GB", "premium"): (1, 2.0, D("3")),
}


def categories(sink: ClickHouseSink) -> dict[tuple[str, date, str, str | None], tuple[object, ...]]:
    rows = sink.client.query(
        f"SELECT account_id, period_start, category, meter, events, quantity, billable_s, billable_minutes,"
        f" charge FROM {sink.database}.v_usage_by_category"
    ).result_rows
    out = {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in rows}
    assert len(out) == len(rows), "a category appears twice"
    return out


def packages(sink: ClickHouseSink) -> dict[tuple[str, date, str], tuple[object, ...]]:
    rows = sink.client.query(
        f"SELECT account_id, period_start, package_id, calls, used_s, used_minutes, overage_s,"
        f" unlimited, allowance_minutes, remaining_minutes, fair_use_remaining_minutes"
        f" FROM {sink.database}.v_package_usage"
    ).result_rows
    out = {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}
    assert len(out) == len(rows)
    return out


def destinations(sink: ClickHouseSink) -> dict[tuple[str, str], tuple[object, ...]]:
    rows = sink.client.query(
        f"SELECT country, dest_class, calls, minutes, revenue FROM {sink.database}.v_top_destinations"
    ).result_rows
    out = {(r[0], r[1]): tuple(r[2:]) for r in rows}
    assert len(out) == len(rows)
    return out


def scalar(sink: ClickHouseSink, sql: str) -> object:
    return sink.client.query(sql.format(db=sink.database)).result_rows[0][0]


@pytest.fixture(params=["chdb", "http"])
def sink(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClickHouseSink]:
    """Embedded chDB, and the `http://` DSN path of a server: clickhouse-connect's HTTP
    client against tests/chdb_http.py (the same engine in another process), so the
    inserts, views and analysts' queries below run unchanged through both."""
    # closed at the end (chDB: one engine per process; free it for the next test's directory)
    with clickhouse_dsn(request.param, tmp_path) as dsn, ClickHouseSink(dsn) as s:
        s.ensure_schema()
        yield s


# ---------------------------------------------------------------------------------------------


def test_views_return_hand_computed_numbers(sink: ClickHouseSink) -> None:
    write_all(sink)
    assert categories(sink) == EXPECTED_CATEGORIES
    assert packages(sink) == EXPECTED_PACKAGES
    assert destinations(sink) == EXPECTED_DESTINATIONS
    # only the 8 rated records, not the rejected one nor the duplicate
    assert scalar(sink, "SELECT count() FROM {db}.rated_usage FINAL") == 8
    assert scalar(sink, "SELECT count() FROM {db}.rated_usage WHERE event_id = 'bad'") == 0


def test_report_counts_the_latest_period_and_spend_includes_fees(sink: ClickHouseSink) -> None:
    """`metering report` on the hand-computed data set plus an October call of acc-1: package
    minutes are those of each account's latest period (not October's added to November's, nor
    acc-1 counted once per period), and spend is usage + recurring fees."""
    write_all(sink)
    october = call("acc-1", "oct", "+442071234567", "GB", "fixed", billable=600, covered=600, package="europe",
                   period=date(2026, 10, 1), at=datetime(2026, 10, 20, 9, 0, tzinfo=UTC))
    sink.insert_rated([october], topic=TOPIC, partitions=[0], offsets=[99], rated_at=RATED_AT)
    results = {title: sink.client.query(sql).result_rows for title, sql in queries(sink.database)}
    assert results["Package minutes used (each account's latest billing period)"] == [
        # package, accounts, used_min, exhausted, over_fair_use (before: europe 2 accounts, 13 min)
        ("europe", 1, 3.0, 0, 0), ("us-domestic", 1, 1.0, 0, 0)]
    assert results["Top accounts by spend (usage + fees)"] == [
        # account, plan, events, usage, fees, spend (fees were missing before), balance after the
        # movement with the highest seq (acc-2's movements predate seq: no balance, not a 0)
        ("acc-2", "starter", 1, D("3"), D("49"), D("52"), None),
        ("acc-1", "starter", 8, D("0.068001"), D("49"), D("49.068001"), D("9.949999")),
    ]
    # An account with a fee and no usage yet: its plan comes from the fee's reference (it was
    # blank). acc-1's first December event is an SMS: its latest period has no package minutes,
    # so November's 3 minutes are no longer shown as "latest".
    sink.insert_movements([Movement(movement_id="m9", account_id="acc-3", at=datetime(2026, 11, 5, tzinfo=UTC),
                                    type="adjustment", amount=-99_000_000, balance_after=1_000_000,
                                    reference="fee:2026-11-05:business", seq=1)])
    december = sms("acc-1", "dec", 1, 10_000, 9_939_999)
    december = msgspec.structs.replace(december, at=datetime(2026, 12, 2, tzinfo=UTC), period_start=date(2026, 12, 1))
    sink.insert_rated([december], topic=TOPIC, partitions=[0], offsets=[100], rated_at=RATED_AT)
    results = {title: sink.client.query(sql).result_rows for title, sql in queries(sink.database)}
    assert results["Package minutes used (each account's latest billing period)"] == []
    assert results["Top accounts by spend (usage + fees)"][0] == (
        "acc-3", "business", 0, D("0"), D("99"), D("99"), D("1"))


@pytest.mark.parametrize("optimize", [False, True], ids=["unmerged", "after-OPTIMIZE-FINAL"])
def test_replayed_batches_count_once_in_every_view(sink: ClickHouseSink, optimize: bool) -> None:
    write_all(sink)
    write_all(sink)  # the same batches again: a crash before the Kafka commit, or a replay
    write_all(sink)
    # the rows really are there three times (no insert dedup is relied on) ...
    if not optimize:
        assert scalar(sink, "SELECT count() FROM {db}.rated_usage") == 24
    else:
        for table in ("rated_usage", "wallet_movements", "rejected_events", "wallet_events"):
            sink.client.command(f"OPTIMIZE TABLE {sink.database}.{table} FINAL")
    # ... but every view and every FINAL read counts them once
    assert categories(sink) == EXPECTED_CATEGORIES
    assert packages(sink) == EXPECTED_PACKAGES
    assert destinations(sink) == EXPECTED_DESTINATIONS
    assert scalar(sink, "SELECT count() FROM {db}.rated_usage FINAL") == 8
    assert scalar(sink, "SELECT count() FROM {db}.wallet_movements FINAL") == 5
    assert scalar(sink, "SELECT count() FROM {db}.rejected_events FINAL") == 2
    assert scalar(sink, "SELECT count() FROM {db}.wallet_events FINAL") == 2


def test_different_row_with_same_key_replaces(sink: ClickHouseSink) -> None:
    write_all(sink)
    # e2 re-rated later with a different charge: replaces the first row
    rerated = call(
        "acc-1",
        "e2",
        "+447700900123",
        "GB",
        "mobile",
        billable=90,
        covered=30,
        package="europe",
        charge=90_000,
    )
    sink.insert_rated(
        [rerated],
        topic=TOPIC,
        partitions=[3],
        offsets=[999],
        rated_at=RATED_AT + timedelta(hours=1),
    )
    # an *older* version arriving late (stale replay) must not win: rated_at is the version
    stale = call(
        "acc-1",
        "e2",
        "+447700900123",
        "GB",
        "mobile",
        billable=90,
        covered=90,
        package="europe",
        charge=7,
    )
    sink.insert_rated(
        [stale], topic=TOPIC, partitions=[0], offsets=[1], rated_at=RATED_AT - timedelta(days=1)
    )

    assert scalar(sink, "SELECT count() FROM {db}.rated_usage FINAL WHERE account_id='acc-1'") == 7
    row = sink.client.query(
        f"SELECT charge, covered_s, source_partition, source_offset FROM {sink.database}.rated_usage"
        " FINAL WHERE account_id = 'acc-1' AND event_id = 'e2'"
    ).result_rows
    assert row == [(D("0.090000"), 30, 3, 999)]
    cats = categories(sink)
    assert cats[("acc-1", NOV, "calls", None)] == (4, D("4"), 270, 4.5, D("0.090000"))
    assert packages(sink)[("acc-1", NOV, "europe")][:4] == (2, 150, 2.5, 60)
    assert destinations(sink)[("GB", "mobile")] == (1, 1.5, D("0.09"))

    # same key in the other tables: the last write with the same key wins
    m = Movement(
        movement_id="m3",
        account_id="acc-1",
        at=datetime(2026, 11, 1, tzinfo=UTC),
        type="debit",
        amount=-90_000,
        balance_after=9_910_000,
        reference="e2",
    )
    sink.insert_movements([m])
    assert sink.client.query(
        f"SELECT amount, balance_after FROM {sink.database}.wallet_movements FINAL"
        " WHERE movement_id = 'm3'"
    ).result_rows == [(D("-0.090000"), D("9.910000"))]
    assert scalar(sink, "SELECT count() FROM {db}.wallet_movements FINAL") == 5


def test_money_stays_exact(sink: ClickHouseSink) -> None:
    n = 1000
    records = [
        meter("acc-m", f"u{i}", "0.5", charge=1, balance=-i)
        for i in range(n)  # 1 micro each
    ] + [
        meter("acc-m", "tenth", "1", charge=100_000, balance=0),  # 0.1
        meter("acc-m", "fifth", "1", charge=200_000, balance=0),  # 0.2 (0.1 + 0.2 == 0.3 here)
        meter(
            "acc-m", "big", "1", charge=999_999_999_999_999_999, balance=-999_999_999_999_999_999
        ),
    ]
    sink.insert_rated(
        records, topic=TOPIC, partitions=[0] * len(records), offsets=list(range(len(records)))
    )
    assert scalar(
        sink, "SELECT sum(charge) FROM {db}.rated_usage FINAL WHERE event_id LIKE 'u%'"
    ) == D("0.001000")
    assert (
        scalar(
            sink,
            "SELECT sum(charge) = toDecimal64('0.3', 6) FROM {db}.rated_usage FINAL"
            " WHERE event_id IN ('tenth', 'fifth')",
        )
        == 1
    )
    # the extremes of Decimal(18, 6) survive the round trip digit for digit
    assert sink.client.query(
        f"SELECT charge, balance_after FROM {sink.database}.rated_usage FINAL WHERE event_id = 'big'"
    ).result_rows == [(D("999999999999.999999"), D("-999999999999.999999"))]
    assert scalar(
        sink, "SELECT balance_after FROM {db}.rated_usage FINAL WHERE event_id = 'u5'"
    ) == D("-0.000005")
    cat = categories(sink)[("acc-m", NOV, "meters", "llm_tokens")]
    assert cat[4] == D("999999999999.999999") + D("0.3") + D("0.001")
    assert cat[1] == D("500") + 3  # quantities: 1000 x 0.5 + 3 x 1

    # nothing that would lose precision is accepted
    with pytest.raises(ValueError):
        micros_to_decimal(10**18)
    with pytest.raises(TypeError):
        micros_to_decimal(0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sink.insert_movements(
            [
                Movement(
                    movement_id="x",
                    account_id="a",
                    at=RATED_AT,
                    type="credit",
                    amount=1.5,  # type: ignore[arg-type]
                    balance_after=0,
                    reference="r",
                )
            ]
        )


def test_timestamps_are_utc_whatever_the_offset(sink: ClickHouseSink) -> None:
    rec = call(
        "acc-t",
        "t1",
        "+12025550100",
        "US",
        "fixed",
        billable=60,
        at=datetime(2026, 11, 30, 23, 30, 0, 123456, tzinfo=timezone(timedelta(hours=-5))),
    )
    naive = call(
        "acc-t", "t2", "+12025550100", "US", "fixed", billable=60, at=datetime(2026, 11, 30, 23, 30)
    )  # naive = UTC
    sink.insert_rated([rec, naive], topic=TOPIC, partitions=[0, 0], offsets=[1, 2])
    rows = sink.client.query(
        f"SELECT event_id, toString(started_at), toUnixTimestamp64Milli(started_at), toDate(started_at)"
        f" FROM {sink.database}.rated_usage FINAL WHERE account_id = 'acc-t' ORDER BY event_id"
    ).result_rows
    assert rows == [
        ("t1", "2026-12-01 04:30:00.123", datetime_to_ms(rec.at), date(2026, 12, 1)),  # type: ignore[arg-type]
        ("t2", "2026-11-30 23:30:00.000", 1796081400000, date(2026, 11, 30)),
    ]
    # clickhouse-connect hands DateTime64('UTC') back as naive UTC datetimes
    assert scalar(
        sink, "SELECT started_at FROM {db}.rated_usage FINAL WHERE event_id = 't2'"
    ) == datetime(2026, 11, 30, 23, 30)


def test_rejected_raw_bytes_round_trip(sink: ClickHouseSink) -> None:
    sink.insert_rejected(rejected())
    sink.insert_rejected(rejected())
    rows = sink.client.query(
        f"SELECT raw, reason, detail, topic, partition, offset FROM {sink.database}.rejected_events"
        " FINAL ORDER BY partition, offset",
        column_formats={"raw": "bytes"},
    ).result_rows
    assert rows == [
        (b"\xff{not json", "invalid_json", None, TOPIC, 0, 41),
        (b'{"kind":"fax"}', "unknown_kind", "kind", TOPIC, 1, 7),
    ]


def test_package_allowances_latest_load_wins(sink: ClickHouseSink) -> None:
    write_all(sink)
    # new catalog: europe shrinks to 500 min, us-domestic becomes finite 100 min
    sink.replace_package_allowances(
        [PackageAllowance("europe", 500), PackageAllowance("us-domestic", 100)],
        catalog_version="2026-12-01",
        loaded_at=datetime(2026, 12, 1, tzinfo=UTC),
    )
    got = packages(sink)
    assert got[("acc-1", NOV, "europe")][4:7] == (0, 500, 497.0)
    assert got[("acc-1", NOV, "us-domestic")][4:] == (0, 100, 99.0, None)
    # and back to unlimited: a NULL size must win over the older finite one
    sink.replace_package_allowances(
        ALLOWANCES, catalog_version="2027-01-01", loaded_at=datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert packages(sink) == EXPECTED_PACKAGES
    # a package missing from package_allowances: usage shown, sizes unknown (NULL)
    sink.insert_rated(
        [
            call(
                "acc-9",
                "x1",
                "+351211234567",
                "PT",
                "fixed",
                billable=60,
                covered=60,
                package="iberia",
            )
        ],
        topic=TOPIC,
        partitions=[0],
        offsets=[5],
    )
    assert packages(sink)[("acc-9", NOV, "iberia")] == (1, 60, 1.0, 0, 0, None, None, None)


def test_ensure_schema_is_idempotent_and_database_configurable(tmp_path: Path) -> None:
    with ClickHouseSink(f"chdb://{tmp_path / 'ch'}", database="billing_test") as s:
        s.ensure_schema()
        s.ensure_schema()
        write_all(s)
        s.ensure_schema()  # re-applying over data changes nothing
        names = [
            r[0]
            for r in s.client.query(
                "SELECT name FROM system.tables WHERE database = 'billing_test' ORDER BY name"
            ).result_rows
        ]
        assert names == [
            "package_allowances",
            "rated_usage",
            "rejected_events",
            "v_package_usage",
            "v_top_destinations",
            "v_usage_by_category",
            "wallet_events",
            "wallet_movements",
        ]
        assert categories(s) == EXPECTED_CATEGORIES
        assert scalar(s, "SELECT count() FROM system.tables WHERE database = 'metering'") == 0
    with pytest.raises(ValueError):
        ClickHouseSink("chdb://memory", database="x; DROP TABLE y")


def test_embedded_engine_merges_less_eagerly_and_a_server_keeps_its_own_settings(sink: ClickHouseSink) -> None:
    """chDB merges on the pipeline's cores: ensure_schema sets merge_selector_base on the tables
    written every batch (and on nothing else); through an http:// DSN the tables keep the
    server's settings."""
    tuned = {
        name: "merge_selector_base = 10" in engine
        for name, engine in sink.client.query(
            f"SELECT name, engine_full FROM system.tables WHERE database = '{sink.database}' "
            "AND engine LIKE '%MergeTree'").result_rows
    }
    embedded = sink.dsn.startswith("chdb://")
    assert tuned == {"rated_usage": embedded, "wallet_movements": embedded, "rejected_events": embedded,
                     "wallet_events": embedded, "package_allowances": False}
    sink.ensure_schema()  # idempotent: re-applied on every start
    write_all(sink)
    assert categories(sink) == EXPECTED_CATEGORIES


def test_insert_rated_checks_lineage_lengths_and_skips_empty(sink: ClickHouseSink) -> None:
    with pytest.raises(ValueError):
        sink.insert_rated(dataset(), topic=TOPIC, partitions=[0], offsets=[0])
    assert sink.insert_rated([], topic=TOPIC, partitions=[], offsets=[]) == 0
    only_rejects = [RatedRecord(event_id="b", account_id="a", status="rejected")]
    assert sink.insert_rated(only_rejects, topic=TOPIC, partitions=[0], offsets=[0]) == 0


def test_every_row_the_engine_rates_fits_the_tables(sink: ClickHouseSink) -> None:
    """The engine's rows go to rated_usage as they are (the pipeline's insert_rated_rows). A CDR
    stamped at the epoch (a switch clock reset) on an anchor-28 account fell in a billing period
    from 1969-12-28, which `period_start Date` cannot hold: it was rated and debited, then its
    batch's insert failed ("Unable to create native array for column `period_start`") on every
    replay, stopping the pipeline. It is rejected now; the first storable period is stored."""
    rater = make_rater([account(period_anchor_day=28)])
    events = [
        rate_call("epoch", "+442071234567", 60, started_at="1970-01-01T00:00:00Z"),
        rate_call("first", "+442071234567", 60, started_at="1970-01-28T00:00:00Z"),
        rate_call("late", "+442071234567", 60, started_at="1970-01-27T23:59:59.999-00:01"),
    ]
    rows = rater.rate_batch([(e, f"0:{i}") for i, e in enumerate(events)], NOW).rows
    assert [(r[0], r[2]) for r in rows] == [("epoch", "rejected"), ("first", "rated"), ("late", "rated")]
    assert sink.insert_rated_rows(rows, topic=TOPIC) == 2
    got = sink.client.query(
        f"SELECT event_id, period_start, toString(started_at) FROM {sink.database}.rated_usage FINAL"
        " ORDER BY event_id"
    ).result_rows
    assert got == [("first", date(1970, 1, 28), "1970-01-28 00:00:00.000"),
                   ("late", date(1970, 1, 28), "1970-01-28 00:00:59.999")]


def test_split_sql_ignores_semicolons_in_strings_and_comments() -> None:
    text = "-- a; comment\nSELECT 'a;b' AS `x;y`; /* c; */ SELECT 2;\n-- trailing only\n"
    assert split_sql(text) == ["SELECT 'a;b' AS `x;y`", "SELECT 2"]


def test_chdb_directory_is_locked_by_the_process_holding_it(tmp_path: Path) -> None:
    """A second process cannot open the directory while a sink is open; it can after close()."""
    path = tmp_path / "ch"
    probe = textwrap.dedent(f"""
        import clickhouse_connect
        try:
            c = clickhouse_connect.get_client(dsn="chdb://{path}")
            print("opened", c.query("SELECT count() FROM metering.wallet_movements").result_rows[0][0])
        except Exception as ex:
            print("refused", type(ex).__name__)
    """)

    def other_process() -> str:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
        )
        return out.stdout.strip()

    s = ClickHouseSink(f"chdb://{path}")
    s.ensure_schema()
    s.insert_movements(movements())
    try:
        assert other_process() == "refused ProgrammingError"
        # a second client in the same process shares the engine and sees the rows
        with ClickHouseSink(f"chdb://{path}") as same_process:
            assert scalar(same_process, "SELECT count() FROM {db}.wallet_movements FINAL") == 5
    finally:
        s.close()
    assert other_process() == "opened 5"


def test_report_on_an_empty_schema_says_so_per_section(sink: ClickHouseSink) -> None:
    """chDB names no columns for an empty result: each section said nothing but a blank line."""
    from metering.report import print_report

    lines: list[str] = []
    print_report(sink.dsn, sink.database, lines.append)
    titles = [i for i, line in enumerate(lines) if line.startswith("\n== ")]
    assert titles and all(lines[i + 1] == "(no rows yet)" for i in titles), lines
    assert "" not in lines
