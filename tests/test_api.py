"""The dialer API on the real local Redis (never skipped: a Redis that cannot be reached or
started fails these tests). Uses its own Redis database (15 unless METERING_TEST_API_REDIS_URL
says otherwise) and flushes only that one."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from metering.local_services import ensure_started
from rating.accounts import parse_accounts
from rating.catalog import parse_catalog
from rating.engine import Rater
from rating.periods import next_period_start, period_start
from schemas.records import RatedRecord
from tests.helpers import NOW, account, call, catalog_dict
from wallet_debiter.api import make_app
from wallet_debiter.authorize import Authorizer
from wallet_debiter.redis_store import RedisWalletStore, connect
from wallet_debiter.reservations import (
    Hold,
    ReservationContention,
    ReservationStore,
    Snapshot,
    _Coalescer,
)

pytestmark = pytest.mark.integration

GB_MOBILE = "+447700900123"  # 0.08/min 30/6, connect 0.01
GB_FIXED = "+442071234567"  # 0.02/min 60/60, europe package
US_FIXED = "+12025550123"  # 0.01/min 60/60
JP_FIXED = "+81312345678"  # 0.06/min 60/60
GB_PREMIUM = "+449012345678"
UNKNOWN_BODY = {"allowed": False, "reason": "unknown_account", "max_duration_s": None, "balance": None}

Body = Callable[[TestClient[web.Request, web.Application]], Awaitable[None]]
Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
def redis_url() -> str:
    url = os.environ.get("METERING_TEST_API_REDIS_URL")
    if not url:
        base = ensure_started(("redis",)).redis_url  # starts the local Redis when it is down
        url = base.rsplit("/", 1)[0] + "/15"
    redis.Redis.from_url(url, socket_timeout=5).ping()  # fail (not skip) when unreachable
    return url


class FakeClock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    url: str
    catalog_path: Path
    catalog: dict[str, Any]
    client: redis.Redis

    def accounts(self, *accs: dict[str, Any]) -> None:
        cat = parse_catalog(self.catalog)
        RedisWalletStore(self.client).import_accounts(parse_accounts({"accounts": list(accs)}, cat).values())

    def write_catalog(self, data: dict[str, Any]) -> None:
        tmp = self.catalog_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data), encoding="utf-8")
        tmp.replace(self.catalog_path)

    def run(self, body: Body, *, apps: int = 1, **app_kw: Any) -> None:
        """Run `body(client)` against a fresh app (more apps: `body` gets the first; see run_many)."""
        async def main() -> None:
            app = make_app(str(self.catalog_path), self.url, **app_kw)
            async with TestClient(TestServer(app)) as client:
                await body(client)
        asyncio.run(main())

    def run_many(self, n: int, body: Callable[[list[Client]], Awaitable[None]], **app_kw: Any) -> None:
        """`n` independent apps (as n API replicas) on the same Redis."""
        async def main() -> None:
            clients = [TestClient(TestServer(make_app(str(self.catalog_path), self.url, **app_kw)))
                       for _ in range(n)]
            for c in clients:
                await c.start_server()
            try:
                await body(clients)
            finally:
                for c in clients:
                    await c.close()
        asyncio.run(main())

    def holds(self, account_id: str) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = self.client.hgetall(f"h:{{{account_id}}}")  # type: ignore[assignment]
        return {k.decode(): v for k, v in raw.items()}


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Env:
    client = connect(redis_url)
    client.flushdb()
    data = catalog_dict()
    data["plans"]["nopremium"] = {"rate_table": "standard", "allow_premium": False,
                                  "sms": {"outbound": "0", "inbound": "0"}}
    path = tmp_path / "catalog.yaml"
    e = Env(redis_url, path, data, client)
    e.write_catalog(data)
    return e


async def _get(client: Client, account_id: str, to: str) -> tuple[int, Any]:
    resp = await client.get(f"/v1/accounts/{account_id}/authorize?to={to}")
    return resp.status, await resp.json()


async def _reserve(client: Client, account_id: str, **body: Any) -> tuple[int, Any]:
    resp = await client.post(f"/v1/accounts/{account_id}/reservations", json=body)
    return resp.status, await resp.json()


# ------------------------------------------------------------------------ authorize


def test_authorize_answers(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"), account("np", plan="nopremium", balance="5.00"),
                 account("blk", plan="payg", balance="0.00"),
                 account("post", plan="business", billing="postpaid", balance="-0.50", credit_limit="1.00"),
                 account("open", plan="business", billing="postpaid", balance="0.00"))

    async def body(client: Client) -> None:
        ok = {"allowed": True, "reason": "ok", "max_duration_s": 66, "balance": "0.100000"}
        assert await _get(client, "acc-1", GB_MOBILE) == (200, ok)  # literal '+' in the query
        assert await _get(client, "acc-1", "%2B447700900123") == (200, ok)  # percent-encoded
        assert await _get(client, "acc-1", "+999123") == (200, {
            "allowed": False, "reason": "unknown_destination", "max_duration_s": 0, "balance": "0.100000"})
        assert (await _get(client, "np", GB_PREMIUM))[1]["reason"] == "premium_not_allowed"
        assert (await _get(client, "acc-1", GB_PREMIUM))[1]["reason"] == "insufficient_balance"
        assert await _get(client, "blk", US_FIXED) == (200, {
            "allowed": False, "reason": "blocked", "max_duration_s": 0, "balance": "0.000000"})
        assert await _get(client, "post", JP_FIXED) == (200, {
            "allowed": True, "reason": "ok", "max_duration_s": 480, "balance": "-0.500000"})
        assert (await _get(client, "open", JP_FIXED))[1]["max_duration_s"] is None

    env.run(body)


def test_allowance_used_and_period_read_from_redis(env: Env) -> None:
    env.accounts(account("s", plan="starter", balance="0.10", period_anchor_day=28))
    period = period_start(datetime.now(UTC), 28).isoformat()
    env.client.hset("u:{s}", mapping={f"europe|{period}": 480, "europe|2000-01-28": 600})

    async def body(client: Client) -> None:
        status, doc = await _get(client, "s", GB_MOBILE)
        assert (status, doc["max_duration_s"]) == (200, 186)  # 120 s covered + 0.10 of money

    env.run(body)


def test_wallet_view_shows_balance_holds_and_package_usage_this_period(env: Env) -> None:
    """GET /v1/accounts/{id}/wallet: the billing page's numbers, live from Redis."""
    env.accounts(account("s", plan="starter", balance="0.10", period_anchor_day=28),
                 account("post", plan="business", billing="postpaid", balance="-0.50", credit_limit="1.00"),
                 account("payg", plan="payg", balance="2.00"), account("gb", home_country="GB"))
    period = period_start(datetime.now(UTC), 28).isoformat()
    next_start = next_period_start(date.fromisoformat(period)).isoformat()
    # europe: 8 of 10 minutes used this period (last period's 10 do not count); us-domestic
    # (unlimited, fair use 10 minutes): 1 minute
    env.client.hset("u:{s}", mapping={f"europe|{period}": 480, "europe|2000-01-28": 600,
                                      f"us-domestic|{period}": 60})

    async def body(client: Client) -> None:
        status, _ = await _reserve(client, "s", to=GB_FIXED, max_duration_s=60, reservation_id="r-1")
        assert status == 201
        status, _ = await _reserve(client, "payg", to=US_FIXED, max_duration_s=120, reservation_id="r-2")
        assert status == 201  # 2 minutes at 0.01: 0.02 held
        resp = await client.get("/v1/accounts/s/wallet")
        assert resp.status == 200
        assert await resp.json() == {
            "account_id": "s", "plan": "starter", "billing": "prepaid", "balance": "0.100000",
            "held": "0.000000", "available": "0.100000", "credit_limit": None, "blocked": False,
            "monthly_fee": "49.000000", "period_start": period, "next_billing_date": next_start,
            "packages": [
                {"package_id": "us-domestic", "unlimited": True, "minutes": None, "fair_use_minutes": 10,
                 "used_s": 60, "held_s": 0, "remaining_s": 540, "percent_used": 10},
                {"package_id": "europe", "unlimited": False, "minutes": 10, "fair_use_minutes": None,
                 "used_s": 480, "held_s": 60, "remaining_s": 60, "percent_used": 80},
            ]}
        doc = await (await client.get("/v1/accounts/payg/wallet")).json()
        assert (doc["balance"], doc["held"], doc["available"], doc["packages"]) == (
            "2.000000", "0.020000", "1.980000", [])
        doc = await (await client.get("/v1/accounts/post/wallet")).json()
        assert (doc["billing"], doc["available"], doc["credit_limit"]) == ("postpaid", "0.500000", "1.000000")
        resp = await client.get("/v1/accounts/nobody/wallet")
        assert (resp.status, await resp.json()) == (404, {"error": "unknown account", "field": "account_id"})
        # us-domestic covers calls to the home country only: a GB account never uses it
        doc = await (await client.get("/v1/accounts/gb/wallet")).json()
        assert [p["package_id"] for p in doc["packages"]] == ["europe"]

    env.run(body)


