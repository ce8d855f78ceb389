"""Reservations: holds of money and package seconds for one dialer call (SPEC "Dialer
authorization"), and the one-round-trip live read the authorize endpoint uses.

Redis keys (see `wallet_debiter.redis_store`): `w:{A}` wallet hash, `u:{A}` allowance used,
`h:{A}` holds: reservation_id -> JSON `Hold`. `lua/reserve.lua` does both jobs:

* `peek` (read only): wallet fields, the sum of active holds, and used / held seconds of the
  packages that could cover the destination, for the account's current billing period. One
  EVALSHA per authorize request; the calls made by concurrent requests during one event-loop
  tick travel together as one pipeline (one write, one read on one connection).
  Given a reservation_id (what `reserve` does first), a live hold with that id is answered
  instead of the state, in the same atomic step.
* `reserve`: re-checks, atomically against the live wallet and holds, that the hold sized here
  still fits (money available >= hold amount; package seconds used + held + this hold within
  the limit, with exactly the coverage the amount was priced with); deletes expired holds;
  writes the hold. When the state moved since it was read, nothing is written and the fresh
  state comes back: the hold is re-sized (possibly smaller: a reservation holds *up to* the
  requested duration) or refused, and tried again. Concurrent reservations therefore never
  hold more than the wallet has, on any number of API replicas.

Idempotent retries: a reservation with the `reservation_id` of a live hold returns that hold
(status `existing`), whatever the wallet says now: the first read (`peek` with the id) and the
write (`reserve`) both look for the id before any money check, so concurrent and late retries
all get the one hold and the money is held once. A decision is only ever made on a state in
which no live hold had that id.

Hold lifetime (`hold_expiry_ms`): a hold lasts for the call it allows plus a grace,
`expires_at = created_at + max_duration_s + hold_ttl_s` (`hold_ttl_s`, METERING_HOLD_TTL_S,
default 2 h, is the grace: ringing before the call starts, the CDR's way through the
pipeline, the dialer's DELETE). A hold without a duration limit (`max_duration_s` null: it
holds no money) counts MAX_CALL_S, the longest call the pipeline rates. So the money of a call
is never free again while the call it was held for may still run; an abandoned hold locks its
money for at most MAX_CALL_S + hold_ttl_s (dialers should DELETE holds of unanswered calls).
Expired holds are ignored by reads and deleted by the next reservation; the whole `h:{A}`
hash carries a Redis TTL at least as long as its longest-lived hold. The rating engine
deletes a hold when the CDR that carries its reservation_id is applied (`lua/apply.lua`), in
the same atomic step as the debit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from wallet_debiter.authorize import (
    MAX_CALL_S,
    UNKNOWN_ACCOUNT,
    Authorizer,
    Decision,
    WalletDataError,
    WalletView,
)

DEFAULT_HOLD_TTL_S: Final = 7200
MAX_ATTEMPTS: Final = 32
RESERVATION_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"

_LUA: Final = resources.files("wallet_debiter").joinpath("lua/reserve.lua").read_text(encoding="utf-8")


class Hold(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, omit_defaults=True):
    """One reservation as stored in `h:{A}` (JSON)."""

    to: str
    amount: int  # micros held
    seconds: int  # package seconds held
    field: str  # u:{A} field "package|period" the seconds count against ("" none)
    duration_s: int | None  # the call duration held for (None: no limit applies)
    created_at_ms: int
    expires_at_ms: int
    # "settled" (its CDR was rated) or "released" (DELETE): the entry holds nothing and only
    # keeps the id taken until the hold would have expired (lua/reserve.lua)
    closed: str | None = None

    @property
    def expires_at(self) -> str:
        return ms_to_rfc3339(self.expires_at_ms)


_encode_hold = msgspec.json.Encoder().encode
decode_hold = msgspec.json.Decoder(Hold).decode  # one `h:{A}` entry (JSON) as a Hold
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode


def ms_to_rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReservationContention(RuntimeError):
    """The wallet kept changing under a reservation for MAX_ATTEMPTS tries (try again)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live state of one account as `peek` reads it."""

    wallet: WalletView
    balance: int
    blocked: bool
    held_money: int
    period: str
    used_s: dict[str, int]  # per candidate package, current period
    held_s: dict[str, int]

    def decide(self, authorizer: Authorizer, to: str, now: datetime) -> Decision:
        return authorizer.decide(self.wallet, balance=self.balance, blocked=self.blocked, to=to,
                                 now=now, held_money=self.held_money, held_s=self.held_s,
                                 used_s=self.used_s)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """`status`: created | existing (a live hold with this id already) | closed (this id's
    hold was settled or released: `hold.closed` says which) | refused (see `decision`) |
    unknown_account."""

    status: str
    reservation_id: str
    decision: Decision | None = None
    hold: Hold | None = None
    retries: int = 0  # times the hold was re-sized because the wallet changed under it


def _parse_state(state: Sequence[Any], candidates: Sequence[str]) -> Snapshot:
    w, held_money, period, used, held = state
    names = ("balance", "billing", "blocked", "credit_limit", "plan", "home_country",
             "period_anchor_day")
    fields = {n: (v if isinstance(v, str) else None) for n, v in zip(names, w, strict=True)}
    wallet = WalletView.of(fields)
    try:
        balance = int(fields["balance"] or "")
    except ValueError:
        raise WalletDataError(f"unreadable wallet balance {fields['balance']!r}") from None
    return Snapshot(
        wallet=wallet,
        balance=balance,
        blocked=fields["blocked"] == "1",
        held_money=int(held_money),
        period=str(period),
        used_s={p: int(u) for p, u in zip(candidates, used or (), strict=True)},
        held_s={p: int(h) for p, h in zip(candidates, held or (), strict=True)},
    )


class _Coalescer:
    """Sends the script calls made during one event-loop tick as one pipeline: one write and
    one read for many requests instead of one each (concurrent dialer requests share the
    round trip). Each call still gets its own reply or error."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, script: AsyncScript) -> None:
        self.client = client
        self.script = script
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, fut))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        results: list[Any]
        try:
            if len(batch) == 1:
                keys, args, _ = batch[0]
                results = [await self.script(keys=keys, args=args)]
            else:
                pipe = self.client.pipeline(transaction=False)
                for keys, args, _ in batch:
                    # the raw command: a Redis Cluster pipeline blocks pipe.evalsha, routes this by key
                    pipe.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:  # the whole round trip failed: every waiting request sees it
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (keys, args, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, NoScriptError):  # Redis restarted or flushed its scripts
                try:
                    fut.set_result(await self.script(keys=keys, args=args))
                except Exception as exc:
                    fut.set_exception(exc)
            elif isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)


