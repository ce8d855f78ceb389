"""Redis wallets: the live `WalletStore` (lookup + atomic apply) plus credits and account import.

Key layout, every key of one account under the hash tag `{account_id}` so that they share one
Redis Cluster slot and a Lua script may touch them together:

  w:{A}  hash  wallet: balance (micros), billing, blocked 0/1, topup_pending 0/1,
               topup_threshold, topup_amount, low_balance_alert, credit_limit (micros or ""),
               plan, home_country, period_anchor_day  -- the dialer reads this in one HMGET;
               opening_balance, opened_at_ms (written once, when an import creates the wallet)
  u:{A}  hash  allowance used: "package|period_start" -> seconds
  d:{A}  hash  dedupe: event_id -> "fingerprint|source|balance_after|bits|covered|charge|fue|thr"
  h:{A}  hash  reservation holds (dialer): reservation_id -> JSON hold
  c:{A}  hash  credits applied: reference -> "balance|bits|at_ms|amount|type" (idempotent credits)
  accounts    set   every imported account id
  pos:{T}     hash  Kafka positions of topic T (standalone: one hash; Cluster: one copy per master)

Redis Cluster (`redis+cluster://host:port[,host:port...]/`, `rediss+cluster://` for TLS): an
account is one slot, so the per-account scripts (credit, reserve) run unchanged; the batch
scripts (lookup, apply) run once per hash slot of the batch's accounts, pipelined (one round
trip per node). Each per-slot apply is atomic for its wallets; a batch is not atomic across
slots, which the per-wallet dedupe entries make safe (see `RedisWalletStore.apply`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
import redis.asyncio as aioredis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from rating.accounts import Account
from rating.money import MAX_CHARGE_MICROS, format_micros
from rating.wallet import (
    AllowanceKey,
    Applied,
    Debit,
    DedupeKey,
    Held,
    Prior,
    StaleSnapshot,
    WalletState,
    decode_prior,
)
from wallet_debiter.reservations import Hold, decode_hold

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


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_CLIENT_OPTS: dict[str, Any] = {"decode_responses": False, "socket_timeout": 30, "health_check_interval": 30}


class RedisUrlError(ValueError):
    """A Redis URL that cannot work (refused before anything connects)."""


def _cluster_url(url: str) -> tuple[str, list[tuple[str, int]]] | None:
    """For a `redis+cluster://` / `rediss+cluster://` URL: the plain redis URL of the first
    seed node and every seed (host, port); None for any other URL. A path other than `/` or
    `/0` is refused (a cluster has only database 0)."""
    parts = urlsplit(url)
    base = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if base is None:
        return None
    if parts.path.strip("/") not in ("", "0"):
        raise RedisUrlError(f"Redis URL {url!r}: a Redis Cluster has only database 0")
    auth, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for hp in hosts.split(","):
        hp = hp.strip()
        if hp.startswith("["):  # [ipv6]:port
            host, _, rest = hp[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = hp.partition(":")
        if not (port or "6379").isdigit():
            raise RedisUrlError(f"Redis URL {url!r}: port {port!r} of seed {hp!r} is not a number")
        seeds.append((host or "127.0.0.1", int(port or 6379)))
    first = f"{auth}@{hosts.split(',')[0]}" if auth else hosts.split(",")[0]
    return urlunsplit((base, first, "/", parts.query, "")), seeds


def connect(url: str) -> redis.Redis | RedisCluster:
    """A sync client: `redis.Redis` for `redis://` / `rediss://` / `unix://`, or
    `redis.RedisCluster` for `redis+cluster://host:port[,host:port...]/` (`rediss+cluster://`:
    TLS). The cluster hosts are seeds only: the client discovers every node and slot from them."""
    cluster = _cluster_url(url)
    if cluster is None:
        parts = urlsplit(url)
        db = parts.path.strip("/")
        if parts.scheme.lower() in ("redis", "rediss") and db and not db.isdigit():
            # redis-py would silently use database 0
            raise RedisUrlError(f"Redis URL {url!r}: database {db!r} is not a number")
        try:
            return redis.Redis.from_url(url, **_CLIENT_OPTS)
        except ValueError as exc:  # a scheme or port redis-py cannot read
            raise RedisUrlError(f"Redis URL {url!r}: {exc}; or redis+cluster://host:port,... for a cluster") from None
    base, seeds = cluster
    nodes = [ClusterNode(h, p) for h, p in seeds]  # type: ignore[no-untyped-call]
    return RedisCluster.from_url(base, startup_nodes=nodes, **_CLIENT_OPTS)


def connect_async(url: str, **options: Any) -> aioredis.Redis | aioredis.RedisCluster:
    """The asyncio client for the same URLs as `connect` (used by the dialer API)."""
    cluster = _cluster_url(url)
    opts = {"decode_responses": False, **options}
    if cluster is None:
        return aioredis.Redis.from_url(url, **opts)
    base, seeds = cluster
    return aioredis.RedisCluster.from_url(
        base, startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in seeds], **opts)


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, aioredis.RedisCluster))


_IMPORT_CHUNK = 500  # wallets per import script call (keeps each script short)



@dataclasses.dataclass(frozen=True, slots=True)
class BlockChange:
    """An existing wallet whose block flag an import changed (`kind`: blocked | unblocked)."""

    account_id: str
    kind: str
    balance: int  # micros, the kept live balance


class CreditRecord(NamedTuple):
    """A credit as applied (`c:{A}`): the balance after it, EV_* bits, when, what."""

    balance: int
    bits: int
    at: datetime  # to the millisecond
    amount: int | None  # micros, signed (None: recorded by an older version)
    kind: str | None  # credit | topup | adjustment
    seq: int = 0  # the wallet's balance-change number (0: recorded by an older version)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Opening(NamedTuple):
    """A wallet's opening balance, as its first import wrote it (Redis's clock)."""

    account_id: str
    balance: int  # micros
    at: datetime  # to the millisecond


@dataclasses.dataclass(slots=True)
class ImportResult:
    new: int = 0
    updated: int = 0
    block_changes: list[BlockChange] = dataclasses.field(default_factory=list)
    # every imported wallet's opening (new or not; none for wallets opened before it was kept)
    openings: list[Opening] = dataclasses.field(default_factory=list)


class RedisWalletStore:
    """`WalletStore` on Redis: one Lua read and one Lua write per batch (per slot in Cluster)."""

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self._slots: dict[str, int] = {}  # account id -> hash slot (a pure function of the id)
        self._lookup = client.register_script(_lua("lookup.lua"))
        self._apply = client.register_script(_lua("apply.lua"))
        self._credit = client.register_script(_lua("credit.lua"))
        self._positions_cas = client.register_script(_lua("positions.lua"))
        self._topup_failed = client.register_script(
            "if redis.call('HGET', KEYS[1], 'topup_pending') == '1' then "
            "redis.call('HSET', KEYS[1], 'topup_pending', '0') return 1 end return 0")
        # positions the next apply checks and writes with the debits (standalone, see
        # bind_positions); positions_applied says whether a successful apply did
        self._bound: tuple[str, list[list[Any]]] | None = None
        self.positions_applied = False
        self._pack = msgspec.msgpack.Encoder().encode
        self._unpack = msgspec.msgpack.Decoder().decode
        # used seconds seen by the last lookup, re-checked by apply (optimistic concurrency)
        self._seen_used: dict[AllowanceKey, int] = {}
        self._seen_held: dict[AllowanceKey, int] = {}  # live holds' seconds seen by lookup

    # ------------------------------------------------------------------ positions

    def bind_positions(self, topic: str, expected: Mapping[int, int], new: Mapping[int, int]) -> None:
        """The next batch's positions: `expected` the ones this worker wrote last (absent: none
        yet), `new` the ones to write. Standalone: the batch's apply checks and writes them in
        its own atomic step, raising PositionsLost instead of applying if Redis went back in
        time. Cluster (positions live on other slots than the wallets) and batches without
        debits: `positions_cas` after the apply does it."""
        self.positions_applied = False
        entries = _position_entries(expected, new)
        self._bound = None if self.cluster or not entries else (f"pos:{{{topic}}}", entries)

    def positions_cas(self, topic: str, expected: Mapping[int, int], new: Mapping[int, int]) -> dict[int, int]:
        """Write `new` positions only if Redis holds `expected` (absent: no check) for each of
        them; else write nothing and return partition -> position held (-1: none) where it
        differs. Cluster: every master has its own AOF and may lose its own last second, so
        every master holds a copy (a key on a slot it serves), each checked and written here,
        and `positions` answers the lowest copy."""
        if not new:
            return {}
        entries = self._pack(_position_entries(expected, new))
        keys = [f"pos:{{{topic}}}"] if not self.cluster else self._position_keys(topic)
        lost: dict[int, int] = {}
        for key in keys:
            result = self._unpack(self._positions_cas(keys=[key], args=[entries]))
            if result[0] == "lost":
                for part, held in result[1]:
                    lost[int(part)] = min(int(held), lost.get(int(part), int(held)))
        return lost

    def positions(self, topic: str) -> dict[int, int]:
        if not self.cluster:
            raw = self.client.hgetall(f"pos:{{{topic}}}")
            return {int(p): int(o) for p, o in raw.items()}
        pipe = self.client.pipeline(transaction=False)
        for key in self._position_keys(topic):
            pipe.hgetall(key)
        out: dict[int, int] = {}
        for raw in pipe.execute():  # the lowest copy: a master that lost writes lost its copy's too
            for p, o in raw.items():
                part, off = int(p), int(o)
                if off < out.get(part, off + 1):
                    out[part] = off
        return out

    def _position_keys(self, topic: str) -> list[str]:
        """Cluster: one `pos:{topic|n}` key per master, n the first whose slot it serves."""
        client = cast(RedisCluster, self.client)
        nodes = client.nodes_manager
        masters = {n.name for n in client.get_primaries()}  # type: ignore[no-untyped-call]
        keys: dict[str, str] = {}
        n = 0
        while len(keys) < len(masters) and n < 1_000_000:
            key = f"pos:{{{topic}|{n}}}"
            owner = nodes.get_node_from_slot(key_slot(key.encode())).name
            if owner in masters and owner not in keys:
                keys[owner] = key
            n += 1
        return list(keys.values())

    # ------------------------------------------------------------------ WalletStore

    def lookup(
        self, dedupe: Sequence[DedupeKey], allowances: Sequence[AllowanceKey]
    ) -> tuple[list[Prior | None], list[int], Held]:
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
        if self.cluster:
            result = self._lookup_per_slot(order, groups)
        else:
            keys: list[str] = []
            for account_id in order:
                tag = f"{{{account_id}}}"
                keys += (f"d:{tag}", f"u:{tag}", f"h:{tag}")
            result = self._unpack(self._lookup(keys=keys, args=[self._pack(groups)]))
        priors: list[Prior | None] = []
        for g, n in where_d:
            raw = result[g][0][n]
            priors.append(decode_prior(raw) if raw else None)
        used = [int(result[g][1][n] or 0) for g, n in where_a]
        self._seen_used = dict(zip(allowances, used, strict=True))
        held: Held = {}
        for account_id, g in order.items():
            flat = result[g][2]
            for j in range(0, len(flat), 3):  # rid, "package|period", seconds
                package_id, _, period = flat[j + 1].partition("|")
                held.setdefault((account_id, package_id, period), {})[flat[j]] = int(flat[j + 2])
        self._seen_held = {key: sum(by_rid.values()) for key, by_rid in held.items()}
        return priors, used, held

    def _pack_debit(self, g: int, debit: Debit, expected: list[list[Any]],
                    expected_seen: set[AllowanceKey], limits: Mapping[AllowanceKey, int]) -> list[Any]:
        """One debit as apply.lua reads it (g: the wallet's 1-based index in the call's KEYS);
        the first debit of each allowance also adds the used seconds the lookup saw."""
        _, event_id, amount, akey, covered, fp, source, outcome, reservation = debit
        field = ""
        if akey is not None:
            field = f"{akey[1]}|{akey[2]}"
            if akey not in expected_seen:
                expected_seen.add(akey)
                limit = limits.get(akey)
                expected.append([g, field, self._seen_used.get(akey, 0), self._seen_held.get(akey, 0),
                                 -1 if limit is None else limit])
        return [g, event_id, amount, field, covered, str(fp), source, "|".join(map(str, outcome)),
                reservation or ""]

    def apply(self, debits: Sequence[Debit], limits: Mapping[AllowanceKey, int] | None = None) -> list[Applied]:
        """Standalone: one atomic script for the batch. Cluster: one atomic script per hash
        slot (see `_apply_per_slot`). `limits` (seconds per allowance covered from): holds
        the dialer took since the lookup that still fit beside the batch do not send it round
        again (apply.lua); without a limit any change of the held seconds does."""
        if self.cluster:
            return self._apply_per_slot(debits, limits or {})
        keys, arg = self._apply_call(debits, limits or {})
        return self._applied(self._apply(keys=keys, args=[arg]))

    def _applied(self, reply: Any) -> list[Applied]:
        result = self._unpack(reply)
        status = result[0]
        if status == "stale":
            raise StaleSnapshot(result[1])
        if status == "lost":
            raise PositionsLost({int(p): int(held) for p, held in result[1]})
        if status != "ok":
            raise WalletApplyFailed(f"wallet apply failed: {result[1]}")
        self.positions_applied = self._bound is not None
        self._bound = None  # written: a later apply without bind_positions must not carry them
        return [(int(b), int(bits), int(seq)) for b, bits, seq in result[1]]

    def _apply_call(self, debits: Sequence[Debit], limits: Mapping[AllowanceKey, int]) -> tuple[list[str], bytes]:
        """KEYS and the packed argument of apply.lua for a batch on one node."""
        order: dict[str, int] = {}
        packed: list[list[Any]] = []
        expected: list[list[Any]] = []
        expected_seen: set[AllowanceKey] = set()
        pack_debit = self._pack_debit
        for debit in debits:
            account_id = debit[0]
            g = order.get(account_id)
            if g is None:
                g = order[account_id] = len(order) + 1  # Lua is 1-based
            packed.append(pack_debit(g, debit, expected, expected_seen, limits))
        keys: list[str] = []
        for account_id in order:
            keys += _keys(account_id)
        if self._bound is None:
            return keys, self._pack([packed, expected])
        keys.append(self._bound[0])
        return keys, self._pack([packed, expected, self._bound[1]])

    # ------------------------------------------------------------------ Cluster: per slot

    def _slot(self, account_id: str) -> int:
        slot = self._slots.get(account_id)
        if slot is None:
            slot = self._slots[account_id] = key_slot(f"{{{account_id}}}".encode())
        return slot

    def _per_slot(self, script: Any, calls: list[tuple[list[str], bytes]]) -> list[Any]:
        """Run `script` once per (keys, packed arg) call, all keys of a call in one slot; the
        calls go in one cluster pipeline, i.e. one round trip per node (redis-py writes to every
        node, then reads). A call that reaches a node no longer serving its slot (MOVED/ASK
        after a reshard or failover) did not run there; redis-py refreshes the slot map and
        sends it again to the right node."""
        if len(calls) == 1:
            keys, arg = calls[0]
            return [script(keys=keys, args=[arg])]
        node_of = cast(RedisCluster, self.client).nodes_manager.get_node_from_slot
        pipe = self.client.pipeline(transaction=False)
        for keys, arg in calls:
            # pipe.evalsha is blocked in a cluster pipeline, so the raw command; routed here by
            # slot, because redis-py 8 otherwise asks the server for the keys of every EVALSHA
            # (COMMAND GETKEYS: one extra round trip per call)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, arg,
                                 target_nodes=node_of(key_slot(keys[0].encode())))
        replies = pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # a node restarted or failed over: load, rerun
                keys, arg = calls[i]
                replies[i] = script(keys=keys, args=[arg])
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def _lookup_per_slot(self, order: dict[str, int], groups: list[tuple[list[str], list[str]]]) -> list[Any]:
        by_slot: dict[int, list[str]] = {}
        for account_id in order:
            by_slot.setdefault(self._slot(account_id), []).append(account_id)
        calls: list[tuple[list[str], bytes]] = []
        for accounts in by_slot.values():
            keys: list[str] = []
            for account_id in accounts:
                tag = f"{{{account_id}}}"
                keys += (f"d:{tag}", f"u:{tag}", f"h:{tag}")
            calls.append((keys, self._pack([groups[order[a]] for a in accounts])))
        result: list[Any] = [None] * len(groups)
        for accounts, reply in zip(by_slot.values(), self._per_slot(self._lookup, calls), strict=True):
            for account_id, got in zip(accounts, self._unpack(reply), strict=True):
                result[order[account_id]] = got
        return result

    def _apply_per_slot(self, debits: Sequence[Debit], limits: Mapping[AllowanceKey, int]) -> list[Applied]:
        """The batch split by hash slot, the same apply script per slot (atomic for its wallets,
        results stitched back into debit order). Slots are not atomic together: if one slot's
        snapshot is stale the others may still apply; StaleSnapshot is raised after all ran,
        and the Settler's next attempt finds the applied ones in their dedupe entries with the
        same source (replays: same rows and wallet events, no second charge)."""
        # slot -> (account -> 1-based index, packed debits, expected allowances, debit positions)
        by_slot: dict[int, tuple[dict[str, int], list[list[Any]], list[list[Any]], list[int]]] = {}
        expected_seen: set[AllowanceKey] = set()
        slot_of = self._slot
        pack_debit = self._pack_debit
        for n, debit in enumerate(debits):
            account_id = debit[0]
            slot = slot_of(account_id)
            grp = by_slot.get(slot)
            if grp is None:
                grp = by_slot[slot] = ({}, [], [], [])
            order, packed, expected, where = grp
            g = order.get(account_id)
            if g is None:
                g = order[account_id] = len(order) + 1
            packed.append(pack_debit(g, debit, expected, expected_seen, limits))
            where.append(n)
        calls: list[tuple[list[str], bytes]] = []
        for order, packed, expected, _ in by_slot.values():
            keys: list[str] = []
            for account_id in order:
                keys += _keys(account_id)
            calls.append((keys, self._pack([packed, expected])))
        out: list[Applied] = [(0, 0, 0)] * len(debits)
        stale: list[str] = []
        errors: list[str] = []
        for (_, _, _, where), reply in zip(by_slot.values(), self._per_slot(self._apply, calls), strict=True):
            result = self._unpack(reply)
            if result[0] == "ok":
                for n, (b, bits, seq) in zip(where, result[1], strict=True):
                    out[n] = (int(b), int(bits), int(seq))
            elif result[0] == "stale":
                stale.append(result[1])
            else:
                errors.append(str(result[1]))
        if errors:
            raise WalletApplyFailed(f"wallet apply failed: {errors[0]} ({len(errors)} of {len(calls)} slot groups)")
        if stale:
            raise StaleSnapshot(f"{stale[0]} ({len(stale)} of {len(calls)} slot groups stale; the others applied)")
        return out

    # ------------------------------------------------------------------ operators

    def import_accounts(self, accounts: Iterable[Account]) -> tuple[int, int]:
        """Create or update wallets (see `import_wallets`). Returns (new, updated)."""
        result = self.import_wallets(accounts)
        return result.new, result.updated

    def import_wallets(self, accounts: Iterable[Account]) -> ImportResult:
        """Create or update wallets. A new wallet opens with the file's balance and the block
        flag that balance implies; an existing one keeps its live balance (re-importing never
        resets money) and gets its block flag recomputed from that balance and the imported
        billing and credit_limit (prepaid: blocked at balance <= 0; postpaid: blocked only with
        a credit_limit that the debt passes), in the same atomic script as the rest of its
        record (`lua/import.lua`), so a debit or credit in between cannot be lost or misjudged.
        Returns the counts and every existing wallet whose block state changed."""
        script = self.client.register_script(_lua("import.lua"))
        accs = list(accounts)
        groups: dict[int, list[Account]] = {}
        for a in accs:  # Cluster: one script call per slot (standalone: all one group)
            groups.setdefault(self._slot(a.account_id) if self.cluster else 0, []).append(a)
        chunks: list[list[Account]] = []
        for group in groups.values():
            chunks += [group[i:i + _IMPORT_CHUNK] for i in range(0, len(group), _IMPORT_CHUNK)]
        calls: list[tuple[list[str], bytes]] = []
        for chunk in chunks:
            rows: list[list[Any]] = []
            for a in chunk:
                config = [
                    "billing", a.billing, "topup_threshold", _opt(a.topup_threshold),
                    "topup_amount", _opt(a.topup_amount), "low_balance_alert", _opt(a.low_balance_alert),
                    "credit_limit", _opt(a.credit_limit), "plan", a.plan_id,
                    "home_country", a.home_country, "period_anchor_day", str(a.period_anchor_day),
                ]
                opening = WalletState.opening(a)
                rows.append([config, str(a.balance), "1" if opening.blocked else "0",
                             a.billing, _opt(a.credit_limit)])
            calls.append(([wallet_key(a.account_id) for a in chunk], self._pack(rows)))
        if self.cluster:
            replies = self._per_slot(script, calls) if calls else []
        else:
            replies = [script(keys=keys, args=[arg]) for keys, arg in calls]
        result = ImportResult()
        for chunk, reply in zip(chunks, replies, strict=True):
            for a, (is_new, bits, balance, opening, opened_ms) in zip(chunk, self._unpack(reply), strict=True):
                if opening is not False:
                    result.openings.append(Opening(a.account_id, int(opening),
                                                   _EPOCH + timedelta(milliseconds=int(opened_ms))))
                if is_new:
                    result.new += 1
                    continue
                result.updated += 1
                if bits:
                    result.block_changes.append(
                        BlockChange(a.account_id, "unblocked" if bits & 2 else "blocked", int(balance)))
        pipe = self.client.pipeline(transaction=False)
        for a in accs:
            pipe.sadd(ACCOUNT_SET, a.account_id)
        pipe.incr(ACCOUNTS_VERSION)
        pipe.execute()
        return result

    def accounts_version(self) -> int:
        """Changes whenever accounts are imported: one GET instead of reloading every wallet."""
        return int(self.client.get(ACCOUNTS_VERSION) or 0)

    def load_accounts(self) -> dict[str, Account]:
        """Every imported account, as the pricer needs them (plan, home country, anchor...)."""
        ids = sorted(m.decode() for m in cast(set[bytes], self.client.smembers(ACCOUNT_SET)))
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

    def holds(self, account_id: str) -> dict[str, Hold]:
        """The dialer's reservations of a wallet (`h:{A}`), expired ones included (scripts drop
        those lazily), closed ones (settled or released: they hold nothing) left out:
        reservation_id -> Hold."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(_keys(account_id)[3]))
        holds = {k.decode(): decode_hold(v) for k, v in raw.items()}
        return {k: h for k, h in holds.items() if h.closed is None}

    def allowance_used(self, account_id: str) -> dict[str, int]:
        raw = self.client.hgetall(_keys(account_id)[1])
        return {cast(bytes, k).decode(): int(v) for k, v in raw.items()}

    def credit(
        self, account_id: str, amount: int, *, kind: str, reference: str,
        settles_topup: bool = False, at: datetime | None = None,
    ) -> tuple[int, int, bool]:
        """Credit (or, negative, adjust) a wallet once per `reference`.
        Returns (balance_after, EV_* bits, replayed). Raises BalanceOutOfRange (nothing
        applied) for a balance beyond what the stores hold exactly."""
        balance, bits, replayed, _ = self.credit_once(account_id, amount, kind=kind, reference=reference,
                                                      settles_topup=settles_topup, at=at)
        return balance, bits, replayed

    def credit_once(
        self, account_id: str, amount: int, *, kind: str, reference: str, once_prefix: str = "",
        settles_topup: bool = False, at: datetime | None = None,
    ) -> tuple[int, int, bool, str]:
        """`credit`, where a credit recorded under any reference starting with `once_prefix`
        also counts as applied (e.g. `fee:2026-11-01:` for one fee per period whatever the
        plan). Returns (balance_after, bits, replayed, the reference holding the record)."""
        at = at or datetime.now(UTC)
        tag = f"{{{account_id}}}"
        try:
            balance, bits, replayed, held_by = self._credit(
                keys=[f"w:{tag}", f"c:{tag}"],
                args=[amount, kind, reference, "1" if settles_topup else "0", int(at.timestamp() * 1000),
                      MAX_CHARGE_MICROS, once_prefix],
            )
        except ResponseError as exc:
            if "balance out of range" in str(exc):
                raise BalanceOutOfRange(account_id, amount) from None
            raise
        held = held_by.decode() if isinstance(held_by, bytes) else str(held_by)
        return int(balance), int(bits), bool(replayed), held

    def credit_record(self, account_id: str, reference: str) -> CreditRecord | None:
        """What `credit` stored for `reference` when it applied it (None: never applied)."""
        raw = self.client.hget(f"c:{{{account_id}}}", reference)
        if raw is None:
            return None
        parts = (raw.decode() if isinstance(raw, bytes) else str(raw)).split("|")
        balance, bits, at_ms = int(parts[0]), int(parts[1]), int(parts[2])
        at = _EPOCH + timedelta(milliseconds=at_ms)
        if len(parts) < 5:  # written before amount and type were recorded
            return CreditRecord(balance, bits, at, None, None)
        return CreditRecord(balance, bits, at, int(parts[3]), parts[4], int(parts[5]) if len(parts) > 5 else 0)

    def settle_topup_failed(self, account_id: str) -> bool:
        """A requested top-up failed: allow the next request (no money moves). False: there
        was no open request (nothing changed)."""
        return bool(self._topup_failed(keys=[wallet_key(account_id)]))

    def accounts_map(self) -> Mapping[str, Account]:
        return self.load_accounts()