@pytest.mark.parametrize(("today", "anchor", "period"), [
    ((2026, 3, 5), 28, "2026-02-28"), ((2026, 1, 5), 10, "2025-12-10"),
    ((2026, 3, 28), 28, "2026-03-28"), ((2026, 12, 31), 1, "2026-12-01"),
])
def test_lua_billing_period_matches_python(env: Env, today: tuple[int, int, int], anchor: int,
                                           period: str) -> None:
    env.accounts(account("s", plan="starter", period_anchor_day=anchor))
    when = datetime(*today, 23, 59, tzinfo=UTC)
    assert period_start(when, anchor).isoformat() == period

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(env.url)
        try:
            store = ReservationStore(client, clock=when.timestamp)
            now, now_ms = store.now()
            snap = await store.snapshot("s", ("europe",), now, now_ms)
            assert snap is not None and snap.period == period
        finally:
            await client.aclose()

    asyncio.run(main())


def test_bad_input_is_400(env: Env) -> None:
    env.accounts(account(plan="payg", balance="1.00"))

    async def body(client: Client) -> None:
        base = "/v1/accounts/acc-1"
        for query in ("", "?to=", "?to=abc", "?to=%2B", "?to=447700900123", "?to=%2B1234567890123456",
                      "?to=%2B44%2020", "?to=%2B44&to=%2B44", "?to=%ff", "?to=%2B447700900123%0A"):
            resp = await client.get(f"{base}/authorize{query}")
            doc = await resp.json()
            assert resp.status == 400, query
            assert doc["field"] == "to" and isinstance(doc["error"], str), doc
        resp = await client.get(f"/v1/accounts/{'x' * 129}/authorize?to={US_FIXED}")
        assert resp.status == 400 and (await resp.json())["field"] == "account_id"

        cases: list[tuple[Any, str | None]] = [
            (b"{", None), (b"[]", None), (b"", None), (b'"x"', None),
            # a key twice: which number would be held? (JSON parsers keep the last silently)
            (b'{"to": "+12025550123", "to": "+447700900123"}', "to"),
            (b'{"to": "+12025550123", "max_duration_s": 60, "max_duration_s": 600}', "max_duration_s"),
            ({}, "to"), ({"to": 44}, "to"), ({"to": "+44 20"}, "to"),
            ({"to": US_FIXED, "max_duration_s": 0}, "max_duration_s"),
            ({"to": US_FIXED, "max_duration_s": -5}, "max_duration_s"),
            ({"to": US_FIXED, "max_duration_s": 86_401}, "max_duration_s"),
            ({"to": US_FIXED, "max_duration_s": "60"}, "max_duration_s"),
            ({"to": US_FIXED, "max_duration_s": True}, "max_duration_s"),
            ({"to": US_FIXED, "max_duration_s": 1.5}, "max_duration_s"),
            ({"to": US_FIXED, "reservation_id": ""}, "reservation_id"),
            ({"to": US_FIXED, "reservation_id": "a b"}, "reservation_id"),
            ({"to": US_FIXED, "reservation_id": "x" * 129}, "reservation_id"),
            ({"to": US_FIXED, "reservation_id": 7}, "reservation_id"),
            ({"to": US_FIXED, "max_duration": 60}, "max_duration"),
            # numbers past what msgspec holds: its error said "expected a JSON object" with no field
            (b'{"to": "+12025550123", "max_duration_s": 1e400}', "max_duration_s"),
            (b'{"to": "+12025550123", "max_duration_s": -' + b"9" * 5000 + b"}", "max_duration_s"),
            (b'{"to": 1e400}', "to"),
            (b'{"to": "+12025550123", "reservation_id": 1e999}', "reservation_id"),
            (b'{"to": "+12025550123", "extra": [1e400]}', "extra"),
        ]
        for payload, field in cases:
            if isinstance(payload, bytes):
                resp = await client.post(f"{base}/reservations", data=payload,
                                         headers={"Content-Type": "application/json"})
            else:
                resp = await client.post(f"{base}/reservations", json=payload)
            doc = await resp.json()
            assert resp.status == 400, payload
            assert set(doc) == {"error", "field"} and doc["field"] == field, (payload, doc)
        resp = await client.post(f"{base}/reservations", data=b"x" * 100_000)
        assert resp.status == 413 and "error" in await resp.json()
        resp = await client.delete(f"{base}/reservations/a%20b")
        assert resp.status == 400 and (await resp.json())["field"] == "reservation_id"
        assert env.holds("acc-1") == {}

    env.run(body)