class ReservationStore:
    """Live reads and holds on Redis (an asyncio client with decode_responses=False)."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        hold_ttl_s: int = DEFAULT_HOLD_TTL_S,
        clock: Callable[[], float] = time.time,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        if hold_ttl_s <= 0:
            raise ValueError("hold_ttl_s must be > 0")
        self.client = client
        self.hold_ttl_s = hold_ttl_s
        self.clock = clock
        self.max_attempts = max_attempts
        self._script = client.register_script(_LUA)
        self._coalesced = _Coalescer(client, self._script)

    def now(self) -> tuple[datetime, int]:
        t = self.clock()
        return datetime.fromtimestamp(t, UTC), int(t * 1000)

    @staticmethod
    def keys(account_id: str) -> list[str]:
        tag = f"{{{account_id}}}"
        return [f"w:{tag}", f"u:{tag}", f"h:{tag}"]

    async def _call(self, account_id: str, mode: str, now: datetime, now_ms: int,
                    candidates: Sequence[str], payload: bytes = b"") -> Any:
        args: list[Any] = [mode, now_ms, now.year, now.month, now.day, payload, *candidates]
        raw = await self._coalesced(self.keys(account_id), args)
        return _unpack(raw)

    async def snapshot(self, account_id: str, candidates: Sequence[str], now: datetime,
                       now_ms: int) -> Snapshot | None:
        """One round trip: wallet, active holds, used/held seconds (None: unknown account)."""
        reply = await self._call(account_id, "peek", now, now_ms, candidates)
        if len(reply) == 1:  # ['unknown']
            return None
        return _parse_state(reply, candidates)

    async def _snapshot_or_hold(self, account_id: str, rid: str, candidates: Sequence[str],
                                now: datetime, now_ms: int) -> Snapshot | Hold | None:
        """`snapshot`, or the hold `rid` when there is one, live or closed (one atomic read)."""
        reply = await self._call(account_id, "peek", now, now_ms, candidates, rid.encode())
        if len(reply) == 1:  # ['unknown']
            return None
        if reply[0] in ("exists", "closed"):
            return decode_hold(reply[1])
        return _parse_state(reply, candidates)

    def hold_expiry_ms(self, created_at_ms: int, duration_s: int | None) -> int:
        """When a hold taken at `created_at_ms` for a call of up to `duration_s` expires:
        after the longest call it allows (None: MAX_CALL_S) plus the `hold_ttl_s` grace."""
        call_s = MAX_CALL_S if duration_s is None else duration_s
        return created_at_ms + (call_s + self.hold_ttl_s) * 1000

    async def reserve(
        self,
        authorizer: Authorizer,
        account_id: str,
        to: str,
        *,
        max_duration_s: int | None = None,
        reservation_id: str | None = None,
    ) -> ReserveResult:
        """Hold money and package seconds for a call to `to` of up to `max_duration_s`
        (default: the longest the wallet affords). A live hold with `reservation_id` is
        returned as it is (status `existing`, whatever the wallet and the request say now;
        the caller compares its number)."""
        rid = reservation_id or uuid.uuid4().hex
        now, now_ms = self.now()
        candidates = authorizer.candidate_packages(to)
        found = await self._snapshot_or_hold(account_id, rid, candidates, now, now_ms)
        if isinstance(found, Hold):
            return ReserveResult("closed" if found.closed else "existing", rid, None, found)
        snap = found
        for retries in range(self.max_attempts):
            if snap is None:
                return ReserveResult(UNKNOWN_ACCOUNT, rid, retries=retries)
            decision = snap.decide(authorizer, to, now)
            if not decision.allowed:
                return ReserveResult("refused", rid, decision, retries=retries)
            longest = decision.max_duration_s
            duration = longest if max_duration_s is None else (
                max_duration_s if longest is None else min(max_duration_s, longest))
            quote = decision.quote(duration or 0)
            expires_ms = self.hold_expiry_ms(now_ms, duration)
            hold = Hold(
                to=to, amount=quote.charge, seconds=quote.held_s, field=decision.allowance_field,
                duration_s=duration, created_at_ms=now_ms, expires_at_ms=expires_ms,
            )
            payload = _pack([
                rid, _encode_hold(hold).decode(), quote.charge, decision.package_id or "",
                decision.period or "", -1 if decision.limit_s is None else decision.limit_s,
                quote.billable_s, quote.held_s, expires_ms - now_ms,
            ])
            reply = await self._call(account_id, "reserve", now, now_ms, candidates, payload)
            status = reply[0]
            if status == "ok":
                return ReserveResult("created", rid, decision, hold, retries)
            if status in ("exists", "closed"):
                hold = decode_hold(reply[1])
                return ReserveResult("closed" if hold.closed else "existing", rid, None, hold, retries)
            if status == "unknown":
                return ReserveResult(UNKNOWN_ACCOUNT, rid, retries=retries)
            snap = _parse_state(reply[1], candidates)  # 'stale': re-size on the fresh state
        raise ReservationContention(f"account {account_id!r}: wallet kept changing, try again")

    async def release(self, account_id: str, reservation_id: str) -> tuple[bool, str | None]:
        """Release a live hold: (True, None). Else nothing changes: (False, how an earlier
        close went: "settled" by its CDR or "released"; the id stays taken until the hold would
        have expired), or (False, None): expired, unreadable, never taken or an unknown account
        (an expired hold held nothing any more and is deleted)."""
        now, now_ms = self.now()
        reply = await self._call(account_id, "release", now, now_ms, (), reservation_id.encode())
        if reply[0] == "released":
            return True, None
        return False, decode_hold(reply[1]).closed if reply[0] == "closed" else None

    async def holds(self, account_id: str, *, include_expired: bool = False) -> dict[str, Hold]:
        """The account's holds (active ones unless include_expired), for operators and tests."""
        raw = await self.client.hgetall(self.keys(account_id)[2])
        _, now_ms = self.now()
        out: dict[str, Hold] = {}
        for rid, doc in raw.items():
            try:
                hold = decode_hold(doc)
            except msgspec.DecodeError:
                continue
            if hold.closed is None and (include_expired or hold.expires_at_ms > now_ms):
                out[rid.decode() if isinstance(rid, bytes) else rid] = hold
        return out
