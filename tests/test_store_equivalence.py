"""The Redis store (Lua scripts) against the in-memory reference store, on the real local Redis:
for any interleaving of usage batches, redeliveries and operator credits, top-ups and fees, both
give the same rows, wallet events and movement numbers, the same credit outcomes, and end with
the same balances, block flags, top-up state and allowances.

The live tests compare the pipeline with `metering rate`, which has no credits; this is where
the wallet rules that only credits reach (unblock, a fee that blocks or crosses a threshold, a
top-up settling the outstanding request) are held to one definition. Uses Redis database 11 and
deletes only the keys of its own accounts.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from metering.local_services import ensure_started
from rating.accounts import parse_accounts
from rating.catalog import parse_catalog
from rating.engine import Rater
from rating.wallet import MemoryWalletStore
from tests.helpers import NOW, catalog_dict
from tests.test_properties import ACCOUNTS, IDS, event_st
from tests.test_wallet_rules import BOUNDARY_ACCOUNTS, BOUNDARY_STEPS, run_boundary_steps
from wallet_debiter.redis_store import RedisWalletStore, connect, wallet_key

pytestmark = pytest.mark.integration

DB = 11
CREDIT_KINDS = ("credit", "topup", "adjustment")

step_st = st.one_of(
    st.tuples(st.just("batch"), st.lists(event_st, min_size=1, max_size=25)),
    st.tuples(st.just("replay"), st.integers(0, 50)),  # an earlier batch again, same sources
    st.tuples(st.just("credit"), st.sampled_from(IDS), st.sampled_from(CREDIT_KINDS), st.integers(1, 2_000_000)),
    st.tuples(st.just("fee"), st.sampled_from(IDS), st.integers(1, 1_500_000)),  # negative adjustment
)


@pytest.fixture(scope="module")
def client() -> redis.Redis:
    url = os.environ.get("METERING_TEST_REDIS_URL") or ensure_started(("redis",)).redis_url
    c = connect(f"{url.rsplit('/', 1)[0]}/{DB}")
    c.ping()  # fail (not skip) when unreachable
    return c  # type: ignore[return-value]


def _fresh(client: redis.Redis) -> tuple[Rater, Rater, MemoryWalletStore, RedisWalletStore]:
    catalog = parse_catalog(catalog_dict())
    accounts = parse_accounts({"accounts": ACCOUNTS}, catalog)
    client.delete(*[f"{k}:{{{a}}}" for a in IDS for k in ("w", "u", "d", "h", "c")])
    mem = MemoryWalletStore(accounts)
    red = RedisWalletStore(client)
    red.import_accounts(accounts.values())
    return Rater(catalog, accounts, mem), Rater(catalog, accounts, red), mem, red


def _wallet_state(client: redis.Redis, red: RedisWalletStore, account_id: str) -> tuple[Any, ...]:
    w = red.wallet(account_id)
    assert w is not None
    used = {k: v for k, v in red.allowance_used(account_id).items() if v}
    seq = int(client.hget(wallet_key(account_id), "seq") or 0)
    return int(w["balance"]), w["blocked"] == "1", w["topup_pending"] == "1", used, seq


def _memory_state(mem: MemoryWalletStore, account_id: str) -> tuple[Any, ...]:
    w = mem.wallet(account_id)
    used = {f"{pkg}|{period}": s for (acc, pkg, period), s in mem.allowance_used.items() if acc == account_id and s}
    return w.balance, w.blocked, w.topup_pending, used, w.seq


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(step_st, min_size=1, max_size=12))
def test_redis_store_equals_the_memory_store_with_credits_fees_and_replays(
        client: redis.Redis, steps: list[tuple[Any, ...]]) -> None:
    by_mem, by_redis, mem, red = _fresh(client)
    sent: list[list[tuple[bytes, str]]] = []
    offsets = itertools.count()
    for step in steps:
        if step[0] in ("batch", "replay"):
            if step[0] == "batch":
                items = [(raw, f"0:{next(offsets)}") for raw in step[1]]
                sent.append(items)
            elif sent:
                items = sent[step[1] % len(sent)]
            else:
                continue
            want = by_mem.rate_batch(items, NOW)
            got = by_redis.rate_batch(items, NOW)
            assert got.rows == want.rows
            assert got.wallet_events == want.wallet_events
            assert dict(got.seqs) == dict(want.seqs)
            for e in want.wallet_events:
                event(f"wallet event {e.type}")  # shown by --hypothesis-show-statistics
            continue
        account_id = step[1]
        if step[0] == "credit":
            kind, amount = step[2], step[3]
        else:
            kind, amount = "adjustment", -step[2]
        topup = kind == "topup"  # as `metering accounts credit` does
        want_balance, want_bits = mem.credit(account_id, amount, settles_topup=topup)
        balance, bits, replayed = red.credit(account_id, amount, kind=kind, reference=str(uuid.uuid4()),
                                             settles_topup=topup)
        assert (balance, bits, replayed) == (want_balance, want_bits, False), step
        if bits:
            event(f"credit bits {bits}")
    for account_id in IDS:
        assert _wallet_state(client, red, account_id) == _memory_state(mem, account_id), account_id


def test_wallet_rule_boundaries_in_lua(client: redis.Redis) -> None:
    """The worked boundaries of test_wallet_rules (BOUNDARY_STEPS: block at exactly 0, a
    postpaid balance at exactly its credit limit, top-up and alert thresholds landed on and
    left from exactly, one open top-up request, prepaid-only alerts) on the Redis store: calls
    through apply.lua, credits and fees through credit.lua, same balances and events."""
    catalog = parse_catalog(catalog_dict())
    accounts = parse_accounts({"accounts": BOUNDARY_ACCOUNTS}, catalog)
    client.delete(*[f"{k}:{{{a}}}" for a in accounts for k in ("w", "u", "d", "h", "c")])
    red = RedisWalletStore(client)
    red.import_accounts(accounts.values())

    def credit(acc: str, kind: str, micros: int) -> tuple[int, int]:
        balance, bits, replayed = red.credit(acc, micros, kind=kind, reference=str(uuid.uuid4()),
                                             settles_topup=kind == "topup")
        assert not replayed
        return balance, bits

    got = run_boundary_steps(Rater(catalog, accounts, red), credit)
    assert got == [(acc, bal, ev) for acc, _, bal, ev in BOUNDARY_STEPS]