def test_unreadable_bodies_are_400_json(env: Env) -> None:
    """Bodies msgspec or aiohttp cannot read are client errors: 400 with the usual JSON error
    naming the problem (they were 503s: UnicodeDecodeError, RecursionError, RequestPayloadError)."""
    env.accounts(account(plan="payg", balance="1.00"))
    url = "/v1/accounts/acc-1/reservations"
    json_ct = {"Content-Type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], str]] = [
        (b'{"to": "+1\xff"}', {}, "not valid UTF-8"),
        (b'{"\xff": 1}', {}, "not valid UTF-8"),
        (b"[" * 1000 + b"]" * 1000, {}, "nested too deeply"),
        (b'{"to": ' * 1000 + b"1" + b"}" * 1000, {}, "nested too deeply"),
        (b'{"to": "+12025550123"}', {"Content-Encoding": "gzip"}, "content-encoding: gzip"),
        (b'{"to": "+12025550123"}', {"Content-Encoding": "deflate"}, "content-encoding: deflate"),
    ]

    async def body(client: Client) -> None:
        for data, headers, problem in cases:
            resp = await client.post(url, data=data, headers={**json_ct, **headers})
            doc = await resp.json()
            assert resp.status == 400, (data[:40], headers, doc)
            assert resp.content_type == "application/json"
            assert set(doc) == {"error", "field"} and doc["field"] is None, doc
            assert doc["error"].startswith("body: ") and problem in doc["error"], doc
        # a well-formed compressed body is still read; the server keeps answering
        resp = await client.post(url, data=gzip.compress(b'{"to": "+12025550123", "max_duration_s": 60}'),
                                 headers={**json_ct, "Content-Encoding": "gzip"})
        assert resp.status == 201, await resp.text()
        assert (await _get(client, "acc-1", US_FIXED))[0] == 200

    env.run(body)
    assert len(env.holds("acc-1")) == 1


def test_unknown_account_is_404_with_spec_body(env: Env) -> None:
    env.accounts(account(plan="payg"))

    async def body(client: Client) -> None:
        assert await _get(client, "nobody", US_FIXED) == (404, UNKNOWN_BODY)
        assert await _reserve(client, "nobody", to=US_FIXED) == (404, UNKNOWN_BODY)

    env.run(body)
    assert env.client.exists("h:{nobody}") == 0


def test_unknown_route_and_method_are_json(env: Env) -> None:
    async def body(client: Client) -> None:
        resp = await client.get("/v1/nothing")
        assert resp.status == 404 and (await resp.json())["error"]
        resp = await client.put(f"/v1/accounts/acc-1/authorize?to={US_FIXED}")
        assert resp.status == 405 and (await resp.json())["error"]
        assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET"}  # RFC 9110

    env.run(body)


def test_account_ids_with_braces_reach_their_routes(env: Env) -> None:
    """Account ids are any 1..128 characters; aiohttp's plain {id} route stops at braces."""
    env.accounts(account("x{1}", plan="payg", balance="1.00"))

    async def body(client: Client) -> None:
        status, doc = await _get(client, "x%7B1%7D", US_FIXED)
        assert (status, doc["allowed"], doc["max_duration_s"]) == (200, True, 6000)
        status, doc = await _reserve(client, "x%7B1%7D", to=US_FIXED, max_duration_s=60, reservation_id="r-1")
        assert status == 201 and doc["reservation_id"] == "r-1"
        resp = await client.get("/v1/accounts/x%7B1%7D/wallet")
        assert resp.status == 200 and (await resp.json())["held"] == "0.010000"
        resp = await client.delete("/v1/accounts/x%7B1%7D/reservations/r-1")
        assert resp.status == 204

    env.run(body)
    assert json.loads(env.holds("x{1}")["r-1"])["closed"] == "released"  # holds nothing now


def test_content_encodings_the_api_cannot_read_are_415_json(env: Env) -> None:
    """aiohttp reads a body with an unknown Content-Encoding as if plain: acting on it could
    hold money for a request the client meant otherwise. Brotli is decoded like gzip."""
    import brotli

    env.accounts(account(plan="payg", balance="1.00"))
    url = "/v1/accounts/acc-1/reservations"
    plain = b'{"to": "+12025550123", "max_duration_s": 60}'

    async def body(client: Client) -> None:
        for coding in ("foo", "gzip, br", "compress"):
            resp = await client.post(url, data=plain, headers={"Content-Type": "application/json",
                                                               "Content-Encoding": coding})
            doc = await resp.json()
            assert (resp.status, resp.content_type) == (415, "application/json"), (coding, doc)
            assert coding in doc["error"] and doc["field"] is None
        resp = await client.get(f"/v1/accounts/acc-1/authorize?to={US_FIXED}", headers={"Content-Encoding": "br"})
        assert resp.status == 200  # no body: nothing to decode
        resp = await client.post(url, data=b"not brotli", headers={"Content-Encoding": "br"})
        doc = await resp.json()
        assert resp.status == 400 and doc["error"].startswith("body: cannot be read"), doc
        resp = await client.post(url, data=brotli.compress(plain), headers={"Content-Encoding": "br"})
        assert resp.status == 201, await resp.text()

    env.run(body)
    assert len(env.holds("acc-1")) == 1  # only the readable brotli body held money


# --------------------------------------------------------------------- reservations


def test_concurrent_reservations_never_overspend(env: Env) -> None:
    # 0.05 buys exactly five 60 s US calls at 0.01/min; 20 dialer requests on 3 replicas.
    env.accounts(account(plan="payg", balance="0.05"))

    async def body(clients: list[Client]) -> None:
        results = await asyncio.gather(*(
            _reserve(clients[i % len(clients)], "acc-1", to=US_FIXED, max_duration_s=60)
            for i in range(20)))
        created = [doc for status, doc in results if status == 201]
        refused = [doc for status, doc in results if status != 201]
        assert len(created) == 5 and len(refused) == 15
        assert all(d["held_amount"] == "0.010000" and d["max_duration_s"] == 60 for d in created)
        assert all(d["reason"] == "insufficient_balance" and d["allowed"] is False for d in refused)
        assert {s for s, _ in results} == {201, 409}
        assert len({d["reservation_id"] for d in created}) == 5
        assert (await _get(clients[0], "acc-1", US_FIXED))[1]["reason"] == "insufficient_balance"

    env.run_many(3, body)
    holds = env.holds("acc-1")
    assert len(holds) == 5
    assert sum(int(v.split(b'"amount":')[1].split(b",")[0]) for v in holds.values()) == 50_000


def test_concurrent_reservations_never_overuse_the_allowance(env: Env) -> None:
    # starter: europe 10 min; almost no money: twenty 60 s GB calls, ten fit the package.
    env.accounts(account("s", plan="starter", balance="0.000001"))

    async def body(clients: list[Client]) -> None:
        results = await asyncio.gather(*(
            _reserve(clients[i % 2], "s", to=GB_FIXED, max_duration_s=60) for i in range(20)))
        created = [doc for status, doc in results if status == 201]
        assert len(created) == 10
        assert all(d["held_seconds"] == 60 and d["held_amount"] == "0.000000" for d in created)
        assert all(doc["reason"] == "insufficient_balance" for status, doc in results if status != 201)

    env.run_many(2, body)