def _position_entries(expected: Mapping[int, int], new: Mapping[int, int]) -> list[list[Any]]:
    """{partition, expected (-1: no check), new} as apply.lua and positions.lua read them."""
    return [[str(p), expected.get(p, -1), str(o)] for p, o in new.items()]


class BalanceOutOfRange(ValueError):
    """A credit or adjustment that would take a balance beyond +-MAX_CHARGE_MICROS (Redis
    scripts are exact below 2^53 micros, ClickHouse's Decimal(18, 6) below 1e12 units):
    refused, nothing applied."""

    def __init__(self, account_id: str, amount: int) -> None:
        super().__init__(f"{account_id}: a change of {format_micros(amount)} would take the balance beyond "
                         f"+-{format_micros(MAX_CHARGE_MICROS)}, the most a wallet holds exactly; nothing applied")
        self.account_id = account_id


class WalletApplyFailed(RuntimeError):
    """The apply script refused the batch for a reason no retry mends (a wallet it debits is
    missing: deleted, or Redis wiped); nothing of the slot group it names was written."""


class PositionsLost(RuntimeError):
    """Redis holds other Kafka positions than the ones this worker wrote last: it lost writes
    (or another worker took the partitions over). Nothing of the batch was applied."""

    def __init__(self, held: dict[int, int]) -> None:
        super().__init__(f"Redis holds positions {held}, not the ones this worker wrote")
        self.held = held
