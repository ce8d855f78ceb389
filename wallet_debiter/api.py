"""Dialer authorization API (SPEC "Dialer authorization"): aiohttp, state in Redis.

Routes
  GET    /v1/accounts/{id}/authorize?to=+442071234567
         200 {"allowed", "reason", "max_duration_s", "balance"}; 404 unknown account
  POST   /v1/accounts/{id}/reservations   {"to", "max_duration_s"?, "reservation_id"?}
         201 {"reservation_id", "max_duration_s", "held_amount", "held_seconds", "expires_at"}
         200 the same body when a live hold with that reservation_id and number exists
             (whatever the balance now: a retry, concurrent or late, never holds twice)
         expires_at = created + max_duration_s (null: 86 400) + the hold TTL (a grace)
         409 refused: {"error": reason, "allowed": false, "reason", "max_duration_s", "balance"}
             or {"error", "field": "reservation_id"} when the id holds a call to another number,
             or was settled by its CDR or released (remembered until the hold would have expired)
  DELETE /v1/accounts/{id}/reservations/{rid}   204 released; 404 no such hold
  GET    /v1/accounts/{id}/wallet   200 what a billing page shows, live from Redis: balance,
         held, available, blocked, monthly fee, the billing period and next billing date and,
         per package of the plan, seconds
         used / held / remaining this period; 404 unknown account
  GET    /healthz (process alive)  /readyz (Redis PING and a catalog loaded)  /metrics

Client errors are 4xx with {"error": message, "field": name|null}, never a 5xx; anything
unexpected (Redis down, a corrupt wallet record, a bug) is a 503 JSON answer and a log line.
One Redis round trip per authorize (`reserve.lua` peek); a reservation adds one per attempt.
The catalog is read from a file at start and re-read when its mtime changes (checked once per
second by default); a refused catalog keeps the previous one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from typing import Any, Final
from urllib.parse import unquote

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from metering.logs import log
from metering.logs import setup as setup_logs
from rating.catalog import CatalogError, load_catalog
from rating.money import PICO_PER_MICRO, div_half_up, format_micros
from rating.periods import next_period_start
from wallet_debiter.authorize import E164_RE, MAX_CALL_S, UNKNOWN_ACCOUNT, Authorizer, Decision
from wallet_debiter.redis_store import connect_async
from wallet_debiter.reservations import (
    DEFAULT_HOLD_TTL_S,
    RESERVATION_ID_PATTERN,
    Hold,
    ReservationContention,
    ReservationStore,
)

logger = logging.getLogger("metering.api")

REQUESTS = Counter("metering_api_requests_total", "Dialer API requests",
                   ["route", "status", "reason"])
LATENCY = Histogram(
    "metering_api_request_seconds", "Dialer API request latency", ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RESERVATION_RETRIES = Counter("metering_api_reservation_retries_total",
                              "Reservations re-sized because the wallet changed under them")
CATALOG_RELOADS = Counter("metering_api_catalog_reloads_total", "Catalog (re)loads", ["result"])
CATALOG_LOADED = Gauge("metering_api_catalog_loaded", "1 when a catalog is loaded")

UNKNOWN_ACCOUNT_BODY: Final = {"allowed": False, "reason": UNKNOWN_ACCOUNT,
                               "max_duration_s": None, "balance": None}
_RID_RE: Final = re.compile(RESERVATION_ID_PATTERN)
_BODY_KEYS: Final = ("to", "max_duration_s", "reservation_id")
# Hold.closed -> what a late POST or DELETE of that reservation id is told
_CLOSED: Final = {"settled": "already settled by its call's record", "released": "already released"}
_MAX_BODY: Final = 64 * 1024
_CODINGS: Final = frozenset({"identity", "gzip", "deflate", "br", "zstd"})  # what aiohttp decodes (br: Brotli)
_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """An answer other than the handler's normal one (client errors, not ready...)."""

    def __init__(self, status: int, doc: dict[str, Any], reason: str, *, close: bool = False) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.doc = doc
        self.reason = reason
        self.close = close  # answer with Connection: close (the request stream is unusable)