def test_reservation_holds_up_to_what_the_wallet_affords(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"), account("m", plan="payg", balance="0.10"))

    async def body(client: Client) -> None:
        # No duration asked: the longest affordable call (66 s GB mobile, 0.098000).
        status, doc = await _reserve(client, "m", to=GB_MOBILE)
        assert status == 201
        assert (doc["max_duration_s"], doc["held_amount"], doc["held_seconds"]) == (66, "0.098000", 0)
        assert (await _get(client, "m", GB_MOBILE))[1]["reason"] == "insufficient_balance"
        # Asked more than affordable: held up to what is left.
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=300)
        assert (status, doc["held_amount"]) == (201, "0.050000")
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=6000)
        assert (status, doc["max_duration_s"], doc["held_amount"]) == (201, 300, "0.050000")
        assert await _get(client, "acc-1", US_FIXED) == (200, {
            "allowed": False, "reason": "insufficient_balance", "max_duration_s": 0, "balance": "0.100000"})

    env.run(body)


def test_reservation_id_is_idempotent(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))

    async def body(client: Client) -> None:
        first = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=120, reservation_id="call-1")
        assert first[0] == 201 and first[1]["reservation_id"] == "call-1"
        again = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=120, reservation_id="call-1")
        assert again == (200, first[1])
        status, doc = await _reserve(client, "acc-1", to=GB_FIXED, reservation_id="call-1")
        assert (status, doc["field"]) == (409, "reservation_id")
        assert (await _get(client, "acc-1", US_FIXED))[1]["max_duration_s"] == 480  # 0.08 left

    env.run(body)
    assert list(env.holds("acc-1")) == ["call-1"]


def test_retry_returns_the_hold_after_the_money_is_fully_held(env: Env) -> None:
    # 0.10 buys 600 s to the US; the first hold takes all of it; the starter account's hold
    # takes all of its europe allowance (600 s) and money buys nothing more.
    env.accounts(account(plan="payg", balance="0.10"), account("s", plan="starter", balance="0.000001"))

    async def body(clients: list[Client]) -> None:
        first = await _reserve(clients[0], "acc-1", to=US_FIXED, reservation_id="call-1")
        assert first[0] == 201 and (first[1]["max_duration_s"], first[1]["held_amount"]) == (600, "0.100000")
        assert (await _get(clients[0], "acc-1", US_FIXED))[1]["reason"] == "insufficient_balance"
        for client in clients:  # any replica, with or without the duration asked first
            assert await _reserve(client, "acc-1", to=US_FIXED, reservation_id="call-1") == (200, first[1])
            assert await _reserve(client, "acc-1", to=US_FIXED, reservation_id="call-1",
                                  max_duration_s=60) == (200, first[1])
        # another id is refused: the money is held
        status, doc = await _reserve(clients[1], "acc-1", to=US_FIXED, reservation_id="call-2")
        assert (status, doc["reason"]) == (409, "insufficient_balance")
        # the same id to another number is still a conflict, not a second hold
        status, doc = await _reserve(clients[1], "acc-1", to=GB_MOBILE, reservation_id="call-1")
        assert (status, doc["field"]) == (409, "reservation_id")

        allowance = await _reserve(clients[0], "s", to=GB_FIXED, reservation_id="pkg-1")
        assert allowance[0] == 201 and allowance[1]["held_seconds"] == 600
        assert (await _get(clients[0], "s", GB_FIXED))[1]["reason"] == "insufficient_balance"
        assert await _reserve(clients[1], "s", to=GB_FIXED, reservation_id="pkg-1") == (200, allowance[1])

    env.run_many(2, body)
    assert list(env.holds("acc-1")) == ["call-1"] and list(env.holds("s")) == ["pkg-1"]
    # a retry still gets its hold when the wallet has since been blocked
    store = RedisWalletStore(env.client)
    store.credit("acc-1", -100_000, kind="adjustment", reference="adj-1")
    assert store.wallet("acc-1")["blocked"] == "1"  # type: ignore[index]

    async def blocked(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, reservation_id="call-1")
        assert (status, doc["reservation_id"], doc["held_amount"]) == (200, "call-1", "0.100000")
        assert (await _reserve(client, "acc-1", to=US_FIXED, reservation_id="call-3"))[1]["reason"] == "blocked"

    env.run(blocked)


def test_concurrent_retries_of_one_reservation_hold_once(env: Env) -> None:
    # 5 POSTs with one id at once on 3 replicas -> one 201, four 200 with the same hold, the
    # money (or allowance) held once. Started together and staggered, so that some requests
    # read the wallet before the hold is written and some after.
    staggers = (0.0, 0.001, 0.003, 0.006)
    env.accounts(*(account(f"c{n}", plan="payg", balance="0.10") for n in range(len(staggers))),
                 account("s", plan="starter", balance="0.000001"))

    async def one(client: Client, delay: float, account_id: str, to: str, rid: str) -> tuple[int, Any]:
        await asyncio.sleep(delay)
        return await _reserve(client, account_id, to=to, reservation_id=rid)

    async def body(clients: list[Client]) -> None:
        rounds = [(f"c{n}", US_FIXED, f"r-{n}", stagger) for n, stagger in enumerate(staggers)]
        rounds.append(("s", GB_FIXED, "r-s", 0.002))
        for account_id, to, rid, stagger in rounds:
            results = await asyncio.gather(*(
                one(clients[i % len(clients)], i * stagger, account_id, to, rid) for i in range(5)))
            assert sorted(status for status, _ in results) == [200, 200, 200, 200, 201], results
            docs = [doc for _, doc in results]
            assert all(doc == docs[0] for doc in docs), docs
            assert docs[0]["reservation_id"] == rid
            if account_id == "s":
                assert (docs[0]["held_seconds"], docs[0]["held_amount"]) == (600, "0.000000")
            else:
                assert (docs[0]["max_duration_s"], docs[0]["held_amount"]) == (600, "0.100000")

    env.run_many(3, body)
    for n in range(len(staggers)):
        holds = env.holds(f"c{n}")
        assert list(holds) == [f"r-{n}"] and b'"amount":100000,' in holds[f"r-{n}"]  # held once
    assert list(env.holds("s")) == ["r-s"]


def test_release(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=GB_MOBILE)
        assert status == 201
        rid = doc["reservation_id"]
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["allowed"] is False
        resp = await client.delete(f"/v1/accounts/acc-1/reservations/{rid}")
        assert resp.status == 204
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["max_duration_s"] == 66
        resp = await client.delete(f"/v1/accounts/acc-1/reservations/{rid}")
        assert resp.status == 404 and (await resp.json())["field"] == "reservation_id"
        assert "already released" in (await resp.json())["error"]
        # a late retry of the released reservation's POST holds nothing
        status, doc = await _reserve(client, "acc-1", to=GB_MOBILE, reservation_id=rid)
        assert (status, doc["field"]) == (409, "reservation_id") and "released" in doc["error"]
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["max_duration_s"] == 66

    env.run(body)


def test_a_closed_reservation_id_is_free_again_once_its_hold_would_have_expired(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))
    clock = FakeClock()

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=60, reservation_id="r")
        assert status == 201  # expires after the 60 s call + the 60 s grace
        assert (await client.delete("/v1/accounts/acc-1/reservations/r")).status == 204
        clock.t += 119.9
        assert (await _reserve(client, "acc-1", to=US_FIXED, reservation_id="r"))[0] == 409
        clock.t += 0.2
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, reservation_id="r")
        assert (status, doc["max_duration_s"]) == (201, 600)
        assert "closed" not in json.loads(env.holds("acc-1")["r"])

    env.run(body, hold_ttl_s=60, clock=clock)


