"""Exact money: integer micros inside, 6-place decimal strings at the edges.

Catalog prices are parsed from their decimal text into integer *pico*-units (10**-12 of the
currency), so a price with up to 12 decimals is exact and every charge is an integer
computation rounded half-up exactly once, at the end, to micros.
"""

from __future__ import annotations

import re
from decimal import Decimal

from rating.shown import shown

MICROS = 1_000_000
PICO = 1_000_000_000_000
PICO_PER_MICRO = PICO // MICROS
PRICE_DECIMALS = 12
# The most one event may be charged: 1 000 000 000.000000 of the currency. Beyond it the
# other stores are no longer exact: Redis scripts compute in doubles (integers exact below
# 2**53 micros, ~9.0e9 units) and ClickHouse holds Decimal(18, 6) (below 1e12 units). The
# catalog is refused when a call or SMS could cost more; a meter event that would is rejected.
MAX_CHARGE_MICROS = 10**15


class MoneyError(ValueError):
    pass


# Plain decimal text only: no exponent, underscore, spaces or non-ASCII digits (Decimal()
# would read "1_0" as 10 and "٠.٥" as 0.5: typos and look-alikes must not become prices).
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _decimal(text: object, example: str) -> Decimal:
    if not isinstance(text, str | int) or isinstance(text, bool):
        raise MoneyError(f"expected a decimal string like \"{example}\", got {shown(text)}")
    if isinstance(text, str) and not _DECIMAL_TEXT.fullmatch(text):
        raise MoneyError(f"expected a decimal string like \"{example}\", got {shown(text)}")
    return Decimal(text)


def parse_price_pico(text: object) -> int:
    """Decimal text ("0.0125") -> integer pico-units. Rejects floats, negatives, >12 places."""
    value = _decimal(text, "0.0125")
    if value < 0:
        raise MoneyError(f"price must be >= 0, got {shown(text)}")
    scaled = value.scaleb(PRICE_DECIMALS)
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"at most {PRICE_DECIMALS} decimal places, got {shown(text)}")
    return int(scaled)


def parse_micros(text: object, *, allow_negative: bool = True) -> int:
    """Decimal text ("12.34") -> integer micros; more than 6 places is an error, not a rounding."""
    value = _decimal(text, "12.50")
    if value < 0 and not allow_negative:
        raise MoneyError(f"must be >= 0, got {shown(text)}")
    scaled = value.scaleb(6)
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"at most 6 decimal places, got {shown(text)}")
    return int(scaled)


def div_half_up(numerator: int, denominator: int) -> int:
    """Round numerator/denominator half-up (away from zero at .5) for non-negative values."""
    return (2 * numerator + denominator) // (2 * denominator)


def format_micros(micros: int) -> str:
    """12340000 -> "12.340000"; -5 -> "-0.000005"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def micros_to_decimal(micros: int) -> Decimal:
    return Decimal(micros).scaleb(-6)