def bad_request(field: str | None, message: str) -> ApiError:
    return ApiError(400, {"error": message, "field": field}, "bad_request")


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(body=_encode(doc), status=status, content_type="application/json")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _check_to(value: Any) -> str:
    if value is None:
        raise bad_request("to", "to: missing (an E.164 number, + then 1..15 digits)")
    if not isinstance(value, str) or not E164_RE.fullmatch(value):
        raise bad_request("to", f"to: expected an E.164 number (+ then 1..15 digits), got {_short(value)}")
    return value


def _query_to(request: web.Request) -> str:
    """`to` from the raw query string, percent-decoded only: the SPEC's `?to=+44...` keeps
    its literal `+` (form decoding would turn it into a space)."""
    found: str | None = None
    for part in request.rel_url.raw_query_string.split("&"):
        name, _, value = part.partition("=")
        if unquote(name) == "to":
            if found is not None:
                raise bad_request("to", "to: given more than once")
            found = unquote(value)
    return _check_to(found)


def _account_id(request: web.Request) -> str:
    account_id = request.match_info["id"]
    if not 1 <= len(account_id) <= 128:
        raise bad_request("account_id", "account_id: expected 1..128 characters")
    return account_id


class ApiState:
    """Per-application state: the Redis client, the hold store and the current catalog."""

    def __init__(self, catalog_path: str, client: aioredis.Redis | aioredis.RedisCluster, store: ReservationStore,
                 reload_interval_s: float) -> None:
        self.catalog_path = catalog_path
        self.client = client
        self.store = store
        self.reload_interval_s = reload_interval_s
        self.authorizer: Authorizer | None = None
        self._signature: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.catalog_path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load_catalog(self) -> bool:
        """(Re)load the catalog file; a refused one leaves the current catalog in place."""
        self._signature = self._stat()
        try:
            catalog = load_catalog(self.catalog_path)
        except CatalogError as exc:
            CATALOG_RELOADS.labels("refused").inc()
            log(logger, logging.ERROR, "catalog refused, keeping the previous one",
                path=self.catalog_path, errors=exc.errors[:50],
                serving=None if self.authorizer is None else self.authorizer.catalog.version)
            return False
        previous = self.authorizer
        self.authorizer = Authorizer(catalog)
        CATALOG_RELOADS.labels("loaded").inc()
        CATALOG_LOADED.set(1)
        log(logger, logging.INFO, "catalog loaded", path=self.catalog_path, version=catalog.version,
            previous=None if previous is None else previous.catalog.version)
        return True

    async def watch_catalog(self) -> None:
        """Re-read the catalog when its file changes (mtime, size or inode)."""
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                if await asyncio.to_thread(self._stat) != self._signature:
                    await asyncio.to_thread(self.load_catalog)
            except Exception:  # keep watching whatever happens
                logger.exception("catalog watch failed")

    def authorizer_or_503(self) -> Authorizer:
        auth = self.authorizer
        if auth is None:
            raise ApiError(503, {"error": "no catalog loaded", "field": None}, "not_ready")
        return auth


STATE: Final = web.AppKey("state", ApiState)
REASON: Final = web.RequestKey("reason", str)  # the outcome, for the requests counter


# ----------------------------------------------------------------------------- handlers


async def authorize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    account_id = _account_id(request)
    to = _query_to(request)
    auth = st.authorizer_or_503()
    now, now_ms = st.store.now()
    snap = await st.store.snapshot(account_id, auth.candidate_packages(to), now, now_ms)
    if snap is None:
        request[REASON] = UNKNOWN_ACCOUNT
        return _json(404, UNKNOWN_ACCOUNT_BODY)
    decision = snap.decide(auth, to, now)
    request[REASON] = decision.reason
    if decision.reason == UNKNOWN_ACCOUNT:  # the wallet's plan is not in this catalog
        log(logger, logging.WARNING, "account on a plan missing from the catalog",
            account_id=account_id, plan=snap.wallet.plan_id, catalog=auth.catalog.version)
        return _json(404, UNKNOWN_ACCOUNT_BODY)
    return _json(200, decision.as_json())


