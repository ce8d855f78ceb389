"""The analyst report: fixed queries on the ClickHouse tables and views of SPEC, printed as
tables. The same SQL runs on chDB and on a ClickHouse server (`metering report`, the demo)."""

from __future__ import annotations

from collections.abc import Callable

from metering.storage.clickhouse_sink import ClickHouseSink


def queries(db: str) -> list[tuple[str, str]]:
    return [
        ("Usage and revenue by country and package (outbound calls, top 15 by revenue)",
         f"SELECT country, ifNull(package_id, '-') AS package, count() AS calls, "
         f"round(sum(billable_s) / 60) AS minutes, round(sum(covered_s) / 60) AS in_package_min, "
         f"sum(charge) AS revenue FROM {db}.rated_usage FINAL "
         f"WHERE kind = 'call' AND direction = 'outbound' "
         f"GROUP BY country, package ORDER BY revenue DESC, minutes DESC LIMIT 15"),
        ("Usage and revenue by category",
         f"SELECT category, sum(events) AS events, round(sum(billable_minutes)) AS minutes, sum(charge) AS revenue "
         f"FROM {db}.v_usage_by_category GROUP BY category ORDER BY revenue DESC"),
        # each account's latest billing period only (the latest with any usage or fee: one
        # without package calls counts no minutes, not the month before's): summing periods
        # would add last month's minutes to this month's and count an account once per period
        ("Package minutes used (each account's latest billing period)",
         f"SELECT package_id, count() AS accounts, round(sum(used_minutes)) AS used_min, "
         f"countIf(remaining_minutes = 0) AS exhausted, countIf(fair_use_exceeded) AS over_fair_use "
         f"FROM {db}.v_package_usage WHERE (account_id, period_start) IN "
         f"(SELECT account_id, max(period_start) FROM {db}.v_usage_by_category GROUP BY account_id) "
         f"GROUP BY package_id ORDER BY used_min DESC"),
        # spend = usage charges + recurring fees; balance = balance_after of the movement Redis
        # applied last (highest seq; not the latest `at`: a late CDR has an earlier time);
        # plan = of the latest rated event, else of the latest fee (`fee:<period>:<plan>`)
        ("Top accounts by spend (usage + fees)",
         f"SELECT c.account_id AS account_id, coalesce(p.plan, f.plan) AS plan_id, c.usage_events AS events, "
         f"c.usage AS usage, "
         f"c.fees AS fees, c.usage + c.fees AS spend, b.balance AS balance FROM "
         f"(SELECT account_id, sumIf(events, category != 'recurring') AS usage_events, "
         f"sumIf(charge, category != 'recurring') AS usage, sumIf(charge, category = 'recurring') AS fees "
         f"FROM {db}.v_usage_by_category GROUP BY account_id) AS c "
         f"LEFT JOIN (SELECT account_id, argMax(plan_id, started_at) AS plan FROM {db}.rated_usage FINAL "
         f"GROUP BY account_id) AS p ON p.account_id = c.account_id "
         f"LEFT JOIN (SELECT account_id, argMax(substring(reference, 16), at) AS plan FROM {db}.wallet_movements "
         f"FINAL WHERE match(reference, '^fee:[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}:.') GROUP BY account_id) AS f "
         f"ON f.account_id = c.account_id "
         f"LEFT JOIN (SELECT account_id, argMax(balance_after, seq) AS balance FROM {db}.wallet_movements FINAL "
         f"WHERE seq > 0 GROUP BY account_id) AS b ON b.account_id = c.account_id "
         f"ORDER BY spend DESC, account_id LIMIT 10 SETTINGS join_use_nulls = 1"),
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
            if not res.result_rows:  # (chDB names no columns for an empty result)
                echo("(no rows yet)")
                continue
            widths = [max(len(str(c)), *(len(str(r[i])) for r in res.result_rows)) if res.result_rows
                      else len(str(c)) for i, c in enumerate(res.column_names)]
            echo("  ".join(f"{c:>{w}}" for c, w in zip(res.column_names, widths, strict=True)))
            for row in res.result_rows:
                echo("  ".join(f"{str(v):>{w}}" for v, w in zip(row, widths, strict=True)))