def test_holds_expire(env: Env) -> None:
    # A hold lasts for the call it allows plus the TTL (the grace): 66 s + 60 s here.
    env.accounts(account(plan="payg", balance="0.10"))
    clock = FakeClock()

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=GB_MOBILE, reservation_id="old")
        assert (status, doc["max_duration_s"]) == (201, 66)
        expires = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
        assert abs(expires.timestamp() - (clock.t + 66 + 60)) < 0.002
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["reason"] == "insufficient_balance"
        clock.t += 125.9
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["reason"] == "insufficient_balance"
        clock.t += 0.2  # past expires_at: ignored by reads...
        assert (await _get(client, "acc-1", GB_MOBILE))[1]["max_duration_s"] == 66
        assert set(env.holds("acc-1")) == {"old"}
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=60, reservation_id="new")
        assert status == 201  # ...and deleted by the next reservation
        assert set(env.holds("acc-1")) == {"new"}
        # the same id again after expiry (60 s call + 60 s grace) is a new hold
        clock.t += 119.9
        assert (await _reserve(client, "acc-1", to=US_FIXED, reservation_id="new"))[0] == 200
        clock.t += 0.2
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, reservation_id="new")
        assert (status, doc["max_duration_s"]) == (201, 600)
        # the hash never outlives its longest-lived hold (600 s + 60 s) for long
        assert 600_000 < env.client.pttl("h:{acc-1}") <= 660_000
        # releasing an expired hold: "no such reservation" as for the reads, and it is gone
        clock.t += 660.1
        resp = await client.delete("/v1/accounts/acc-1/reservations/new")
        assert resp.status == 404 and (await resp.json())["field"] == "reservation_id"
        assert env.holds("acc-1") == {}

    env.run(body, hold_ttl_s=60, clock=clock)
    assert env.client.exists("h:{acc-1}") == 0  # (an empty hash is no key)


def test_hold_lasts_for_the_call_it_allows(env: Env) -> None:
    """The hold must outlive the call it allows: 14.40 buys 86 400 s to the US at 0.01/min,
    so the hold lasts 86 400 s + the TTL (7200 s by default, the grace), not just the TTL."""
    env.accounts(account(plan="payg", balance="14.40"),
                 account("open", plan="business", billing="postpaid", balance="0.00"))
    clock = FakeClock()
    start = clock.t

    def expires_in(doc: dict[str, Any]) -> float:
        return datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00")).timestamp() - start

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, reservation_id="long")
        assert (status, doc["max_duration_s"], doc["held_amount"]) == (201, 86_400, "14.400000")
        assert abs(expires_in(doc) - (86_400 + 7_200)) < 0.002
        # an unlimited hold (nothing to hold) counts the longest call the pipeline rates
        status, doc = await _reserve(client, "open", to=JP_FIXED)
        assert (status, doc["max_duration_s"]) == (201, None)
        assert abs(expires_in(doc) - (86_400 + 7_200)) < 0.002
        for later in (7_201, 50_000, 86_400 + 7_199.9):  # the call may still run: money still held
            clock.t = start + later
            assert (await _get(client, "acc-1", US_FIXED))[1]["reason"] == "insufficient_balance"
            status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=60)
            assert (status, doc["reason"]) == (409, "insufficient_balance")
        clock.t = start + 86_400 + 7_200.1  # call and grace over: the hold has expired
        assert (await _get(client, "acc-1", US_FIXED))[1]["max_duration_s"] == 86_400
        # a short hold lasts its call plus the grace
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=120)
        assert status == 201 and abs(expires_in(doc) - (86_400 + 7_200.1 + 120 + 7_200)) < 0.002

    env.run(body, clock=clock)


def test_rated_cdr_releases_its_hold(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))

    async def body(client: Client) -> None:
        status, _ = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=600, reservation_id="r-1")
        assert status == 201
        assert (await _get(client, "acc-1", US_FIXED))[1]["max_duration_s"] == 0
        # The switch reports the call (45 s: one minute, 0.01) with the hold's id.
        cat = parse_catalog(env.catalog)
        store = RedisWalletStore(env.client)
        rater = Rater(cat, store.load_accounts(), store)
        row = rater.rate_batch([(call("e1", US_FIXED, 45, reservation_id="r-1"), "p0:1")], NOW).records()[0]
        assert (row.status, row.charge, row.balance_after) == ("rated", 10_000, 90_000)
        # The hold is closed: it holds nothing, and its id stays taken until it would have expired.
        marker = json.loads(env.holds("acc-1")["r-1"])
        assert (marker["closed"], marker["amount"], marker["seconds"], marker["field"]) == ("settled", 0, 0, "")
        assert await _get(client, "acc-1", US_FIXED) == (200, {
            "allowed": True, "reason": "ok", "max_duration_s": 540, "balance": "0.090000"})
        # A late retry of the reservation's POST does not hold money for a call already rated.
        status, doc = await _reserve(client, "acc-1", to=US_FIXED, max_duration_s=600, reservation_id="r-1")
        assert (status, doc["field"]) == (409, "reservation_id") and "settled" in doc["error"]
        assert await _get(client, "acc-1", US_FIXED) == (200, {
            "allowed": True, "reason": "ok", "max_duration_s": 540, "balance": "0.090000"})
        resp = await client.delete("/v1/accounts/acc-1/reservations/r-1")
        assert resp.status == 404 and "settled" in (await resp.json())["error"]
        assert RedisWalletStore(env.client).holds("acc-1") == {}
        # The same CDR redelivered changes nothing (and leaves the marker as it is).
        again = rater.rate_batch([(call("e1", US_FIXED, 45, reservation_id="r-1"), "p0:1")], NOW).records()[0]
        assert (again.status, again.balance_after) == ("rated", 90_000)
        assert json.loads(env.holds("acc-1")["r-1"])["closed"] == "settled"

    env.run(body)


