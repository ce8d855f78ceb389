"""`metering rate`: the engine over a JSON-lines file, no servers (SPEC "Offline rating").

Reads in fixed-size batches and writes each batch's lines before reading on, so a file of any
length streams through; only the dedupe memory (one entry per distinct event) grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import IO

import msgspec

from rating.engine import ROW_FIELDS, Rater, Row, oversize, rejected_row
from rating.money import format_micros
from schemas.messages import OfflineLine, OfflineWalletEvent
from schemas.records import WalletEvent

BATCH_LINES = 4096
_BOM = b"\xef\xbb\xbf"
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


def _read_lines(lines: IO[bytes] | Iterable[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """(line without its end, its length). From a file, a line longer than `limit` is not held
    whole: its first `limit + 1` bytes come with its real length (it is rejected as oversize
    either way), so a huge line without newlines cannot take the memory."""
    readline = getattr(lines, "readline", None)
    if readline is None:
        for line in lines:
            raw = line.rstrip(b"\r\n")
            yield raw, len(raw)
        return
    cap = limit + 3  # room for the limit, one byte over it and "\r\n"
    while True:
        line = readline(cap)
        if not line:
            return
        if len(line) < cap or line.endswith(b"\n"):
            raw = line.rstrip(b"\r\n")
            yield raw, len(raw)
            continue
        size = len(line)
        while not line.endswith(b"\n"):  # skip the rest of the line, counting it
            line = readline(1 << 20)
            if not line:
                break
            size += len(line)
        if line.endswith(b"\r\n"):
            size -= 2
        elif line.endswith(b"\n"):
            size -= 1
        yield b"", size


def _batches(lines: IO[bytes] | Iterable[bytes], size: int,
             limit: int) -> Iterator[tuple[list[tuple[bytes, str]], dict[int, int]]]:
    """Batches of (line, "line:N"), with {index in batch: real length} of lines cut short."""
    batch: list[tuple[bytes, str]] = []
    cut: dict[int, int] = {}
    for n, (raw, length) in enumerate(_read_lines(lines, limit), start=1):
        if n == 1 and raw.startswith(_BOM):  # a UTF-8 byte order mark (Windows editors) is not the event's
            raw, length = raw[len(_BOM):], length - len(_BOM)
        if length != len(raw):
            cut[len(batch)] = length
        batch.append((raw, f"line:{n}"))
        if len(batch) >= size:
            yield batch, cut
            batch, cut = [], {}
    if batch:
        yield batch, cut


def rate_stream(
    rater: Rater,
    lines: IO[bytes] | Iterable[bytes],
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
    limit = rater.pricer.max_bytes
    for batch, cut in _batches(lines, batch_lines, limit):
        result = rater.rate_batch(batch, now)
        rows = result.rows
        for i, length in cut.items():  # rated as empty: reject it for what it is
            rows[i] = rejected_row(b"", batch[i][1], oversize(length, limit))
        buf = bytearray()
        for row in rows:
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
            on_batch(sum(len(raw) + 1 for raw, _ in batch) + sum(cut.values()))
    return counts
