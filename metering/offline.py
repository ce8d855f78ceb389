"""`metering rate`: the engine over a JSON-lines file, no servers (SPEC "Offline rating").

Reads in fixed-size batches and writes each batch's lines before reading on, so a file of any
length streams through; only the dedupe memory (one entry per distinct event) grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import IO

import msgspec

from rating.engine import ROW_FIELDS, Rater, Row
from rating.money import format_micros
from schemas.messages import OfflineLine, OfflineWalletEvent
from schemas.records import WalletEvent

BATCH_LINES = 4096
assert ROW_FIELDS[15] == "balance_after" and ROW_FIELDS[14] == "charge"


def offline_line(r: Row) -> OfflineLine:
    balance = r[15]
    return OfflineLine(
        event_id=r[0], account_id=r[1], status=r[2], reason=r[4], detail=r[5], conflict=r[6],
        kind=r[3], country=r[7], dest_class=r[8], billable_s=r[9], covered_s=r[10],
        charged_s=r[11], package_id=r[12], fair_use_exceeded=r[13], charge=format_micros(r[14]),
        balance_after=None if balance is None else format_micros(balance),
    )


def offline_wallet_event(e: WalletEvent) -> OfflineWalletEvent:
    return OfflineWalletEvent(
        type=e.type, account_id=e.account_id, event_id=e.event_id,
        balance=format_micros(e.balance), package_id=e.package_id, percent=e.percent,
    )


def _batches(lines: Iterable[bytes], size: int) -> Iterator[list[tuple[bytes, str]]]:
    batch: list[tuple[bytes, str]] = []
    for n, line in enumerate(lines, start=1):
        batch.append((line.rstrip(b"\r\n"), f"line:{n}"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def rate_stream(
    rater: Rater,
    lines: Iterable[bytes],
    out: IO[bytes],
    wallet_out: IO[bytes] | None,
    now: datetime,
    *,
    on_batch: Callable[[int], None] | None = None,
    batch_lines: int = BATCH_LINES,
) -> dict[str, int]:
    """Rate every line; returns counts by status. Blank lines are rejected like any bad input."""
    encoder = msgspec.json.Encoder()
    counts = {"rated": 0, "rejected": 0, "duplicate": 0}
    for batch in _batches(lines, batch_lines):
        result = rater.rate_batch(batch, now)
        buf = bytearray()
        for row in result.rows:
            counts[row[2]] += 1
            encoder.encode_into(offline_line(row), buf, len(buf))
            buf += b"\n"
        out.write(buf)
        if wallet_out is not None and result.wallet_events:
            wbuf = bytearray()
            for ev in result.wallet_events:
                encoder.encode_into(offline_wallet_event(ev), wbuf, len(wbuf))
                wbuf += b"\n"
            wallet_out.write(wbuf)
        if on_batch is not None:
            on_batch(sum(len(raw) + 1 for raw, _ in batch))
    return counts