def test_reserved_calls_settled_in_any_order_never_overspend(env: Env) -> None:
    """SPEC: a reservation holds allowance and money so concurrent calls cannot overspend.
    Starter (home US, europe package 600 s), balance 0.20. X holds the 600 package seconds
    for a GB mobile call, then Y holds the 0.20 for a GB fixed call (10 min at 0.02): all is
    held. Both calls take their full 600 s and Y's CDR is settled first. Y may not cover
    itself with the seconds X holds: it pays its 0.20, X is covered, the balance ends at 0."""
    env.accounts(account(plan="starter", home_country="US", balance="0.20"))

    async def body(client: Client) -> None:
        status, x = await _reserve(client, "acc-1", to=GB_MOBILE, max_duration_s=600, reservation_id="X")
        assert (status, x["held_seconds"], x["held_amount"]) == (201, 600, "0.000000")
        status, y = await _reserve(client, "acc-1", to=GB_FIXED, max_duration_s=600, reservation_id="Y")
        assert (status, y["held_seconds"], y["held_amount"]) == (201, 0, "0.200000")
        assert (await _get(client, "acc-1", GB_FIXED))[1]["reason"] == "insufficient_balance"
        cat = parse_catalog(env.catalog)
        store = RedisWalletStore(env.client)
        rater = Rater(cat, store.load_accounts(), store)
        now = datetime.now(UTC).replace(microsecond=0)  # this period: the holds' period
        at = now.isoformat().replace("+00:00", "Z")
        rows = rater.rate_batch([(call("y", GB_FIXED, 600, reservation_id="Y", started_at=at), "p0:1")], now).records()
        assert (rows[0].covered_s, rows[0].charge, rows[0].balance_after) == (0, 200_000, 0)
        rows = rater.rate_batch([(call("x", GB_MOBILE, 600, reservation_id="X", started_at=at), "p0:2")], now).records()
        assert (rows[0].covered_s, rows[0].charge, rows[0].balance_after) == (600, 0, 0)
        assert {rid: json.loads(doc)["closed"] for rid, doc in env.holds("acc-1").items()} == {
            "X": "settled", "Y": "settled"}
        assert store.holds("acc-1") == {}

    env.run(body)


def test_an_unreserved_call_leaves_the_held_seconds_alone(env: Env) -> None:
    """A call without a reservation (and one whose hold holds no seconds) covers only the
    package seconds no live hold keeps; once the hold is released they are free again."""
    env.accounts(account(plan="starter", home_country="US", balance="5.00"))

    async def body(client: Client) -> None:
        status, held = await _reserve(client, "acc-1", to=GB_MOBILE, max_duration_s=420, reservation_id="H")
        assert (status, held["held_seconds"]) == (201, 420)
        cat = parse_catalog(env.catalog)
        store = RedisWalletStore(env.client)
        rater = Rater(cat, store.load_accounts(), store)
        now = datetime.now(UTC).replace(microsecond=0)
        at = now.isoformat().replace("+00:00", "Z")
        # 600 s package, 420 s held: an unreserved 300 s call covers 180 s and pays 120 s
        row = rater.rate_batch([(call("u1", GB_FIXED, 300, started_at=at), "p0:1")], now).records()[0]
        assert (row.covered_s, row.charged_s, row.charge) == (180, 120, 40_000)
        resp = await client.delete("/v1/accounts/acc-1/reservations/H")
        assert resp.status == 204
        row = rater.rate_batch([(call("u2", GB_FIXED, 600, started_at=at), "p0:2")], now).records()[0]
        assert (row.covered_s, row.charged_s) == (420, 180)

    env.run(body)


def _europe_hold(seconds: int, to: str = GB_FIXED) -> str:
    """A live dialer hold (JSON, as `h:{A}` stores it) of `seconds` of this period's europe
    package (anchor day 1), expiring in a minute."""
    period = datetime.now(UTC).strftime("%Y-%m-01")
    return json.dumps({"to": to, "amount": 0, "seconds": seconds, "field": f"europe|{period}",
                       "duration_s": seconds, "created_at_ms": 0,
                       "expires_at_ms": int(time.time() * 1000) + 60_000})


def _settle_with_dialer_between(env: Env, duration_s: int,
                                after_lookup: Callable[[int], None]) -> tuple[RatedRecord, int]:
    """Settle one call of acc-1 to a GB fixed number with `after_lookup(n)` run after the
    batch's n-th lookup (the dialer acting between lookup and apply): (its row, lookups)."""
    lookups = [0]

    class DialerBetween(RedisWalletStore):
        def lookup(self, *args: Any) -> Any:
            found = super().lookup(*args)
            lookups[0] += 1
            after_lookup(lookups[0])
            return found

    store = DialerBetween(env.client)
    rater = Rater(parse_catalog(env.catalog), store.load_accounts(), store)
    now = datetime.now(UTC).replace(microsecond=0)
    at = now.isoformat().replace("+00:00", "Z")
    row = rater.rate_batch([(call("c1", GB_FIXED, duration_s, started_at=at), "p0:1")], now).records()[0]
    return row, lookups[0]


def test_a_hold_taken_between_lookup_and_apply_sends_the_batch_round_again(env: Env) -> None:
    """The dialer reserves package seconds while a batch is being settled (after its lookup,
    before its apply): the apply script sees the holds changed, writes nothing, and the
    batch is settled again on the new holds."""
    env.accounts(account(plan="starter", home_country="US", balance="5.00"))

    def reserve_once(n: int) -> None:
        if n == 1:
            env.client.hset("h:{acc-1}", "late", _europe_hold(500, to=GB_MOBILE))

    row, lookups = _settle_with_dialer_between(env, 300, reserve_once)
    assert lookups == 2  # stale once, settled on the second round
    assert (row.covered_s, row.charged_s) == (100, 200)  # 600 - 500 held


def test_dialer_hold_churn_between_lookup_and_apply_does_not_stall_the_pipeline(env: Env) -> None:
    """A busy dialer takes and releases holds on the package between every lookup and apply
    of a batch (hundreds of reservations a second on one account). Holds that still fit
    beside what the batch covers change nothing: the batch applies on its first round. (It
    used to be sent round again on every change, and after 5 rounds `metering run` died of
    StaleSnapshot: reproduced live with serve-api and `metering run` on one Redis.)"""
    env.accounts(account(plan="starter", home_country="US", balance="5.00"))
    env.client.hset("h:{acc-1}", mapping={"gone": _europe_hold(120), "kept": _europe_hold(60)})

    def churn(n: int) -> None:
        # after every lookup the held seconds differ: one hold released, another taken,
        # each still fitting beside the batch (300 covered + 60 + 170..175 <= 600)
        env.client.hdel("h:{acc-1}", "gone", f"new{n - 1}")
        env.client.hset("h:{acc-1}", f"new{n}", _europe_hold(170 + n))

    row, lookups = _settle_with_dialer_between(env, 300, churn)
    assert lookups == 1  # applied on its first round
    assert (row.covered_s, row.charged_s, row.charge) == (300, 0, 0)  # 600 - 180 held at lookup
    period = datetime.now(UTC).strftime("%Y-%m-01")
    assert env.client.hget("u:{acc-1}", f"europe|{period}") == b"300"


def test_a_hold_taken_between_lookup_and_apply_that_would_not_fit_sends_the_batch_round_again(env: Env) -> None:
    """The other side of the churn test: holds taken after the lookup that, beside what the
    batch covers, would pass the package limit make the batch settle again on the new holds
    (each hold's seconds stay there for its call), however many rounds that takes."""
    env.accounts(account(plan="starter", home_country="US", balance="5.00"))

    def greedy(n: int) -> None:
        if n <= 3:  # 100 more seconds held after each of 3 lookups
            env.client.hset("h:{acc-1}", f"h{n}", _europe_hold(100))

    row, lookups = _settle_with_dialer_between(env, 600, greedy)
    assert lookups == 4
    assert (row.covered_s, row.charged_s) == (300, 300)  # 600 - 300 held


