"""Kafka positions in Redis, checked and written with the debits (real Redis, standalone and
Cluster): a Redis that went back in time (lost its AOF's last second, failed over to a lagging
replica) is noticed by the next batch's apply before anything is applied on top of it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from metering.local_services import ensure_started
from rating.accounts import load_accounts
from rating.catalog import load_catalog
from rating.engine import Rater
from wallet_debiter.redis_store import PositionsLost, RedisWalletStore, connect

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"
NOW = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
TOPIC = "t.usage.events"
pytestmark = pytest.mark.integration


@pytest.fixture()
def client() -> Iterator[redis.Redis]:
    url = ensure_started(("redis",)).redis_url
    c = connect(f"{url.rsplit('/', 1)[0]}/13")
    assert isinstance(c, redis.Redis)
    c.flushdb()
    yield c
    c.flushdb()
    c.close()


def _call(event_id: str, account: str = "acc-000001") -> bytes:
    return (b'{"kind":"call","event_id":"%s","account_id":"%s","direction":"outbound",'
            b'"from":"+15550001111","to":"+4915112345678","started_at":"2026-03-20T11:00:00Z",'
            b'"duration_s":125}' % (event_id.encode(), account.encode()))


def _rater(store: RedisWalletStore) -> Rater:
    cat = load_catalog(CATALOG)
    accs = load_accounts(ACCOUNTS, cat)
    store.import_accounts(accs.values())
    return Rater(cat, accs, store)


def test_apply_writes_positions_with_the_debits_and_refuses_a_store_that_went_back(client: redis.Redis) -> None:
    store = RedisWalletStore(client)
    rater = _rater(store)
    account = "acc-000001"
    opening = store.balances([account])[account]

    store.bind_positions(TOPIC, {}, {0: 1})  # first batch of this worker: nothing to compare
    first = rater.rate_batch([(_call("e1"), "0:0")], NOW)
    assert first.rows[0][2] == "rated" and first.rows[0][14] > 0
    assert store.positions_applied and store.positions(TOPIC) == {0: 1}
    charged = opening - store.balances([account])[account]
    assert charged == first.rows[0][14]

    store.bind_positions(TOPIC, {0: 1}, {0: 2})
    rater.rate_batch([(_call("e2"), "0:1")], NOW)
    assert store.positions(TOPIC) == {0: 2}
    after_two = store.balances([account])[account]

    # Redis loses the last batch's writes (simulated: its position and effects roll back)
    client.hset(f"pos:{{{TOPIC}}}", "0", 1)
    store.bind_positions(TOPIC, {0: 2}, {0: 3})
    with pytest.raises(PositionsLost) as lost:
        rater.rate_batch([(_call("e3"), "0:2")], NOW)
    assert lost.value.held == {0: 1}
    assert not store.positions_applied
    # nothing of the refused batch was applied: no charge, no dedupe entry, position unmoved
    assert store.balances([account])[account] == after_two
    assert client.hget(f"d:{{{account}}}", "e3") is None
    assert store.positions(TOPIC) == {0: 1}


def test_positions_cas_for_batches_without_debits(client: redis.Redis) -> None:
    store = RedisWalletStore(client)
    assert store.positions_cas(TOPIC, {}, {0: 5, 1: 7}) == {}
    assert store.positions(TOPIC) == {0: 5, 1: 7}
    assert store.positions_cas(TOPIC, {0: 5, 1: 7}, {0: 9, 1: 8}) == {}
    assert store.positions(TOPIC) == {0: 9, 1: 8}
    # partition 1 went back to 4: nothing is written, the held position is reported
    client.hset(f"pos:{{{TOPIC}}}", "1", 4)
    assert store.positions_cas(TOPIC, {0: 9, 1: 8}, {0: 10, 1: 9}) == {1: 4}
    assert store.positions(TOPIC) == {0: 9, 1: 4}
    # wiped: -1 for every partition it no longer holds
    client.delete(f"pos:{{{TOPIC}}}")
    assert store.positions_cas(TOPIC, {0: 9, 1: 4}, {0: 10, 1: 5}) == {0: -1, 1: -1}


def test_positions_cas_on_the_cluster_checks_every_master_copy() -> None:
    c = connect(ensure_started(("redis-cluster",)).redis_cluster_url)
    c.flushall()
    try:
        store = RedisWalletStore(c)
        store.bind_positions(TOPIC, {}, {0: 3})  # cluster: not bound to the apply
        assert store.positions_cas(TOPIC, {}, {0: 3}) == {}
        keys = store._position_keys(TOPIC)
        assert len(keys) == 3
        c.hset(keys[1], "0", 2)  # one master lost its last second
        assert store.positions_cas(TOPIC, {0: 3}, {0: 4}) == {0: 2}
        assert store.positions(TOPIC) == {0: 2}
    finally:
        c.flushall()
        c.close()


class _Msg:
    """The three fields PositionGuard reads of a confluent_kafka.Message."""

    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class _Seeks:
    def __init__(self) -> None:
        self.to: dict[int, int] = {}

    def seek(self, tp: object) -> None:
        self.to[tp.partition] = tp.offset  # type: ignore[attr-defined]


def test_guard_replays_a_partition_whose_position_redis_lost_and_then_moves_on(client: redis.Redis) -> None:
    """Redis kept partition 1's position but lost partition 0's field entirely: the guard seeks
    partition 0 back to offset 0 and then expects nothing there (not offset 0, which Redis
    would never hold: that looped forever), so the replay goes through."""
    from metering.workers.common import PositionGuard

    store = RedisWalletStore(client)
    guard = PositionGuard(store, TOPIC)
    batch = [_Msg(0, 10), _Msg(0, 11), _Msg(1, 20), _Msg(1, 21)]
    assert guard.settle(_Seeks(), batch, lambda: "settled", "debit") == "settled"  # first: no check
    assert guard.written == {0: 12, 1: 22} and store.positions(TOPIC) == {0: 12, 1: 22}

    client.hdel(f"pos:{{{TOPIC}}}", "0")  # Redis went back to before partition 0's first batch
    seeks, replays = _Seeks(), []
    nxt = [_Msg(0, 12), _Msg(1, 22)]
    assert guard.settle(seeks, nxt, lambda: replays.append(1), "debit", before_replay=lambda: replays.append(0)) is None
    # a batch without debits settles first (lookups only), then the compare-and-set notices the
    # loss: what was settled before is drained, and both partitions are sought back
    assert seeks.to == {0: 0, 1: 22} and replays == [1, 0]
    assert guard.written == {1: 22}
    again = [_Msg(0, 0), _Msg(0, 1), _Msg(1, 22)]
    assert guard.settle(_Seeks(), again, lambda: "replayed", "debit") == "replayed"
    assert store.positions(TOPIC) == {0: 2, 1: 23} and guard.written == {0: 2, 1: 23}


def test_guard_calls_a_wipe_a_wipe_when_the_batch_holds_only_partitions_it_has_not_written(
        client: redis.Redis) -> None:
    """Redis is wiped after this worker's first batch (partition 0 only). The next batch holds
    only partition 1, which it has not written: no position to compare, so the apply meets
    a missing wallet first. That is the wipe (exit 3, "restore it"), not a bare apply error;
    nothing is written on top of the empty store. (Seen in CI when a wipe fell between such
    batches: the worker exited 1 with "wallet apply failed: no wallet at w:{...}".)"""
    from metering.workers.common import PositionGuard, RedisLostWrites

    store = RedisWalletStore(client)
    rater = _rater(store)
    guard = PositionGuard(store, TOPIC)
    first = guard.settle(_Seeks(), [_Msg(0, 0)], lambda: rater.rate_batch([(_call("e1"), "0:0")], NOW), "debit")
    assert first is not None and first.rows[0][2] == "rated" and guard.written == {0: 1}

    client.flushdb()
    with pytest.raises(RedisLostWrites, match="it was wiped; restore it before restarting"):
        guard.settle(_Seeks(), [_Msg(1, 0)], lambda: rater.rate_batch([(_call("e2"), "1:0")], NOW), "debit")
    assert client.dbsize() == 0


def test_a_missing_wallet_on_a_store_that_kept_its_positions_is_not_called_a_wipe(client: redis.Redis) -> None:
    """The same missing wallet while Redis still holds this worker's positions (one wallet
    deleted by hand): the apply's own error, naming the wallet, not "wiped"."""
    from metering.workers.common import PositionGuard
    from wallet_debiter.redis_store import WalletApplyFailed, wallet_key

    store = RedisWalletStore(client)
    rater = _rater(store)
    guard = PositionGuard(store, TOPIC)
    assert guard.settle(_Seeks(), [_Msg(0, 0)], lambda: rater.rate_batch([(_call("e1"), "0:0")], NOW), "debit")
    client.delete(wallet_key("acc-000002"))
    with pytest.raises(WalletApplyFailed, match=r"no wallet at w:\{acc-000002\}"):
        guard.settle(_Seeks(), [_Msg(1, 0)],
                     lambda: rater.rate_batch([(_call("e2", "acc-000002"), "1:0")], NOW), "debit")
    assert store.positions(TOPIC) == {0: 1}


