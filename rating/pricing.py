"""Billable seconds and charges for one call on one rate (SPEC rating rules 2 and 5).

Pure integer arithmetic: prices are pico-units per minute, so the exact charge of `s` seconds
at `p` per minute is `s * p / 60` pico; everything is summed as `pico * 60` and divided once,
half-up, into micros at the very end.
"""

from __future__ import annotations

from rating.catalog import Rate
from rating.money import PICO_PER_MICRO, div_half_up

_MICRO_DEN = 60 * PICO_PER_MICRO  # (pico * 60) -> micros


def billed_parts(rate: Rate, duration_s: int) -> list[tuple[int, int]]:
    """Billed seconds per interval, in call order, as (seconds, per_minute_pico).

    The part of the call inside an interval is rounded up to that interval's increment,
    counted from the interval's start. An interval's rounded part never spills into the next:
    the catalog guarantees each closed interval is a whole number of increments.
    """
    parts: list[tuple[int, int]] = []
    if duration_s <= 0:
        return parts
    for iv in rate.intervals:
        if duration_s <= iv.from_s:
            break
        end = duration_s if iv.end_s is None or duration_s < iv.end_s else iv.end_s
        inside = end - iv.from_s
        inc = iv.increment_s
        parts.append((-(-inside // inc) * inc, iv.per_minute_pico))
    return parts


def billable_seconds(rate: Rate, duration_s: int) -> int:
    return sum(s for s, _ in billed_parts(rate, duration_s))


def charge_micros(parts: list[tuple[int, int]], covered_s: int, connect_fee_pico: int) -> int:
    """Charge of the billable time minus its first `covered_s` seconds, rounded once, half-up."""
    skip = covered_s
    total60 = 0
    charged = False
    for seconds, per_minute in parts:
        if skip >= seconds:
            skip -= seconds
            continue
        total60 += (seconds - skip) * per_minute
        skip = 0
        charged = True
    if not charged:
        return 0
    return div_half_up(total60 + connect_fee_pico * 60, _MICRO_DEN)


def price_units_micros(units_pico: int) -> int:
    """A pico amount (already multiplied out) to micros, half-up."""
    return div_half_up(units_pico, PICO_PER_MICRO)