def test_reservation_refusals(env: Env) -> None:
    env.accounts(account(plan="nopremium", balance="1.00"), account("blk", plan="payg", balance="0"))

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "acc-1", to=GB_PREMIUM)
        assert (status, doc["reason"], doc["error"]) == (409, "premium_not_allowed", "premium_not_allowed")
        assert (await _reserve(client, "acc-1", to="+999123"))[1]["reason"] == "unknown_destination"
        assert (await _reserve(client, "blk", to=US_FIXED))[1]["reason"] == "blocked"

    env.run(body)
    assert env.holds("acc-1") == {} and env.holds("blk") == {}


def test_free_and_unlimited_calls_hold_nothing(env: Env) -> None:
    env.accounts(account("open", plan="business", billing="postpaid", balance="0.00"))

    async def body(client: Client) -> None:
        status, doc = await _reserve(client, "open", to=JP_FIXED)
        assert (status, doc["max_duration_s"], doc["held_amount"]) == (201, None, "0.000000")
        status, doc = await _reserve(client, "open", to=JP_FIXED, max_duration_s=120)
        assert (status, doc["max_duration_s"], doc["held_amount"]) == (201, 120, "0.120000")

    env.run(body)


# ----------------------------------------------------------------- accounts import


def test_a_fee_crossing_the_thresholds_requests_a_topup_and_alerts_once(env: Env) -> None:
    """A negative adjustment (a monthly fee) moves a prepaid balance like a usage debit does:
    crossing the auto top-up threshold requests one top-up (none while it is outstanding),
    crossing the low-balance alert emits low_balance, reaching 0 blocks."""
    from rating.wallet import EV_BLOCKED, EV_LOW_BALANCE, EV_TOPUP_REQUESTED

    env.accounts(account("f", plan="starter", balance="60.00", auto_topup={"threshold": "20.00", "amount": "50.00"},
                         low_balance_alert="15.00"),
                 account("p", plan="business", billing="postpaid", balance="0", auto_topup=None,
                         low_balance_alert="5.00"))
    store = RedisWalletStore(env.client)

    def fee(account_id: str, amount: int, ref: str) -> tuple[int, int]:
        balance, bits, _ = store.credit(account_id, -amount, kind="adjustment", reference=ref)
        return balance, bits

    assert fee("f", 30_000_000, "fee:1") == (30_000_000, 0)  # 60 -> 30: above both
    assert fee("f", 12_000_000, "fee:2") == (18_000_000, EV_TOPUP_REQUESTED)  # crosses 20
    assert store.wallet("f")["topup_pending"] == "1"  # type: ignore[index]
    assert fee("f", 4_000_000, "fee:3") == (14_000_000, EV_LOW_BALANCE)  # crosses 15; top-up outstanding
    assert fee("f", 14_000_000, "fee:4") == (0, EV_BLOCKED)
    assert fee("f", 14_000_000, "fee:4") == (0, EV_BLOCKED)  # a replay answers as first applied
    assert fee("p", 10_000_000, "fee:1") == (-10_000_000, 0)  # postpaid: no prepaid alerts
    # a top-up settles the request; the next crossing may request again
    store.credit("f", 50_000_000, kind="topup", reference="pay-1", settles_topup=True)
    assert store.wallet("f")["topup_pending"] == "0"  # type: ignore[index]
    assert fee("f", 31_000_000, "fee:5")[1] == EV_TOPUP_REQUESTED  # 50 -> 19


def test_reimport_recomputes_the_block_flag(env: Env) -> None:
    """Re-importing keeps the live balance and recomputes `blocked` from it and the new
    billing / credit_limit (SPEC: postpaid blocks only past a set credit_limit, prepaid at
    balance <= 0), so the dialer follows the new terms at once."""
    cat = parse_catalog(env.catalog)
    store = RedisWalletStore(env.client)

    def load(*accs: dict[str, Any]) -> list[tuple[str, str, int]]:
        result = store.import_wallets(parse_accounts({"accounts": list(accs)}, cat).values())
        return [(c.account_id, c.kind, c.balance) for c in result.block_changes]

    def pp(**kw: Any) -> dict[str, Any]:
        return account("pp", plan="business", billing="postpaid", **kw)

    def pre(**kw: Any) -> dict[str, Any]:
        return account("pre", plan="payg", **kw)

    def run(expected: dict[str, str]) -> None:  # what authorize answers now, per account
        async def body(client: Client) -> None:
            got = {a: (await _get(client, a, US_FIXED))[1]["reason"] for a in expected}
            assert got == expected
        env.run(body)

    assert load(pp(balance="-1.50", credit_limit="1.00"), pre(balance="0")) == []  # new wallets
    run({"pp": "blocked", "pre": "blocked"})
    # the file's balance is ignored for existing wallets: the live one decides
    assert load(pp(balance="100.00", credit_limit="5.00"), pre(billing="postpaid", balance="9.00")) == [
        ("pp", "unblocked", -1_500_000), ("pre", "unblocked", 0)]
    run({"pp": "ok", "pre": "ok"})
    assert store.balances(["pp", "pre"]) == {"pp": -1_500_000, "pre": 0}
    assert load(pp(balance="0", credit_limit="1.00"), pre(balance="9.00")) == [
        ("pp", "blocked", -1_500_000), ("pre", "blocked", 0)]  # back to prepaid at 0: blocked
    run({"pp": "blocked", "pre": "blocked"})
    assert load(pp(balance="0", credit_limit=None)) == [("pp", "unblocked", -1_500_000)]  # no limit
    run({"pp": "ok"})
    assert load(pp(balance="0", credit_limit=None)) == []  # unchanged: nothing to report
    assert load(pp(balance="0", credit_limit="1.50")) == []  # exactly at the limit: not passed
    run({"pp": "insufficient_balance"})  # not blocked, but nothing left to spend
    assert store.import_accounts(parse_accounts({"accounts": [pp(credit_limit="1.49"), pre()]}, cat).values()) == (0, 2)
    assert store.wallet("pp")["blocked"] == "1"  # type: ignore[index]
    # a credit afterwards still works on the re-imported record
    assert store.credit("pp", 1_000_000, kind="credit", reference="c-1")[:2] == (-500_000, 2)


# ------------------------------------------------------------------- operations


def test_health_ready_metrics(env: Env) -> None:
    env.accounts(account(plan="payg"))

    async def body(client: Client) -> None:
        resp = await client.get("/healthz")
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
        resp = await client.get("/readyz")
        assert resp.status == 200 and await resp.json() == {"ready": True, "redis": True, "catalog": "test-1"}
        await _get(client, "acc-1", US_FIXED)
        await _get(client, "acc-1", "bad")
        resp = await client.get("/metrics")
        text = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        assert 'metering_api_requests_total{reason="ok",route="/v1/accounts/{id}/authorize",status="200"}' in text
        assert 'reason="bad_request",route="/v1/accounts/{id}/authorize",status="400"' in text
        assert 'metering_api_request_seconds_bucket{le="0.005",route="/v1/accounts/{id}/authorize"}' in text

    env.run(body)


