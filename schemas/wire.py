"""Binary (msgpack) forms of engine rows for the Kafka hops between split workers.

`usage.priced` (rating -> debit) carries priced rows, `usage.rated` (debit -> sink) final rows;
both are the engine's tuples (rating.engine.ROW_FIELDS) encoded as typed msgpack arrays.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

import msgspec


class RowWire(msgspec.Struct, array_like=True, gc=False):
    event_id: str | None
    account_id: str | None
    status: str
    kind: str | None
    reason: str | None
    detail: str | None
    conflict: bool
    country: str | None
    dest_class: str | None
    billable_s: int
    covered_s: int
    charged_s: int
    package_id: str | None
    fair_use_exceeded: bool
    charge: int
    balance_after: int | None
    direction: str | None
    from_number: str | None
    to_number: str | None
    at: datetime | None
    period_start: date | None
    plan_id: str | None
    catalog_version: str | None
    meter: str | None
    quantity: Decimal | None
    reservation_id: str | None
    source: str


class RatedWire(RowWire, array_like=True, gc=False):
    """A final row on `usage.rated` with its wallet movement's seq (0: no money moved; also
    what a message from before seq decodes to)."""

    seq: int = 0


class PricedWire(RowWire, array_like=True, gc=False):
    fingerprint: int
    duration_s: int
    rate_table: str | None
    rate_prefix: str | None
    period_key: str


_enc = msgspec.msgpack.Encoder()
_dec_row = msgspec.msgpack.Decoder(RowWire)
_dec_rated = msgspec.msgpack.Decoder(RatedWire)
_dec_priced = msgspec.msgpack.Decoder(PricedWire)
_astuple = msgspec.structs.astuple


def encode_row(row: tuple[Any, ...]) -> bytes:
    return _enc.encode(RowWire(*row))


def encode_rated(row: tuple[Any, ...], seq: int) -> bytes:
    return _enc.encode(RatedWire(*row, seq))  # type: ignore[call-arg]  # 27 row fields + seq


def decode_rated(data: bytes) -> tuple[tuple[Any, ...], int]:
    """(row, seq) from `usage.rated`."""
    *row, seq = _astuple(_dec_rated.decode(data))
    return tuple(row), seq


def encode_priced(row: tuple[Any, ...]) -> bytes:
    if len(row) == 27:  # a rejected row travels with the priced ones in order
        return _enc.encode(RowWire(*row))
    return _enc.encode(PricedWire(*row))


def decode_row(data: bytes) -> tuple[Any, ...]:
    return _astuple(_dec_row.decode(data))


def decode_priced(data: bytes) -> tuple[Any, ...]:
    # Priced rows are longer arrays; msgspec rejects extra items for RowWire, so try priced first.
    try:
        return _astuple(_dec_priced.decode(data))
    except msgspec.ValidationError:
        return _astuple(_dec_row.decode(data))