def test_guard_on_the_cluster_converges_after_one_master_lost_its_copy() -> None:
    """Cluster: each master holds its own copy of the positions. One master goes back (its
    copy reads 2 while the others read 4); the guard re-reads from there until every copy
    agrees again, in a bounded number of deduped re-reads, and then moves on."""
    from metering.workers.common import PositionGuard

    c = connect(ensure_started(("redis-cluster",)).redis_cluster_url)
    c.flushall()
    try:
        store = RedisWalletStore(c)
        guard = PositionGuard(store, TOPIC)
        assert guard.settle(_Seeks(), [_Msg(0, o) for o in range(4)], lambda: "ok", "debit") == "ok"
        keys = store._position_keys(TOPIC)
        assert len(keys) == 3 and all(c.hget(k, "0") == b"4" for k in keys)
        c.hset(keys[1], "0", 2)  # that master failed over to a replica a second behind

        # A consumer that re-reads from where the guard seeks it, up to offset 6.
        offset, rounds, settled = 4, 0, []
        while rounds < 10:
            rounds += 1
            seeks = _Seeks()
            msgs = [_Msg(0, o) for o in range(offset, 6)]
            if guard.settle(seeks, msgs, lambda m=msgs: settled.append(len(m)) or "ok", "debit") == "ok":
                break
            offset = seeks.to[0]
        # round 1 notices the lagging copy (back to 2); round 2 re-reads 2..5 and brings it to 6,
        # while the two others already at 6 make it read once more; round 3 agrees everywhere
        assert rounds == 3, rounds
        assert settled == [2, 4, 4]
        assert [c.hget(k, "0") for k in keys] == [b"6"] * 3
        assert store.positions(TOPIC) == {0: 6} and guard.written == {0: 6}
        # and the next batch goes straight through
        assert guard.settle(_Seeks(), [_Msg(0, 6)], lambda: "next", "debit") == "next"
        assert store.positions(TOPIC) == {0: 7}
    finally:
        c.flushall()
        c.close()
