"""JSON messages at the edges: what other systems read from the topics and from `metering rate`.

Money is a 6-place decimal string here (SPEC), never a float. `schemas/json/` holds the JSON
Schema of each (generated from these types by `python -m schemas.json_schema --write`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from schemas.records import MOVEMENT_TYPES, REJECT_REASONS, WALLET_EVENT_TYPES

Money = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]+\.[0-9]{6}(?!\n)$",
                                    description="decimal string with 6 places")]
Status = Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["rated", "rejected", "duplicate"]})]
Reason = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(REJECT_REASONS)})]
WalletEventType = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(WALLET_EVENT_TYPES)})]
MovementType = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(MOVEMENT_TYPES)})]
Percent = Annotated[int, msgspec.Meta(extra_json_schema={"enum": [50, 80, 100]})]


class OfflineLine(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One `metering rate` output line per input event (SPEC "Offline rating"); `reason` and
    `detail` appear only on rejected lines, `conflict` only when true."""

    event_id: str | None
    account_id: str | None
    status: Status
    reason: Reason | None = None
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
    charge: Money
    balance_after: Money | None


class OfflineWalletEvent(msgspec.Struct, omit_defaults=True):
    """One `metering rate --wallet-events` line."""

    type: WalletEventType
    account_id: str
    event_id: str | None
    balance: Money
    package_id: str | None = None
    percent: Percent | None = None


class WalletEventOut(msgspec.Struct, omit_defaults=True):
    """A wallet event on `wallet.events` (key = account_id): SPEC fields plus when its cause
    happened."""

    type: WalletEventType
    account_id: str
    event_id: str | None
    balance: Money
    at: datetime
    package_id: str | None = None
    percent: Percent | None = None


class MovementOut(msgspec.Struct):
    """A credit / top-up / adjustment on `wallet.movements` (key = account_id), written by
    `metering accounts credit`."""

    movement_id: str
    account_id: str
    at: datetime
    type: MovementType
    amount: Money
    balance_after: Money
    reference: str
    seq: int = 0  # the wallet's balance-change number: movements ordered by it chain their balances


class Notification(msgspec.Struct, omit_defaults=True):
    """One customer notification on `notifications` (key = account_id)."""

    notification_id: str  # stable: a hash of the alert key
    account_id: str
    type: WalletEventType
    text: str
    balance: Money
    at: str  # when the cause happened (ISO 8601, from the wallet event)
    event_id: str | None = None
    package_id: str | None = None
    percent: Percent | None = None
