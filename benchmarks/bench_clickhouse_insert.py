"""Insert throughput of ClickHouseSink.insert_rated on chDB: batches of 100 000 rated rows.

    python benchmarks/bench_clickhouse_insert.py [--rows 100000] [--batches 5] [--dsn chdb:///dir]

Without --dsn a fresh chDB directory under a temporary folder is used (and removed). Prints
rows/s per batch (end to end: RatedRecord -> columns -> Decimal/ms conversion -> Native ->
engine), then the split between building the columns in Python and the client insert, and how
long the analyst views take over the result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from metering.storage.clickhouse_sink import (
    RATED_USAGE_COLUMNS,
    ClickHouseSink,
    money_column,
    ms_column,
)
from schemas.records import RatedRecord

COUNTRIES = [
    ("US", "fixed", "+1202555"),
    ("GB", "mobile", "+44770090"),
    ("GB", "fixed", "+4420712"),
    ("PT", "fixed", "+3512112"),
    ("GB", "premium", "+4490123"),
]


def make_records(n: int, batch: int) -> list[RatedRecord]:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    out: list[RatedRecord] = []
    for i in range(n):
        account = f"acc-{i % 5000}"
        at = base + timedelta(seconds=i)
        kind = ("call", "call", "call", "sms", "meter")[i % 5]
        common: dict[str, Any] = dict(
            event_id=f"b{batch}-e{i}",
            account_id=account,
            status="rated",
            kind=kind,
            charge=(i * 7919) % 5_000_000,
            balance_after=50_000_000 - i,
            at=at,
            period_start=date(2026, 11, 1),
            plan_id="starter",
            catalog_version="2026-11-01",
        )
        if kind == "call":
            country, cls, prefix = COUNTRIES[(i // 5) % len(COUNTRIES)]
            billable = 60 * (1 + i % 10)
            covered = billable if i % 3 == 0 else 0
            out.append(
                RatedRecord(
                    **common,
                    direction="outbound",
                    from_number="+12025550100",
                    to_number=f"{prefix}{i % 10000:04d}",
                    country=country,
                    dest_class=cls,
                    billable_s=billable,
                    covered_s=covered,
                    charged_s=billable - covered,
                    package_id="europe" if covered else None,
                )
            )
        elif kind == "sms":
            out.append(
                RatedRecord(
                    **common,
                    direction="outbound",
                    from_number="+12025550100",
                    to_number="+447700900123",
                    country="GB",
                    dest_class="mobile",
                    quantity=Decimal(1 + i % 3),
                )
            )
        else:
            out.append(RatedRecord(**common, meter="llm_tokens", quantity=Decimal(i % 4000)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--dsn", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dsn = args.dsn or f"chdb://{Path(tmp) / 'ch'}"
        with ClickHouseSink(dsn) as sink:
            sink.ensure_schema()
            batches = [make_records(args.rows, b) for b in range(args.batches)]
            # warm-up (first insert also fetches the column types once)
            warm = make_records(1000, 999)
            sink.insert_rated(
                warm,
                topic="usage.events",
                partitions=[0] * len(warm),
                offsets=list(range(len(warm))),
            )
            rates, cpu_rates = [], []
            for b, records in enumerate(batches):
                parts, offs = [b % 4] * len(records), list(range(len(records)))
                t0, c0 = time.perf_counter(), time.process_time()
                n = sink.insert_rated(records, topic="usage.events", partitions=parts, offsets=offs)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                rates.append(n / dt)
                cpu_rates.append(n / cpu)
                print(
                    f"batch {b}: {n} rows in {dt:.3f} s wall ({cpu:.3f} s CPU, all threads)"
                    f" = {n / dt:,.0f} rows/s"
                )
            print(
                f"insert_rated, {args.rows} rows/batch: median {statistics.median(rates):,.0f} rows/s"
                f" wall (min {min(rates):,.0f}, max {max(rates):,.0f});"
                f" {statistics.median(cpu_rates):,.0f} rows per CPU-second"
            )

            # where the time goes: Python-side conversion vs the client insert (Native + engine)
            records = batches[0]
            t0 = time.perf_counter()
            money_column([r.charge for r in records], field="charge")
            money_column([r.balance_after for r in records], field="balance_after", nullable=True)
            ms_column([r.at for r in records if r.at is not None], field="at")
            conv = time.perf_counter() - t0
            print(f"  of which micros->Decimal (2 columns) + datetime->ms conversion: {conv:.3f} s")
            cols = sink.client.query(
                f"SELECT {', '.join('`' + c + '`' for c in RATED_USAGE_COLUMNS)}"
                f" FROM {sink.database}.rated_usage LIMIT {args.rows}"
            ).result_columns
            t0 = time.perf_counter()
            sink.client.insert(
                table="rated_usage",
                database=sink.database,
                data=cols,
                column_names=list(RATED_USAGE_COLUMNS),
                column_oriented=True,
            )
            raw = time.perf_counter() - t0
            print(
                f"  bare client.insert of ready columns (same {args.rows} rows, a replay):"
                f" {args.rows / raw:,.0f} rows/s"
            )

            for view in ("v_usage_by_category", "v_package_usage", "v_top_destinations"):
                t0 = time.perf_counter()
                rows = sink.client.query(f"SELECT * FROM {sink.database}.{view}").result_rows
                print(
                    f"  SELECT * FROM {view}: {len(rows)} rows in"
                    f" {time.perf_counter() - t0:.3f} s over"
                    f" {args.rows * (args.batches + 1) + 1000:,} stored rows"
                )


if __name__ == "__main__":
    main()