def test_redis_down_is_503_not_ready(env: Env) -> None:
    async def main() -> None:
        app = make_app(str(env.catalog_path), "redis://127.0.0.1:1/0", redis_timeout_s=0.5)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get(f"/v1/accounts/acc-1/authorize?to={US_FIXED}")
            assert resp.status == 503 and (await resp.json())["error"]
            resp = await client.post("/v1/accounts/acc-1/reservations", json={"to": US_FIXED})
            assert resp.status == 503
            resp = await client.get("/readyz")
            assert resp.status == 503 and (await resp.json())["redis"] is False
            assert (await client.get("/healthz")).status == 200

    asyncio.run(main())


def test_redis_down_is_logged_with_the_account_and_the_address(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The log line of a request Redis could not serve names the account and Redis's own
    message (its address); before it held repr(), which for redis-py 8 is only the category
    ("network:ConnectionError"), and no account."""
    async def main() -> None:
        app = make_app(str(env.catalog_path), "redis://127.0.0.1:1/0", redis_timeout_s=0.5)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get(f"/v1/accounts/acc-7/authorize?to={US_FIXED}")
            assert resp.status == 503

    with caplog.at_level(logging.ERROR, logger="metering.api"):
        asyncio.run(main())
    fields = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "redis unavailable"]
    assert fields, caplog.text
    assert fields[0]["account_id"] == "acc-7", fields
    assert "127.0.0.1:1" in fields[0]["error"], fields


def test_corrupt_wallet_is_503_and_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.accounts(account(plan="payg"))
    env.client.hset("w:{acc-1}", "balance", "lots")

    async def body(client: Client) -> None:
        resp = await client.get(f"/v1/accounts/acc-1/authorize?to={US_FIXED}")
        assert resp.status == 503 and (await resp.json())["error"]

    with caplog.at_level(logging.ERROR, logger="metering.api"):
        env.run(body)
    assert any(r.name == "metering.api" and r.levelno == logging.ERROR for r in caplog.records)


def test_catalog_reload(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))

    async def until(client: Client, expected: Any) -> None:
        for _ in range(100):
            if (await _get(client, "acc-1", GB_MOBILE))[1]["max_duration_s"] == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"catalog not reloaded: max_duration_s != {expected}")

    async def body(client: Client) -> None:
        await until(client, 66)
        cheaper = catalog_dict(version="test-2")
        cheaper["rate_tables"]["standard"][3] = {"prefix": "447", "per_minute": "0.0400",
                                                 "connect_fee": "0", "increments": [60, 60]}
        env.write_catalog(cheaper)  # 0.04/min: 0.10 -> 2.5 min -> 120 s
        await until(client, 120)
        env.catalog_path.write_text("version: [broken", encoding="utf-8")
        await asyncio.sleep(0.3)
        await until(client, 120)  # a refused catalog keeps the previous one
        resp = await client.get("/readyz")
        assert resp.status == 200 and (await resp.json())["catalog"] == "test-2"

    env.run(body, reload_interval_s=0.05)


def test_not_ready_until_a_good_catalog(env: Env) -> None:
    env.accounts(account(plan="payg", balance="0.10"))
    env.catalog_path.write_text("version: 1\n", encoding="utf-8")

    async def body(client: Client) -> None:
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["catalog"] is None
        resp = await client.get(f"/v1/accounts/acc-1/authorize?to={US_FIXED}")
        assert resp.status == 503 and (await resp.json())["error"]
        env.write_catalog(env.catalog)
        for _ in range(100):
            if (await client.get("/readyz")).status == 200:
                break
            await asyncio.sleep(0.05)
        assert (await _get(client, "acc-1", US_FIXED)) == (200, {
            "allowed": True, "reason": "ok", "max_duration_s": 600, "balance": "0.100000"})

    env.run(body, reload_interval_s=0.05)


def test_decisions_match_the_pure_logic(env: Env) -> None:
    """The API answers exactly what Authorizer.decide answers on the same state."""
    env.accounts(account(plan="payg", balance="0.37"), account("s", plan="starter", balance="0.01"))
    auth = Authorizer(parse_catalog(env.catalog))
    accs = parse_accounts({"accounts": [account(plan="payg"), account("s", plan="starter")]},
                          parse_catalog(env.catalog))
    numbers = [GB_MOBILE, GB_FIXED, US_FIXED, JP_FIXED, GB_PREMIUM, "+351912345678", "+4930123456"]

    async def body(client: Client) -> None:
        now = datetime.now(UTC)
        for acc_id, balance in (("acc-1", 370_000), ("s", 10_000)):
            for to in numbers:
                expected = auth.decide(accs[acc_id], balance=balance, blocked=False, to=to, now=now)
                assert await _get(client, acc_id, to) == (200, expected.as_json()), (acc_id, to)

    env.run(body)


def test_coalesced_script_calls(redis_url: str) -> None:
    """Calls made in one loop tick share a pipeline; a script Redis does not have yet (restart,
    SCRIPT FLUSH) is loaded and the calls still answer; one call's error stays its own."""
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            src = (f"-- {uuid.uuid4()}\n"
                   "if ARGV[1] == 'boom' then return redis.error_reply('boom') end\n"
                   "return ARGV[1]")
            co = _Coalescer(client, client.register_script(src))  # not loaded: NOSCRIPT first
            for _ in range(2):  # then again, loaded: straight through the pipeline
                results = await asyncio.gather(*(co([], [str(i)]) for i in range(5)),
                                               co([], ["boom"]), return_exceptions=True)
                assert results[:5] == [b"0", b"1", b"2", b"3", b"4"]
                assert isinstance(results[5], redis.ResponseError) and "boom" in str(results[5])
            assert await co([], ["alone"]) == b"alone"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_stale_view_is_resized_in_redis_never_overspent(env: Env) -> None:
    """The Lua re-check is what guards money: a hold sized on a stale view (here: a balance
    that is no longer there) is refused by Redis and re-sized on the fresh state it returns."""
    env.accounts(account(plan="payg", balance="0.05"))
    auth = Authorizer(parse_catalog(env.catalog))

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(env.url)
        try:
            for attempts in (32, 1):
                store = ReservationStore(client, max_attempts=attempts)
                real = store._snapshot_or_hold

                async def stale(*args: Any, real: Any = real) -> Snapshot | Hold | None:
                    snap = await real(*args)
                    return replace(snap, balance=1_000_000) if isinstance(snap, Snapshot) else snap

                store._snapshot_or_hold = stale  # type: ignore[method-assign,assignment]
                if attempts == 1:
                    with pytest.raises(ReservationContention):
                        await store.reserve(auth, "acc-1", US_FIXED, max_duration_s=600)
                    continue
                result = await store.reserve(auth, "acc-1", US_FIXED, max_duration_s=600)
                assert result.status == "created" and result.retries == 1
                assert result.hold is not None
                assert (result.hold.amount, result.hold.duration_s) == (50_000, 300)
        finally:
            await client.aclose()

    asyncio.run(main())
    assert len(env.holds("acc-1")) == 1
