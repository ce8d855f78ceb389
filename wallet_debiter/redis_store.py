"""Redis wallets: the live `WalletStore` (lookup + atomic apply) plus credits and account import.

Key layout, every key of one account under the hash tag `{account_id}` so that they share one
Redis Cluster slot and a Lua script may touch them together:

  w:{A}  hash  wallet: balance (micros), billing, blocked 0/1, topup_pending 0/1,
               topup_threshold, topup_amount, low_balance_alert, credit_limit (micros or ""),
               plan, home_country, period_anchor_day  -- the dialer reads this in one HMGET
  u:{A}  hash  allowance used: "package|period_start" -> seconds
  d:{A}  hash  dedupe: event_id -> "fingerprint|source|balance_after|bits|covered|charge|fue|thr"
  h:{A}  hash  reservation holds (dialer): reservation_id -> JSON hold
  c:{A}  hash  credits applied: reference -> "balance|bits|at_ms" (idempotent credits)
  accounts    set   every imported account id
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import msgspec
import redis

from rating.accounts import Account
from rating.wallet import (
    AllowanceKey,
    Applied,
    Debit,
    DedupeKey,
    Prior,
    StaleSnapshot,
    WalletState,
    decode_prior,
)

ACCOUNT_SET = "accounts"
ACCOUNTS_VERSION = "accounts:version"  # bumped by every import: workers reload on change
_WALLET_FIELDS = (
    "balance", "billing", "blocked", "topup_pending", "topup_threshold", "topup_amount",
    "low_balance_alert", "credit_limit", "plan", "home_country", "period_anchor_day",
)


def wallet_key(account_id: str) -> str:
    return f"w:{{{account_id}}}"


def _keys(account_id: str) -> tuple[str, str, str, str]:
    tag = f"{{{account_id}}}"
    return f"w:{tag}", f"u:{tag}", f"d:{tag}", f"h:{tag}"


def _lua(name: str) -> str:
    return resources.files("wallet_debiter").joinpath(f"lua/{name}").read_text(encoding="utf-8")


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)


def _opt_int(v: Any) -> int | None:
    if v is None or v in (b"", ""):
        return None
    return int(v)


def connect(url: str) -> redis.Redis:
    """A client for a standalone Redis (redis://) ; see README for Cluster."""
    return redis.Redis.from_url(url, decode_responses=False, socket_timeout=30, health_check_interval=30)


class RedisWalletStore:
    """`WalletStore` on Redis: one Lua read and one Lua write per batch (per slot in Cluster)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lookup = client.register_script(_lua("lookup.lua"))
        self._apply = client.register_script(_lua("apply.lua"))
        self._credit = client.register_script(_lua("credit.lua"))
        self._pack = msgspec.msgpack.Encoder().encode
        self._unpack = msgspec.msgpack.Decoder().decode
        # used seconds seen by the last lookup, re-checked by apply (optimistic concurrency)
        self._seen_used: dict[AllowanceKey, int] = {}

    # ------------------------------------------------------------------ positions

    def record_positions(self, topic: str, next_offsets: Mapping[int, int]) -> None:
        """After a batch's debits: the next offset per partition whose effects Redis holds.
        Written after the apply script, so the AOF (an ordered log) never keeps this line
        without the debits before it: if Redis loses its last second, it loses both."""
        if next_offsets:
            self.client.hset(f"pos:{{{topic}}}", mapping={str(p): o for p, o in next_offsets.items()})

    def positions(self, topic: str) -> dict[int, int]:
        raw = self.client.hgetall(f"pos:{{{topic}}}")
        return {int(p): int(o) for p, o in raw.items()}

    # ------------------------------------------------------------------ WalletStore

    def lookup(
        self, dedupe: Sequence[DedupeKey], allowances: Sequence[AllowanceKey]
    ) -> tuple[list[Prior | None], list[int]]:
        order: dict[str, int] = {}
        groups: list[tuple[list[str], list[str]]] = []
        where_d: list[tuple[int, int]] = []
        for account_id, event_id in dedupe:
            g = order.get(account_id)
            if g is None:
                g = order[account_id] = len(groups)
                groups.append(([], []))
            ids = groups[g][0]
            where_d.append((g, len(ids)))
            ids.append(event_id)
        where_a: list[tuple[int, int]] = []
        for account_id, package_id, period in allowances:
            g = order.get(account_id)
            if g is None:
                g = order[account_id] = len(groups)
                groups.append(([], []))
            fields = groups[g][1]
            where_a.append((g, len(fields)))
            fields.append(f"{package_id}|{period}")
        keys: list[str] = []
        for account_id in order:
            tag = f"{{{account_id}}}"
            keys += (f"d:{tag}", f"u:{tag}")
        result = self._unpack(self._lookup(keys=keys, args=[self._pack(groups)]))
        priors: list[Prior | None] = []
        for g, n in where_d:
            raw = result[g][0][n]
            priors.append(decode_prior(raw) if raw else None)
        used = [int(result[g][1][n] or 0) for g, n in where_a]
        self._seen_used = dict(zip(allowances, used, strict=True))
        return priors, used

    def apply(self, debits: Sequence[Debit]) -> list[Applied]:
        order: dict[str, int] = {}
        packed: list[list[Any]] = []
        expected: list[list[Any]] = []
        expected_seen: set[AllowanceKey] = set()
        for account_id, event_id, amount, akey, covered, fp, source, outcome, reservation in debits:
            g = order.get(account_id)
            if g is None:
                g = order[account_id] = len(order) + 1  # Lua is 1-based
            field = ""
            if akey is not None:
                field = f"{akey[1]}|{akey[2]}"
                if akey not in expected_seen:
                    expected_seen.add(akey)
                    expected.append([g, field, self._seen_used.get(akey, 0)])
            packed.append([g, event_id, amount, field, covered, str(fp), source,
                           "|".join(map(str, outcome)), reservation or ""])
        keys: list[str] = []
        for account_id in order:
            keys += _keys(account_id)
        result = self._unpack(self._apply(keys=keys, args=[self._pack([packed, expected])]))
        status = result[0]
        if status == "stale":
            raise StaleSnapshot(result[1])
        if status != "ok":
            raise RuntimeError(f"wallet apply failed: {result[1]}")
        return [(int(b), int(bits)) for b, bits in result[1]]

    # ------------------------------------------------------------------ operators

    def import_accounts(self, accounts: Iterable[Account]) -> tuple[int, int]:
        """Create or update wallets. A new wallet opens with the file's balance; an existing
        one keeps its live balance (re-importing never resets money). Returns (new, updated)."""
        new = updated = 0
        pipe = self.client.pipeline(transaction=False)
        accs = list(accounts)
        for a in accs:
            pipe.exists(wallet_key(a.account_id))
        exists = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for a, present in zip(accs, exists, strict=True):
            config = {
                "billing": a.billing, "topup_threshold": _opt(a.topup_threshold),
                "topup_amount": _opt(a.topup_amount), "low_balance_alert": _opt(a.low_balance_alert),
                "credit_limit": _opt(a.credit_limit), "plan": a.plan_id,
                "home_country": a.home_country, "period_anchor_day": str(a.period_anchor_day),
            }
            if not present:
                opening = WalletState.opening(a)
                config.update(balance=str(a.balance), blocked="1" if opening.blocked else "0", topup_pending="0")
                new += 1
            else:
                updated += 1
            pipe.hset(wallet_key(a.account_id), mapping=config)
            pipe.sadd(ACCOUNT_SET, a.account_id)
        pipe.incr(ACCOUNTS_VERSION)
        pipe.execute()
        return new, updated

    def accounts_version(self) -> int:
        """Changes whenever accounts are imported: one GET instead of reloading every wallet."""
        return int(self.client.get(ACCOUNTS_VERSION) or 0)

    def load_accounts(self) -> dict[str, Account]:
        """Every imported account, as the pricer needs them (plan, home country, anchor...)."""
        ids = sorted(m.decode() for m in self.client.smembers(ACCOUNT_SET))
        pipe = self.client.pipeline(transaction=False)
        for account_id in ids:
            pipe.hmget(wallet_key(account_id), _WALLET_FIELDS)
        out: dict[str, Account] = {}
        for account_id, v in zip(ids, pipe.execute(), strict=True):
            if v[0] is None:
                continue
            out[account_id] = Account(
                account_id=account_id, plan_id=v[8].decode(), home_country=v[9].decode(),
                billing=v[1].decode(), balance=int(v[0]), period_anchor_day=int(v[10]),
                topup_threshold=_opt_int(v[4]), topup_amount=_opt_int(v[5]),
                low_balance_alert=_opt_int(v[6]), credit_limit=_opt_int(v[7]),
            )
        return out

    def wallet(self, account_id: str) -> dict[str, Any] | None:
        v = self.client.hmget(wallet_key(account_id), _WALLET_FIELDS)
        if v[0] is None:
            return None
        return {f: (x.decode() if isinstance(x, bytes) else x) for f, x in zip(_WALLET_FIELDS, v, strict=True)}

    def balances(self, account_ids: Iterable[str]) -> dict[str, int]:
        ids = list(account_ids)
        pipe = self.client.pipeline(transaction=False)
        for a in ids:
            pipe.hget(wallet_key(a), "balance")
        return {a: int(b) for a, b in zip(ids, pipe.execute(), strict=True) if b is not None}

    def allowance_used(self, account_id: str) -> dict[str, int]:
        raw = self.client.hgetall(_keys(account_id)[1])
        return {k.decode(): int(v) for k, v in raw.items()}

    def credit(
        self, account_id: str, amount: int, *, kind: str, reference: str,
        settles_topup: bool = False, at: datetime | None = None,
    ) -> tuple[int, int, bool]:
        """Credit (or, negative, adjust) a wallet once per `reference`.
        Returns (balance_after, EV_* bits, replayed)."""
        at = at or datetime.now(UTC)
        tag = f"{{{account_id}}}"
        balance, bits, replayed = self._credit(
            keys=[f"w:{tag}", f"c:{tag}"],
            args=[amount, kind, reference, "1" if settles_topup else "0", int(at.timestamp() * 1000)],
        )
        return int(balance), int(bits), bool(replayed)

    def settle_topup_failed(self, account_id: str) -> None:
        """A requested top-up failed: allow the next request (no money moves)."""
        self.client.hset(wallet_key(account_id), "topup_pending", "0")

    def accounts_map(self) -> Mapping[str, Account]:
        return self.load_accounts()
