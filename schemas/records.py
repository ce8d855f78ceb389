"""What the engine produces: rated records, wallet events and wallet movements.

Money fields hold integer micros; they become 6-place decimal strings only at the edges
(JSON lines, CSV, Kafka) and `Decimal(18, 6)` in ClickHouse.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import msgspec

STATUS_RATED = "rated"
STATUS_REJECTED = "rejected"
STATUS_DUPLICATE = "duplicate"

REJECT_REASONS = (
    "invalid_json",
    "invalid_field",
    "unknown_kind",
    "unknown_account",
    "unknown_destination",
    "no_rate",
    "unknown_meter",
    "future_timestamp",
)

WALLET_EVENT_TYPES = ("blocked", "unblocked", "topup_requested", "low_balance", "usage_threshold")
MOVEMENT_TYPES = ("debit", "credit", "topup", "adjustment")


class RatedRecord(msgspec.Struct, kw_only=True):
    """One per input event, whatever happened to it (rated, rejected or duplicate)."""

    event_id: str | None
    account_id: str | None
    status: str
    kind: str | None = None
    reason: str | None = None  # rejected only: one of REJECT_REASONS
    detail: str | None = None  # rejected only: names the field or value concerned
    conflict: bool = False  # duplicate only: content differs from the first delivery
    country: str | None = None
    dest_class: str | None = None
    billable_s: int = 0
    covered_s: int = 0
    charged_s: int = 0
    package_id: str | None = None
    fair_use_exceeded: bool = False
    charge: int = 0  # micros
    balance_after: int | None = None  # micros; None when nothing was applied
    # Context for storage and analysts (not part of the offline line format).
    direction: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    at: datetime | None = None
    period_start: date | None = None
    plan_id: str | None = None
    catalog_version: str | None = None
    meter: str | None = None
    quantity: Decimal | None = None  # segments for sms, quantity for meters
    reservation_id: str | None = None


class WalletEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str  # one of WALLET_EVENT_TYPES
    account_id: str
    event_id: str | None  # the usage event that caused it (None for operator credits)
    balance: int  # micros, after the change that caused it
    package_id: str | None = None
    percent: int | None = None


class Movement(msgspec.Struct, kw_only=True):
    movement_id: str
    account_id: str
    at: datetime
    type: str  # one of MOVEMENT_TYPES
    amount: int  # micros, signed: debits are negative
    balance_after: int  # micros
    reference: str  # event_id for debits, operator reference for credits
    seq: int = 0  # the wallet's balance-change number (Redis); ordered by it, balances chain
