"""Input events on `usage.events` (SPEC "Input events"): one JSON object per message.

msgspec validates types, E.164 patterns, ranges and timezone-aware timestamps in C while
decoding, so the hot path never touches a per-field Python check. Unknown extra fields are
ignored (switch vendors add their own); a missing or mistyped field is `invalid_field`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

# msgspec matches patterns with re.search, where a bare `$` also matches before a final "\n"
# ("+4420\n" would pass); `(?!\n)$` closes that and reads the same in JSON Schema (ECMA-262).
E164 = Annotated[str, msgspec.Meta(pattern=r"^\+[0-9]{1,15}(?!\n)$")]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Direction = Literal["outbound", "inbound"]
# A JSON number (SPEC). Typed `Any` because a `Decimal` field would also take "1.5" as a string;
# `event_decoder()` turns fractional numbers into exact Decimals (never binary floats) and the
# engine refuses anything but int or Decimal, and values outside 0..1e12.
Quantity = Annotated[Any, msgspec.Meta(extra_json_schema={"type": "number", "minimum": 0})]
MAX_CALL_SECONDS = 86_400
MAX_SMS_SEGMENTS = 255  # a concatenated SMS has at most 255 parts (GSM 03.40 UDH)


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
    segments: Annotated[int, msgspec.Meta(ge=1, le=MAX_SMS_SEGMENTS)]


class MeterEvent(msgspec.Struct, tag_field="kind", tag="meter", frozen=True, kw_only=True):
    event_id: EventId
    account_id: AccountId
    meter: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    quantity: Quantity
    at: Timestamp


UsageEvent = CallEvent | SmsEvent | MeterEvent
EVENT_KINDS = ("call", "sms", "meter")


def event_decoder() -> msgspec.json.Decoder[UsageEvent]:
    """The decoder every reader of `usage.events` uses (numbers with a fraction -> Decimal)."""
    return msgspec.json.Decoder(UsageEvent, float_hook=Decimal)
