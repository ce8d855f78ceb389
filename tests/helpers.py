"""Small builders shared by the unit tests: a catalog dict, accounts and events."""

from __future__ import annotations

import copy
import itertools
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from confluent_kafka import Consumer, Message

from rating.accounts import parse_accounts
from rating.catalog import parse_catalog
from rating.engine import BatchResult, Rater
from rating.wallet import MemoryWalletStore
from schemas.records import RatedRecord

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

BASE_CATALOG: dict[str, Any] = {
    "version": "test-1",
    "currency": "USD",
    "destinations": [
        {"prefix": "1", "country": "US", "class": "fixed"},
        {"prefix": "1800", "country": "US", "class": "tollfree"},
        {"prefix": "44", "country": "GB", "class": "fixed"},
        {"prefix": "447", "country": "GB", "class": "mobile"},
        {"prefix": "4490", "country": "GB", "class": "premium"},
        {"prefix": "49", "country": "DE", "class": "fixed"},
        {"prefix": "351", "country": "PT", "class": "fixed"},
        {"prefix": "3519", "country": "PT", "class": "mobile"},
        {"prefix": "81", "country": "JP", "class": "fixed"},
        {"prefix": "86", "country": "CN", "class": "fixed"},
    ],
    "zones": {"europe": ["GB", "DE", "FR", "PT"]},
    "rate_tables": {
        "standard": [
            {"prefix": "1", "per_minute": "0.0100", "connect_fee": "0", "increments": [60, 60]},
            {"prefix": "1800", "per_minute": "0", "increments": [60, 60]},
            {"prefix": "44", "per_minute": "0.0200", "increments": [60, 60]},
            {"prefix": "447", "per_minute": "0.0800", "connect_fee": "0.0100", "increments": [30, 6]},
            {"prefix": "4490", "per_minute": "1.5000", "increments": [60, 60]},
            {"prefix": "49", "per_minute": "0.0123457", "increments": [1, 1]},
            {"prefix": "351", "per_minute": "0.0300", "increments": [60, 60]},
            {
                "prefix": "3519",
                "connect_fee": "0.40",
                "intervals": [
                    {"from_s": 0, "per_minute": "0.20", "increment_s": 60},
                    {"from_s": 60, "per_minute": "0.10", "increment_s": 1},
                ],
            },
            {"prefix": "81", "per_minute": "0.0600", "increments": [60, 60]},
        ],
        "inbound": [{"prefix": "1800", "per_minute": "0.0200", "increments": [60, 60]}],
    },
    "packages": {
        "us-domestic": {
            "countries": ["US"], "classes": ["fixed", "mobile"], "scope": "domestic",
            "minutes": "unlimited", "fair_use_minutes": 10,
        },
        "europe": {"countries": "zone:europe", "classes": ["fixed", "mobile"], "scope": "international", "minutes": 10},
    },
    "plans": {
        "starter": {
            "monthly_fee": "49.00", "billing": "prepaid", "rate_table": "standard",
            "inbound_rate_table": None, "packages": ["us-domestic", "europe"],
            "sms": {"outbound": "0.0075", "inbound": "0"}, "meters": {"llm_tokens": "0.000002"},
            "allow_premium": True,
        },
        "payg": {"rate_table": "standard", "sms": {"outbound": "0.0100", "inbound": "0.0010"}},
        "business": {
            "billing": "postpaid", "rate_table": "standard", "inbound_rate_table": "inbound",
            "packages": ["europe"], "sms": {"outbound": "0", "inbound": "0"},
        },
    },
}


def catalog_dict(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE_CATALOG)
    data.update(changes)
    return data


def overlapping_packages_catalog() -> dict[str, Any]:
    """starter with packages that overlap on GB, listed in the plan in another order than in
    the catalog: gb-home (domestic GB fixed, 2 min), uk-intl (GB fixed+mobile, 1 min), europe."""
    cat = catalog_dict()
    cat["packages"]["gb-home"] = {"countries": ["GB"], "classes": ["fixed"], "scope": "domestic", "minutes": 2}
    cat["packages"]["uk-intl"] = {"countries": ["GB"], "classes": ["fixed", "mobile"], "scope": "international",
                                  "minutes": 1}
    cat["plans"]["starter"]["packages"] = ["us-domestic", "gb-home", "uk-intl", "europe"]
    return cat


def account(acc_id: str = "acc-1", plan: str = "starter", **kw: Any) -> dict[str, Any]:
    base = {
        "id": acc_id, "plan": plan, "home_country": "US", "billing": "prepaid",
        "balance": "100.00", "period_anchor_day": 1, "auto_topup": None,
        "low_balance_alert": None, "credit_limit": None,
    }
    base.update(kw)
    return base


def make_rater(accounts: list[dict[str, Any]], catalog: dict[str, Any] | None = None) -> Rater:
    cat = parse_catalog(catalog or catalog_dict())
    accs = parse_accounts({"accounts": accounts}, cat)
    return Rater(cat, accs, MemoryWalletStore(accs))


def call(event_id: str, to: str, duration_s: int, *, account_id: str = "acc-1",
         direction: str = "outbound", started_at: str = "2026-11-10T10:00:00Z", **kw: Any) -> bytes:
    ev = {"kind": "call", "event_id": event_id, "account_id": account_id, "direction": direction,
          "from": "+15550001111", "to": to, "started_at": started_at, "duration_s": duration_s}
    ev.update(kw)
    return msgspec.json.encode(ev)


def sms(event_id: str, to: str, segments: int = 1, *, account_id: str = "acc-1",
        direction: str = "outbound", sent_at: str = "2026-11-10T10:00:00Z") -> bytes:
    return msgspec.json.encode({"kind": "sms", "event_id": event_id, "account_id": account_id,
                                "direction": direction, "from": "+15550001111", "to": to,
                                "sent_at": sent_at, "segments": segments})


def meter(event_id: str, quantity: Any, name: str = "llm_tokens", *, account_id: str = "acc-1",
          at: str = "2026-11-10T10:00:00Z") -> bytes:
    q = quantity if isinstance(quantity, bytes) else str(quantity).encode()
    return (b'{"kind":"meter","event_id":"' + event_id.encode() + b'","account_id":"'
            + account_id.encode() + b'","meter":"' + name.encode() + b'","quantity":' + q
            + b',"at":"' + at.encode() + b'"}')


_delivery = itertools.count(1)


def rate(rater: Rater, *events: bytes) -> BatchResult:
    """Each call is a new delivery: sources are unique, as Kafka offsets are."""
    return rater.rate_batch([(e, f"line:{next(_delivery)}") for e in events], NOW)


def records(rater: Rater, *events: bytes) -> list[RatedRecord]:
    return rate(rater, *events).records()


def one(rater: Rater, event: bytes) -> RatedRecord:
    return records(rater, event)[0]


def read_topic(bootstrap: str, topic: str, done: Callable[[list[Message]], bool],
               timeout_s: float = 60) -> list[Message]:
    """Messages of `topic` from the start (a throwaway group) until `done(messages)` or timeout."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(got) and time.monotonic() < deadline:
            got += [m for m in c.consume(500, 1.0) if m.error() is None]
    finally:
        c.close()
    return got


def free_port() -> int:
    """A TCP port nothing listens on now (bound and released: race-free enough for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, "") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""
