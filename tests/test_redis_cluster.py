"""The Redis wallet store on a real Redis Cluster (3 masters from `deploy/local/services.sh
start redis-cluster`): the batch scripts split per hash slot give exactly what the in-memory
reference gives, also for replays, a crash between slot groups and a stale slot group."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.cluster import RedisCluster

from metering.config import Settings
from metering.local_services import ensure_started
from metering.simulate import produce_traffic
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from tests.test_pipeline_live import _check_equal, _offline
from wallet_debiter.api import make_app
from wallet_debiter.redis_store import RedisWalletStore, connect, wallet_key

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
NOW = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
BATCH = 2000
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_url() -> str:
    return ensure_started(("redis-cluster",)).redis_cluster_url


@pytest.fixture()
def client(cluster_url: str) -> Iterator[RedisCluster]:
    c = connect(cluster_url)
    assert isinstance(c, RedisCluster)
    c.flushall()
    yield c
    c.close()


@pytest.fixture(scope="module")
def stream() -> list[bytes]:
    """12 k seeded events, 5 % re-sent duplicates, 1 % malformed."""
    return [v for _, v in generate_events(
        load_catalog_dict(CATALOG), load_accounts_list(ACCOUNTS), count=12_000, seed=11,
        start=NOW.replace(hour=0), duplicate_rate=0.05, malformed_rate=0.01, now=NOW)]


def _batches(events: list[bytes]) -> list[list[tuple[bytes, str]]]:
    return [[(v, f"0:{i + n}") for n, v in enumerate(events[i:i + BATCH])] for i in range(0, len(events), BATCH)]


def _rater(store: Any) -> Rater:
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    if isinstance(store, RedisWalletStore):
        store.import_accounts(accs.values())
    return Rater(cat, accs, store if store is not None else MemoryWalletStore(accs))


def _reference(batches: list[list[tuple[bytes, str]]]) -> tuple[Rater, list[Any]]:
    rater = _rater(None)
    return rater, [rater.rate_batch(b, NOW) for b in batches]


def _assert_same_wallets(ref: Rater, store: RedisWalletStore) -> None:
    mem: MemoryWalletStore = ref.store  # type: ignore[assignment]
    assert store.balances(ref.accounts) == {a: mem.wallet(a).balance for a in ref.accounts}
    for a in ref.accounts:
        w = store.wallet(a)
        assert w is not None
        m = mem.wallet(a)
        assert (w["blocked"], w["topup_pending"]) == ("1" if m.blocked else "0", "1" if m.topup_pending else "0"), a
        want = {f"{pkg}|{period}": s for (acc, pkg, period), s in mem.allowance_used.items() if acc == a and s}
        assert {k: v for k, v in store.allowance_used(a).items() if v} == want, a


def test_cluster_store_equals_memory_store_with_duplicates_and_replays(client: RedisCluster, stream: list[bytes]) -> None:
    batches = _batches(stream)
    ref, want = _reference(batches)
    store = RedisWalletStore(client)
    assert store.cluster
    rater = _rater(store)
    for batch, expected in zip(batches, want, strict=True):
        got = rater.rate_batch(batch, NOW)
        assert got.rows == expected.rows
        assert got.wallet_events == expected.wallet_events
    statuses = {r[2] for res in want for r in res.rows}
    assert {"rated", "duplicate", "rejected"} <= statuses
    assert sum(len(res.wallet_events) for res in want) > 0
    _assert_same_wallets(ref, store)

    # A replay of batches with the same sources (consumer rewind): the same rows and wallet
    # events come back, nothing is charged again.
    for n in (1, 3):
        again = rater.rate_batch(batches[n], NOW)
        assert again.rows == want[n].rows
        assert again.wallet_events == want[n].wallet_events
    _assert_same_wallets(ref, store)

    # The same bytes from other offsets (re-produced): all duplicates.
    other = [(v, f"1:{i}") for i, (v, _) in enumerate(batches[2])]
    assert {r[2] for r in rater.rate_batch(other, NOW).rows} <= {"duplicate", "rejected"}
    _assert_same_wallets(ref, store)

    # (b) the wallets really are spread over the masters, and a batch spans many slots
    per_node = {n.name: client.get_redis_connection(n).eval("return #redis.call('KEYS', 'w:*')", 0)
                for n in client.get_primaries()}
    assert sum(per_node.values()) == len(ref.accounts)
    assert sum(1 for c in per_node.values() if c) > 1, per_node
    slots = {client.keyslot(wallet_key(a)) for a in ref.accounts}
    assert len(slots) > len(per_node)


def test_crash_between_slot_groups_then_redelivery(client: RedisCluster, cluster_url: str,
                                                   stream: list[bytes]) -> None:
    """The apply of a batch dies after some slot groups ran (a worker killed between two
    nodes' replies); the redelivered batch (same sources) in a fresh worker re-emits the
    applied groups from their dedupe entries and applies only the rest."""
    batches = _batches(stream)[:3]
    ref, want = _reference(batches)
    store = RedisWalletStore(client)
    rater = _rater(store)
    assert rater.rate_batch(batches[0], NOW).rows == want[0].rows

    real = store._per_slot

    def crash(script: Any, calls: list[tuple[list[str], bytes]]) -> list[Any]:
        if script is store._apply:
            real(script, calls[: len(calls) // 2])
            raise ConnectionError("worker died between slot groups")
        return real(script, calls)

    store._per_slot = crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        rater.rate_batch(batches[1], NOW)
    half = store.balances(ref.accounts)
    mem: MemoryWalletStore = ref.store  # type: ignore[assignment]
    assert half != {a: mem.wallet(a).balance for a in ref.accounts}  # some groups applied...

    fresh = RedisWalletStore(connect(cluster_url))  # the restarted worker
    rater2 = _rater(fresh)  # re-import keeps live balances
    assert fresh.balances(ref.accounts) == half
    for batch, expected in zip(batches[1:], want[1:], strict=True):
        got = rater2.rate_batch(batch, NOW)
        assert got.rows == expected.rows
        assert got.wallet_events == expected.wallet_events
    _assert_same_wallets(ref, fresh)  # ...and nothing was charged twice


def test_stale_slot_group_while_others_apply(client: RedisCluster, stream: list[bytes]) -> None:
    """One slot group's snapshot is stale (another owner moved it): that group writes nothing,
    the others apply, StaleSnapshot makes the Settler settle the batch again, and the result
    is exactly the reference (applied groups are found as replays, not charged twice)."""
    batches = _batches(stream)[:2]
    ref, want = _reference(batches)
    store = RedisWalletStore(client)
    rater = _rater(store)
    real = store._per_slot
    spoiled: list[int] = []
    applies: list[int] = []

    def spoil_one(script: Any, calls: list[tuple[list[str], bytes]]) -> list[Any]:
        if script is store._apply:
            applies.append(len(calls))
        if script is store._apply and not spoiled and len(calls) > 2:
            # expect an allowance value nobody has: the script's optimistic check fails
            packed, expected = store._unpack(calls[1][1])
            calls = list(calls)
            calls[1] = (calls[1][0], store._pack([packed, [*expected, [1, "nopkg|2000-01-01", 999]]]))
            spoiled.append(len(calls))
        return real(script, calls)

    store._per_slot = spoil_one  # type: ignore[method-assign]
    for batch, expected in zip(batches, want, strict=True):
        got = rater.rate_batch(batch, NOW)
        assert got.rows == expected.rows
        assert got.wallet_events == expected.wallet_events
    assert spoiled
    assert len(applies) == len(batches) + 1  # the spoiled batch was settled twice...
    assert applies[1] < applies[0]  # ...the second time only the slot groups not yet applied
    _assert_same_wallets(ref, store)


def _errorstats(client: RedisCluster) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in client.get_primaries():
        for name, v in client.get_redis_connection(node).info("errorstats").items():
            out[name] = out.get(name, 0) + int(v["count"])
    return out


def _reshard(src: str, dst: str, slots: int) -> None:
    """Move `slots` slots (and their keys, MIGRATE) from master `src` to `dst` (host:port)."""
    out = subprocess.run(["redis-cli", "-h", src.split(":")[0], "-p", src.split(":")[1], "cluster", "nodes"],
                         capture_output=True, text=True, check=True).stdout
    ids = {line.split()[1].split("@")[0]: line.split()[0] for line in out.splitlines()}
    subprocess.run(["redis-cli", "--cluster", "reshard", src, "--cluster-from", ids[src], "--cluster-to", ids[dst],
                    "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10"],
                   capture_output=True, text=True, check=True, timeout=120)


def test_slot_migration_under_load_equals_reference(client: RedisCluster, stream: list[bytes]) -> None:
    """Slots (with their wallets) move between masters while batches settle, with a client
    whose slot map predates the moves: MOVED/ASK redirections re-send a slot's script to its
    new owner (a redirected script did not run), and every row and wallet equals the reference."""
    batches = [[(v, f"0:{i + n}") for n, v in enumerate(stream[i:i + 300])] for i in range(0, len(stream), 300)]
    ref, want = _reference(batches)
    store = RedisWalletStore(client)
    rater = _rater(store)
    masters = sorted(n.name for n in client.get_primaries())
    before = _errorstats(client)
    errors: list[BaseException] = []

    def moves() -> None:
        try:
            for k in range(len(masters)):
                _reshard(masters[k], masters[(k + 1) % len(masters)], 1500)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    mover = threading.Thread(target=moves)
    mover.start()
    split = len(batches) - 5
    for batch, expected in zip(batches[:split], want[:split], strict=True):
        got = rater.rate_batch(batch, NOW)
        assert (got.rows, got.wallet_events) == (expected.rows, expected.wallet_events)
    mover.join()
    assert not errors, errors
    for batch, expected in zip(batches[split:], want[split:], strict=True):  # after all moves
        got = rater.rate_batch(batch, NOW)
        assert (got.rows, got.wallet_events) == (expected.rows, expected.wallet_events)
    _assert_same_wallets(ref, store)
    after = _errorstats(client)
    redirected = sum(after.get(k, 0) - before.get(k, 0) for k in ("errorstat_MOVED", "errorstat_ASK"))
    assert redirected > 0
    assert after.get("errorstat_CROSSSLOT", 0) == before.get("errorstat_CROSSSLOT", 0)


def test_positions_are_kept_per_master_and_the_lowest_wins(client: RedisCluster) -> None:
    store = RedisWalletStore(client)
    assert store.positions_cas("t.usage", {}, {0: 10, 1: 20}) == {}
    keys = store._position_keys("t.usage")
    owners = {client.nodes_manager.get_node_from_slot(client.keyslot(k)).name for k in keys}
    assert len(keys) == len(owners) == len(client.get_primaries())
    assert store.positions("t.usage") == {0: 10, 1: 20}
    # one master lost its last writes (its copy is behind): the worker rewinds to it
    client.hset(keys[-1], mapping={"0": 7})
    assert store.positions("t.usage") == {0: 7, 1: 20}


def test_credit_and_authorize_on_the_cluster(client: RedisCluster, cluster_url: str) -> None:
    store = RedisWalletStore(client)
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    assert store.import_accounts(accs.values()) == (len(accs), 0)
    assert store.load_accounts() == dict(accs)
    acc = next(a for a in accs.values() if a.billing == "prepaid")
    before = store.balances([acc.account_id])[acc.account_id]
    ref = f"topup-{uuid.uuid4().hex}"
    bal, _, replayed = store.credit(acc.account_id, 1_000_000, kind="topup", reference=ref)
    assert (bal, replayed) == (before + 1_000_000, False)
    assert store.credit(acc.account_id, 1_000_000, kind="topup", reference=ref)[::2] == (bal, True)

    async def main() -> None:
        async with TestClient(TestServer(make_app(str(CATALOG), cluster_url))) as http:
            resp = await http.get(f"/v1/accounts/{acc.account_id}/authorize?to=%2B447700900123")
            body = await resp.json()
            assert resp.status == 200 and body["balance"] == f"{bal / 1e6:.6f}", body
            assert (await http.get("/v1/accounts/nobody/authorize?to=%2B447700900123")).status == 404
            assert (await http.get("/readyz")).status == 200
            # several reservations in one loop tick: one coalesced cluster pipeline
            replies = await asyncio.gather(*(
                http.post(f"/v1/accounts/{a}/reservations", json={"to": "+447700900123", "max_duration_s": 60})
                for a in list(accs)[:8]))
            assert all(r.status in (201, 200) for r in replies), [r.status for r in replies]

    asyncio.run(main())
    holds = sum(client.hlen(f"h:{{{a}}}") for a in list(accs)[:8])
    assert holds > 0


def test_live_pipeline_on_the_cluster_equals_offline(client: RedisCluster, cluster_url: str, tmp_path: Path) -> None:
    """`metering run --until-idle` with METERING_REDIS_URL=redis+cluster://... on 10 k events."""

    ep = ensure_started(("kafka",))
    env = {**os.environ, "METERING_KAFKA_BOOTSTRAP": ep.kafka_bootstrap, "METERING_REDIS_URL": cluster_url,
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"c{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"c{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
           "METERING_ACCOUNTS": str(ACCOUNTS), "METERING_METRICS_PORT": "0", "METERING_BATCH_SIZE": "2000"}
    for cmd in (["setup"], ["accounts", "import", str(ACCOUNTS)]):
        subprocess.run([sys.executable, "-m", "metering.cli", *cmd], env=env, check=True, cwd=ROOT)
    now = datetime.now(UTC).replace(microsecond=0)
    rater, rows = _offline(10_000, 5, 0.05, 0.01, now)
    produce_traffic(Settings.from_env(env), count=10_000, seed=5, duplicate_rate=0.05, malformed_rate=0.01,
                    start=now.replace(hour=0))
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "run", "--until-idle", "3"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_equal(env, rater, rows)
