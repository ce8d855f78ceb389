"""The JSON Schemas in schemas/json/ are current, valid, and agree with the code both ways:
what the decoder accepts the schema accepts and the reverse, and what the product writes
validates."""

from __future__ import annotations

import functools
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from metering.offline import rate_stream
from metering.traffic import generate_labeled_events, load_accounts_list, load_catalog_dict
from metering.workers.alerts import alert_key, to_notification
from metering.workers.common import produce_wallet_events
from rating.accounts import parse_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from schemas.events import MeterEvent, event_decoder
from schemas.json_schema import DIR, MESSAGES, is_current
from schemas.messages import MovementOut

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("name", list(MESSAGES))
def test_committed_schema_is_current_and_valid(name: str) -> None:
    assert is_current(name), "stale: run python -m schemas.json_schema --write"
    jsonschema.Draft202012Validator.check_schema(json.loads((DIR / f"{name}.schema.json").read_text(encoding="utf-8")))


def test_the_date_time_format_is_really_checked() -> None:
    # without rfc3339-validator installed jsonschema silently skips `format`; the cross-check
    # below relies on it
    v = validator("usage_event")
    ok = {"kind": "sms", "event_id": "e", "account_id": "a", "direction": "outbound", "from": "+1555",
          "to": "+4420", "sent_at": "2026-11-20T10:00:00Z", "segments": 1}
    assert v.is_valid(ok)
    assert not v.is_valid({**ok, "sent_at": "2026-11-20T10:00:00"})


@functools.cache
def _corpus() -> list[tuple[bytes, str]]:
    events = generate_labeled_events(load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS), count=20_000,
                                     seed=11, start=NOW - timedelta(days=1), duplicate_rate=0.02,
                                     malformed_rate=0.3, now=NOW)
    extra = [  # hand-made edge cases on top of the generator's defects
        b'{"kind":"meter","event_id":"q1","account_id":"a","meter":"m","quantity":"1.5","at":"2026-11-20T10:00:00Z"}',
        b'{"kind":"meter","event_id":"q2","account_id":"a","meter":"m","quantity":1.5,"at":"2026-11-20T10:00:00Z"}',
        b'{"kind":"meter","event_id":"q3","account_id":"a","meter":"m","quantity":true,"at":"2026-11-20T10:00:00Z"}',
        b'{"kind":"call","event_id":"c1","account_id":"a","direction":"outbound","from":"+1555","to":"+4420\\n",'
        b'"started_at":"2026-11-20T10:00:00Z","duration_s":5}',
        b'{"kind":"call","event_id":"c2","account_id":"a","direction":"outbound","from":"+1555","to":"+4420",'
        b'"started_at":"2026-11-20T10:00:00+05:30","duration_s":5,"vendor_field":{"x":1}}',
    ]
    return [(value, label) for _, value, label in events] + [(v, "extra") for v in extra]


def test_schema_and_decoder_agree_on_every_event_of_a_mixed_corpus() -> None:
    v = validator("usage_event")
    decode = event_decoder().decode
    checked = 0
    for raw, _label in _corpus():
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue  # not JSON: nothing for a schema to say (the decoder rejects it too)
        try:
            ev = decode(raw)
            decoded = True
        except (msgspec.ValidationError, msgspec.DecodeError):
            decoded = False
        schema_ok = v.is_valid(doc)
        # The engine, not the type, refuses a quantity that is not a number or below 0: the
        # schema says so directly. Everything else must agree exactly.
        if decoded and isinstance(ev, MeterEvent) and (type(ev.quantity) not in (int, Decimal) or ev.quantity < 0):
            assert not schema_ok, raw
        else:
            assert decoded == schema_ok, (f"decoder {'accepts' if decoded else 'rejects'} but schema "
                                          f"{'accepts' if schema_ok else 'rejects'}: {raw!r}")
        checked += 1
    assert checked > 19_000


def test_what_metering_rate_writes_validates() -> None:
    catalog = load_catalog(CATALOG)
    accounts = parse_accounts({"accounts": load_accounts_list(ACCOUNTS)}, catalog)
    rater = Rater(catalog, accounts, MemoryWalletStore(accounts))
    out, wallet_out = io.BytesIO(), io.BytesIO()
    rate_stream(rater, [raw + b"\n" for raw, _ in _corpus()], out, wallet_out, NOW)
    lines, wallet_lines = out.getvalue().splitlines(), wallet_out.getvalue().splitlines()
    assert len(lines) == 20_005
    assert {json.loads(x)["type"] for x in wallet_lines} >= {"blocked", "usage_threshold"}
    for name, docs in (("rated_line", lines), ("offline_wallet_event", wallet_lines)):
        v = validator(name)
        for line in docs:
            errors = [e.message for e in v.iter_errors(json.loads(line))]
            assert not errors, (name, line, errors)
    statuses = {json.loads(x)["status"] for x in lines}
    assert statuses == {"rated", "rejected", "duplicate"}


class _Capture:
    """Stands in for the Kafka producer: keeps what would have been sent."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.values.append(value)


def test_topic_messages_validate() -> None:
    catalog = load_catalog(CATALOG)
    accounts = parse_accounts({"accounts": load_accounts_list(ACCOUNTS)}, catalog)
    rater = Rater(catalog, accounts, MemoryWalletStore(accounts))
    result = rater.rate_batch([(raw, f"0:{i}") for i, (raw, _) in enumerate(_corpus())], NOW)
    assert {e.type for e in result.wallet_events} >= {"blocked", "usage_threshold"}
    sent = _Capture()
    produce_wallet_events(sent, "wallet.events", result.wallet_events,  # type: ignore[arg-type]
                          [NOW] * len(result.wallet_events), lambda *a: None)
    wallet_v, note_v = validator("wallet_event"), validator("notification")
    decode = msgspec.json.Decoder(MESSAGES["wallet_event"][0]).decode
    for value in sent.values:
        assert wallet_v.is_valid(json.loads(value)), value
        e = decode(value)
        note = to_notification(e, alert_key(e))
        assert note_v.is_valid(json.loads(msgspec.json.encode(note))), note
    move = MovementOut(movement_id="topup:a:r1", account_id="a", at=NOW, type="topup", amount="10.000000",
                       balance_after="-2.500000", reference="r1")
    assert validator("wallet_movement").is_valid(json.loads(msgspec.json.encode(move)))
    assert not validator("wallet_movement").is_valid({**json.loads(msgspec.json.encode(move)), "amount": "10.5"})
