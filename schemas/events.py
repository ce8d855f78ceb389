"""Input events on `usage.events` (SPEC "Input events"): one JSON object per message.

msgspec validates types, E.164 patterns, ranges and timezone-aware timestamps in C while
decoding, so the hot path never touches a per-field Python check. Unknown extra fields are
ignored (switch vendors add their own); a missing or mistyped field is `invalid_field`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

# msgspec matches patterns with re.search, where a bare `$` also matches before a final "\n"
# ("+4420\n" would pass); `(?!\n)$` closes that and reads the same in JSON Schema (ECMA-262).
E164 = Annotated[str, msgspec.Meta(pattern=r"^\+[0-9]{1,15}(?!\n)$")]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Direction = Literal["outbound", "inbound"]
MAX_CALL_SECONDS = 86_400


class CallEvent(msgspec.Struct, tag_field="kind", tag="call", frozen=True, kw_only=True):
    event_id: EventId
    account_id: AccountId
    direction: Direction
    from_: E164 = msgspec.field(name="from")
    to: E164
    started_at: Timestamp
    duration_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_CALL_SECONDS)]
    seat_id: str | None = None
    reservation_id: str | None = None


class SmsEvent(msgspec.Struct, tag_field="kind", tag="sms", frozen=True, kw_only=True):
    event_id: EventId
    account_id: AccountId
    direction: Direction
    from_: E164 = msgspec.field(name="from")
    to: E164
    sent_at: Timestamp
    segments: Annotated[int, msgspec.Meta(ge=1)]


class MeterEvent(msgspec.Struct, tag_field="kind", tag="meter", frozen=True, kw_only=True):
    event_id: EventId
    account_id: AccountId
    meter: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # Decimal straight from the JSON number text: quantities are never binary floats.
    quantity: Decimal  # >= 0 is checked by the engine (msgspec has no bound for Decimal)
    at: Timestamp


UsageEvent = CallEvent | SmsEvent | MeterEvent
EVENT_KINDS = ("call", "sms", "meter")
