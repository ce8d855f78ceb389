"""The analyst report: fixed queries on the ClickHouse tables and views of SPEC, printed as
tables. The same SQL runs on chDB and on a ClickHouse server (`metering report`, the demo)."""

from __future__ import annotations

from collections.abc import Callable

from metering.storage.clickhouse_sink import ClickHouseSink


def queries(db: str) -> list[tuple[str, str]]:
    return [
        ("Usage and revenue by country and package (outbound calls)",
         f"SELECT country, ifNull(package_id, '-') AS package, count() AS calls, "
         f"round(sum(billable_s) / 60) AS minutes, round(sum(covered_s) / 60) AS in_package_min, "
         f"sum(charge) AS revenue FROM {db}.rated_usage FINAL "
         f"WHERE kind = 'call' AND direction = 'outbound' "
         f"GROUP BY country, package ORDER BY revenue DESC, minutes DESC LIMIT 15"),
        ("Usage and revenue by category",
         f"SELECT category, sum(events) AS events, round(sum(billable_minutes)) AS minutes, sum(charge) AS revenue "
         f"FROM {db}.v_usage_by_category GROUP BY category ORDER BY revenue DESC"),
        ("Package minutes used (this period)",
         f"SELECT package_id, count() AS accounts, round(sum(used_minutes)) AS used_min, "
         f"countIf(remaining_minutes = 0) AS exhausted, countIf(fair_use_exceeded) AS over_fair_use "
         f"FROM {db}.v_package_usage GROUP BY package_id ORDER BY used_min DESC"),
        ("Top accounts by spend",
         f"SELECT account_id, plan_id, count() AS events, sum(charge) AS spend, "
         f"argMax(balance_after, started_at) AS balance "
         f"FROM {db}.rated_usage FINAL GROUP BY account_id, plan_id ORDER BY spend DESC LIMIT 10"),
        ("Rejected input by reason",
         f"SELECT reason, count() AS events FROM {db}.rejected_events FINAL GROUP BY reason ORDER BY events DESC"),
        ("Wallet events",
         f"SELECT type, count() AS events FROM {db}.wallet_events FINAL GROUP BY type ORDER BY events DESC"),
    ]


def print_report(dsn: str, db: str, echo: Callable[[str], None] = print) -> None:
    with ClickHouseSink(dsn, db) as sink:
        for title, sql in queries(db):
            res = sink.client.query(sql)
            echo(f"\n== {title}")
            widths = [max(len(str(c)), *(len(str(r[i])) for r in res.result_rows)) if res.result_rows
                      else len(str(c)) for i, c in enumerate(res.column_names)]
            echo("  ".join(f"{c:>{w}}" for c, w in zip(res.column_names, widths, strict=True)))
            for row in res.result_rows:
                echo("  ".join(f"{str(v):>{w}}" for v, w in zip(row, widths, strict=True)))
