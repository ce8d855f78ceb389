"""Billing periods: monthly from the account's anchor day (1..28), in UTC (SPEC rule 8)."""

from __future__ import annotations

from datetime import UTC, date, datetime

# The earliest billing period stored: ClickHouse's `period_start Date` (rated_usage, and the fee
# periods of v_usage_by_category) starts at 1970-01-01 and clamps anything earlier to it.
FIRST_PERIOD_START = date(1970, 1, 1)


def period_start(ts: datetime, anchor_day: int) -> date:
    """First day of the billing period holding `ts` (an aware datetime)."""
    if ts.utcoffset():
        ts = ts.astimezone(UTC)
    year, month = ts.year, ts.month
    if ts.day < anchor_day:
        month -= 1
        if month == 0:
            year -= 1
            month = 12
    return date(year, month, anchor_day)


def next_period_start(start: date) -> date:
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return date(year, month, start.day)


def earliest_period_start(ts: datetime) -> date:
    """The earliest start, over every anchor day (1..28), of a billing period holding `ts`."""
    return min(period_start(ts, anchor) for anchor in range(1, 29))
