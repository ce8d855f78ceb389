"""Wallet movements of one account and time range as CSV (SPEC "Wallets": every balance
change is a movement with the balance after it, exportable as CSV per account and date range).

Read from ClickHouse's ``wallet_movements`` with ``FINAL``, so a replayed movement (same
``movement_id``) is one line, never two. Exact throughout: money is read as ``Decimal(18, 6)``
(clickhouse-connect builds it from the scaled integer) and written as a 6-place decimal string;
``at`` is read as integer epoch milliseconds and written as ISO 8601 UTC with milliseconds.

Range: ``start`` inclusive, ``end`` exclusive, both instants (a bare date is 00:00 UTC), on
``at``: a debit's usage-event time, a credit's wall-clock time.
Order: ``seq``, the wallet's balance-change number, i.e. the order Redis applied them in: each
line's ``balance_after`` is the previous line's plus its ``amount`` wherever ``seq`` runs
without a gap, even when CDRs arrived late and their ``at`` is earlier. Rows are selected by
``at`` (the call's time), so a range can leave out a movement applied in between (a late CDR
whose call falls outside the range, or a credit applied after the range's end while the CDRs
before it arrived): ``seq`` then skips, and the chain resumes from that line's own
``balance_after - amount``. The whole history (a range covering every ``at``) chains end to end.
Rows of seq 0 come first, by ``at`` then ``movement_id``: the wallet's opening balance (an
``adjustment`` with reference ``opening``, sent by ``accounts import``) and rows written before
seq existed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from rating.money import format_micros

CSV_COLUMNS = ("seq", "movement_id", "account_id", "at", "type", "amount", "balance_after", "reference")


class TextOut(Protocol):
    """Where CSV goes: anything with ``write(str)`` (a text file opened with ``newline=""``)."""

    def write(self, text: str, /) -> Any: ...


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BLOCK_ROWS = 10_000  # rows per streamed block


def parse_bound(text: str) -> datetime:
    """``2026-11-01`` (00:00 UTC that day) or an ISO 8601 timestamp with an offset
    (``2026-11-01T12:00:00Z``, ``2026-11-01T13:00:00+01:00``) -> an aware datetime.

    Raises ValueError with a message fit for the user (the caller names the option)."""
    value = text.strip()
    if _DATE.fullmatch(value):
        try:
            day = date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a date: {exc}") from None
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"expected a date (2026-11-01, UTC) or an ISO 8601 timestamp with an offset "
            f"(2026-11-01T12:00:00Z), got {text!r}"
        ) from None
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        raise ValueError(f"the timestamp {text!r} needs an offset, e.g. 2026-11-01T12:00:00Z")
    return when


def to_ms(when: datetime) -> int:
    """An aware datetime -> epoch milliseconds, rounded up: ``at`` has millisecond precision,
    so ``at >= t`` and ``at < t`` mean ``at >= ceil_ms(t)`` and ``at < ceil_ms(t)``."""
    return -((_EPOCH - when) // _ONE_MS)


def format_at(ms: int) -> str:
    """Epoch milliseconds -> ``2026-11-01T12:00:00.123Z``."""
    return (_EPOCH + ms * _ONE_MS).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def decimal_to_micros(value: Decimal, *, field: str) -> int:
    """A ``Decimal(18, 6)`` value as read by clickhouse-connect -> integer micros (exact)."""
    if not isinstance(value, Decimal):
        raise TypeError(f"{field}: expected Decimal from ClickHouse, got {value!r}")
    scaled = value.scaleb(6)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{field}: {value} has more than 6 decimal places")
    return int(scaled)


def query_sql(database: str) -> str:
    """The export query (server-side parameters: account, lo_ms, hi_ms)."""
    return (
        "SELECT seq, movement_id, account_id, toUnixTimestamp64Milli(at) AS at_ms, type, amount, "
        f"balance_after, reference FROM {database}.wallet_movements FINAL "
        "WHERE account_id = {account:String} "
        "AND toUnixTimestamp64Milli(at) >= {lo_ms:Int64} AND toUnixTimestamp64Milli(at) < {hi_ms:Int64} "
        "ORDER BY seq = 0 DESC, seq, at, movement_id"
    )


def open_stream(client: Any, database: str, account_id: str, start: datetime, end: datetime) -> Any:
    """Run the export query; returns clickhouse-connect's row-block stream context. A query
    that fails (no such table, ...) raises here, before anything is written."""
    params = {"account": account_id, "lo_ms": to_ms(start), "hi_ms": to_ms(end)}
    return client.query_row_block_stream(
        query_sql(database), parameters=params, settings={"max_block_size": _BLOCK_ROWS}
    )


def csv_rows(blocks: Iterable[Sequence[Sequence[Any]]]) -> Iterator[tuple[str, ...]]:
    """The query's row blocks -> CSV rows (strings, in CSV_COLUMNS order)."""
    for block in blocks:
        for seq, movement_id, account, at_ms, kind, amount, balance_after, reference in block:
            yield (
                str(seq),
                movement_id,
                account,
                format_at(int(at_ms)),
                kind,
                format_micros(decimal_to_micros(amount, field="amount")),
                format_micros(decimal_to_micros(balance_after, field="balance_after")),
                reference,
            )


def write_csv(rows: Iterable[tuple[str, ...]], out: TextOut) -> int:
    """The header, then one line per row (RFC 4180: fields with commas, quotes or line breaks
    are quoted, lines end in CRLF). ``out`` should be opened with ``newline=""``.
    Returns the number of data rows written."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    return n


def export_movements(
    client: Any, database: str, account_id: str, start: datetime, end: datetime, out: TextOut
) -> int:
    """Write one account's movements in [start, end) as CSV to ``out``, streamed block by
    block; returns the row count. An unknown account or an empty range writes the header only.
    The query runs before the header is written, so a failing query writes nothing."""
    with open_stream(client, database, account_id, start, end) as blocks:
        return write_csv(csv_rows(blocks), out)