async def wallet(request: web.Request) -> web.Response:
    """The account's live wallet and this period's package usage, in one Redis round trip
    (the dialer's `peek` with every package of the catalog as candidates)."""
    st = request.app[STATE]
    account_id = _account_id(request)
    catalog = st.authorizer_or_503().catalog
    now, now_ms = st.store.now()
    snap = await st.store.snapshot(account_id, tuple(sorted(catalog.packages)), now, now_ms)
    plan = None if snap is None else catalog.plans.get(snap.wallet.plan_id)
    if snap is None or plan is None:
        request[REASON] = UNKNOWN_ACCOUNT
        return _json(404, {"error": "unknown account", "field": "account_id"})
    request[REASON] = "ok"
    w = snap.wallet
    available: int | None = snap.balance - snap.held_money
    if w.billing == "postpaid":
        available = None if w.credit_limit is None else w.credit_limit + snap.balance - snap.held_money
    packages = []
    for pid in plan.packages:
        pkg = catalog.packages[pid]
        if pkg.scope == "domestic" and w.home_country not in pkg.countries:
            continue  # covers calls to the home country only, which it does not hold: never applies
        limit = pkg.limit_s  # None: unlimited without fair use, nothing is counted
        used = None if limit is None else snap.used_s.get(pid, 0)
        held = None if limit is None else snap.held_s.get(pid, 0)
        packages.append({
            "package_id": pid,
            "unlimited": pkg.unlimited,
            "minutes": None if pkg.allowance_s is None else pkg.allowance_s // 60,
            "fair_use_minutes": None if pkg.fair_use_s is None else pkg.fair_use_s // 60,
            "used_s": used,
            "held_s": held,
            "remaining_s": None if limit is None else max(0, limit - (used or 0) - (held or 0)),
            "percent_used": None if not limit else min(100, (used or 0) * 100 // limit),
        })
    return _json(200, {
        "account_id": account_id,
        "plan": w.plan_id,
        "billing": w.billing,
        "balance": format_micros(snap.balance),
        "held": format_micros(snap.held_money),
        "available": None if available is None else format_micros(available),
        "credit_limit": None if w.credit_limit is None else format_micros(w.credit_limit),
        "blocked": snap.blocked,
        "monthly_fee": format_micros(div_half_up(plan.monthly_fee_pico, PICO_PER_MICRO)),
        "period_start": snap.period,
        # the next period's first day: allowances restart and `fees charge` bills the next fee
        "next_billing_date": next_period_start(date.fromisoformat(snap.period)).isoformat(),
        "packages": packages,
    })


def _hold_doc(rid: str, hold: Hold) -> dict[str, Any]:
    return {
        "reservation_id": rid,
        "max_duration_s": hold.duration_s,
        "held_amount": format_micros(hold.amount),
        "held_seconds": hold.seconds,
        "expires_at": hold.expires_at,
    }


def _int_or_inf(text: str) -> int | float:
    """A JSON integer; one too long for int() (over 4 300 digits) as +-inf, out of range alike."""
    try:
        return int(text)
    except ValueError:
        return float(text)


async def _body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 400 naming the problem (413
    for a body over the size limit, raised by aiohttp and answered by `_observe`)."""
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
        # the stream is broken past this point: answer, then close the connection
        cause = getattr(exc.__cause__, "message", None) or str(exc)
        raise ApiError(400, {"error": f"body: cannot be read: {cause}", "field": None}, "bad_request",
                       close=True) from None
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:
        # A number past what msgspec holds (1e400, an integer of 5 000 digits): its error names
        # no key (`$[...]`). Python's reader takes them (as +-inf), so the field checks below
        # refuse the value naming its field.
        try:
            doc = json.loads(raw, parse_int=_int_or_inf)
        except (ValueError, RecursionError):
            raise bad_request(None, f"body: expected a JSON object ({exc})") from None
    except msgspec.DecodeError as exc:
        raise bad_request(None, f"body: expected a JSON object ({exc})") from None
    except UnicodeDecodeError:  # msgspec decodes string contents as UTF-8 and lets this through
        raise bad_request(None, "body: not valid UTF-8") from None
    except RecursionError:  # msgspec's own depth guard
        raise bad_request(None, "body: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad_request(None, "body: expected a JSON object")
    # A key given twice: msgspec keeps the last one silently (which number is held?)
    try:
        pairs = json.loads(raw, object_pairs_hook=lambda kv: kv)
    except (ValueError, RecursionError):  # msgspec read it; this check has nothing to add
        pairs = []
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise bad_request(key if key in _BODY_KEYS else None, f"{key}: given more than once")
        seen.add(key)
    for key in doc:
        if key not in _BODY_KEYS:
            raise bad_request(str(key), f"{key}: unknown field (allowed: {', '.join(_BODY_KEYS)})")
    return doc


async def create_reservation(request: web.Request) -> web.Response:
    st = request.app[STATE]
    account_id = _account_id(request)
    doc = await _body(request)
    to = _check_to(doc.get("to"))
    duration = doc.get("max_duration_s")
    if duration is not None and (
        not isinstance(duration, int) or isinstance(duration, bool) or not 1 <= duration <= MAX_CALL_S
    ):
        raise bad_request("max_duration_s", f"max_duration_s: expected an integer 1..{MAX_CALL_S}, got {_short(duration)}")
    rid = doc.get("reservation_id")
    if rid is not None and (not isinstance(rid, str) or not _RID_RE.fullmatch(rid)):
        raise bad_request("reservation_id", "reservation_id: expected 1..128 of A-Z a-z 0-9 . _ : -, "
                                            f"got {_short(rid)}")
    auth = st.authorizer_or_503()
    try:
        result = await st.store.reserve(auth, account_id, to, max_duration_s=duration,
                                        reservation_id=rid)
    except ReservationContention:
        RESERVATION_RETRIES.inc(st.store.max_attempts)
        raise ApiError(503, {"error": "the wallet kept changing, try again", "field": None},
                       "contention") from None
    if result.retries:
        RESERVATION_RETRIES.inc(result.retries)
    if result.status == UNKNOWN_ACCOUNT:
        request[REASON] = UNKNOWN_ACCOUNT
        return _json(404, UNKNOWN_ACCOUNT_BODY)
    if result.status == "refused":
        decision: Decision | None = result.decision
        assert decision is not None
        request[REASON] = decision.reason
        if decision.reason == UNKNOWN_ACCOUNT:
            return _json(404, UNKNOWN_ACCOUNT_BODY)
        return _json(409, {"error": decision.reason, **decision.as_json()})
    assert result.hold is not None
    if result.status == "closed":
        request[REASON] = "reservation_closed"
        return _json(409, {"error": f"reservation_id: {_CLOSED.get(result.hold.closed or '', 'closed')}; "
                                    "take a new reservation for a new call", "field": "reservation_id"})
    if result.status == "existing":
        if result.hold.to != to:
            request[REASON] = "reservation_conflict"
            return _json(409, {"error": "reservation_id: holds a call to another number",
                               "field": "reservation_id"})
        request[REASON] = "existing"
        return _json(200, _hold_doc(result.reservation_id, result.hold))
    request[REASON] = "ok"
    log(logger, logging.DEBUG, "reserved", account_id=account_id, reservation_id=result.reservation_id,
        to=to, amount=result.hold.amount, seconds=result.hold.seconds)
    return _json(201, _hold_doc(result.reservation_id, result.hold))


async def release_reservation(request: web.Request) -> web.Response:
    st = request.app[STATE]
    account_id = _account_id(request)
    rid = request.match_info["rid"]
    if not _RID_RE.fullmatch(rid):
        raise bad_request("reservation_id", f"reservation_id: not a valid id {_short(rid)}")
    released, closed = await st.store.release(account_id, rid)
    if released:
        request[REASON] = "released"
        return web.Response(status=204)
    request[REASON] = "unknown_reservation"
    return _json(404, {"error": f"no live reservation: {_CLOSED.get(closed or '', 'never taken or expired')}",
                       "field": "reservation_id"})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    redis_ok = False
    try:
        redis_ok = bool(await asyncio.wait_for(st.client.ping(), timeout=1.0))
    except (TimeoutError, RedisError, OSError):
        redis_ok = False
    auth = st.authorizer
    ready = redis_ok and auth is not None
    request[REASON] = "ready" if ready else "not_ready"
    return _json(200 if ready else 503, {
        "ready": ready, "redis": redis_ok, "catalog": None if auth is None else auth.catalog.version,
    })


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ----------------------------------------------------------------------------- plumbing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON for every error, a 503 (and a log line) for anything unexpected, and metrics."""
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    reason = "-"
    resp: web.StreamResponse
    try:
        coding = request.headers.get("Content-Encoding")
        if coding is not None and coding.strip().lower() not in _CODINGS:
            # aiohttp would read the body as if plain: never act on a body not understood
            raise ApiError(415, {"error": f"Content-Encoding {coding!r} is not supported (one of: "
                                          f"{', '.join(sorted(_CODINGS))})", "field": None}, "bad_request", close=True)
        resp = await handler(request)
        reason = request.get(REASON, "-")
    except ApiError as exc:
        resp, reason = _json(exc.status, exc.doc), exc.reason
        if exc.close:
            resp.force_close()
    except web.HTTPException as exc:  # unknown route (404), wrong method (405), body too large (413)
        resp = _json(exc.status, {"error": exc.reason, "field": None})
        if "Allow" in exc.headers:  # a 405 says which methods the route has (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        reason = "http_error"
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        # str(): redis-py's repr() of its errors is only their category ("network:ConnectionError")
        log(logger, logging.ERROR, "redis unavailable", route=route, account_id=request.match_info.get("id"),
            error=f"{type(exc).__name__}: {exc}")
        resp, reason = _json(503, {"error": "storage unavailable, try again", "field": None}), "unavailable"
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("request failed", extra={"fields": {"route": route, "path": request.path,
                                                             "account_id": request.match_info.get("id")}})
        resp, reason = _json(503, {"error": "internal error, try again", "field": None}), "internal_error"
    LATENCY.labels(route).observe(time.perf_counter() - start)
    REQUESTS.labels(route, str(resp.status), reason).inc()
    return resp


def make_app(
    catalog_path: str,
    redis_url: str,
    *,
    hold_ttl_s: int = DEFAULT_HOLD_TTL_S,
    reload_interval_s: float = 1.0,
    redis_timeout_s: float = 2.0,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The API application. The catalog is loaded now (a refused one: /readyz says not ready
    until a good file appears); Redis connects on first use. `clock` (epoch seconds) sets
    hold times, expiry and the billing period."""
    client = connect_async(  # redis:// or a Redis Cluster (redis+cluster://host:port/)
        redis_url, socket_timeout=redis_timeout_s,
        socket_connect_timeout=redis_timeout_s, health_check_interval=30,
    )
    store = ReservationStore(client, hold_ttl_s=hold_ttl_s, clock=clock)
    state = ApiState(catalog_path, client, store, reload_interval_s)
    state.load_catalog()

    app = web.Application(middlewares=[_observe], client_max_size=_MAX_BODY)
    app[STATE] = state
    app.add_routes([
        # {id:[^/]+}: aiohttp's plain {id} stops at "{" and "}", which account ids may hold
        web.get("/v1/accounts/{id:[^/]+}/authorize", authorize),
        web.post("/v1/accounts/{id:[^/]+}/reservations", create_reservation),
        web.delete("/v1/accounts/{id:[^/]+}/reservations/{rid:[^/]+}", release_reservation),
        web.get("/v1/accounts/{id:[^/]+}/wallet", wallet),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        watcher = asyncio.create_task(state.watch_catalog())
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _serve(app: web.Application, host: str, port: int, metrics_port: int | None) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ports = [port] + ([metrics_port] if metrics_port and metrics_port != port else [])
    for p in ports:
        await web.TCPSite(runner, host, p).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log(logger, logging.INFO, "api listening", host=host, ports=ports)
    try:
        await stop.wait()
    finally:
        log(logger, logging.INFO, "api stopping")
        await runner.cleanup()


def serve(
    host: str,
    port: int,
    *,
    catalog_path: str,
    redis_url: str,
    hold_ttl_s: int = DEFAULT_HOLD_TTL_S,
    metrics_port: int | None = None,
    log_level: str = "INFO",
) -> None:
    """Run the API until SIGTERM/SIGINT. `metrics_port`: also serve (the same app, so
    /healthz, /readyz and /metrics) on that port, where the Kubernetes probes look."""
    setup_logs(log_level)
    app = make_app(catalog_path, redis_url, hold_ttl_s=hold_ttl_s)
    asyncio.run(_serve(app, host, port, metrics_port))
