"""`metering rate`: the engine over a JSON-lines file, no servers (SPEC "Offline rating").

Reads in fixed-size batches and writes each batch's lines before reading on, so a file of any
length streams through; only the dedupe memory (one entry per distinct event) grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import IO

import msgspec

from rating.engine import Rater
from rating.money import format_micros
from schemas.records import RatedRecord, WalletEvent

BATCH_LINES = 4096


class OfflineLine(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The SPEC offline line; `reason`/`detail` (rejected) and `conflict` (duplicate) appear
    only then."""

    event_id: str | None
    account_id: str | None
    status: str
    reason: str | None = None
    detail: str | None = None
    conflict: bool = False
    kind: str | None
    country: str | None
    dest_class: str | None
    billable_s: int
    covered_s: int
    charged_s: int
    package_id: str | None
    fair_use_exceeded: bool
    charge: str
    balance_after: str | None


class OfflineWalletEvent(msgspec.Struct, omit_defaults=True):
    type: str
    account_id: str
    event_id: str | None
    balance: str
    package_id: str | None = None
    percent: int | None = None


def offline_line(r: RatedRecord) -> OfflineLine:
    return OfflineLine(
        event_id=r.event_id, account_id=r.account_id, status=r.status, kind=r.kind,
        country=r.country, dest_class=r.dest_class, billable_s=r.billable_s,
        covered_s=r.covered_s, charged_s=r.charged_s, package_id=r.package_id,
        fair_use_exceeded=r.fair_use_exceeded, charge=format_micros(r.charge),
        balance_after=None if r.balance_after is None else format_micros(r.balance_after),
        reason=r.reason, detail=r.detail, conflict=r.conflict,
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
        for rec in result.records:
            counts[rec.status] += 1
            encoder.encode_into(offline_line(rec), buf, len(buf))
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
