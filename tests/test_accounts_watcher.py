"""Workers reload accounts from Redis only when an import bumped the version (real Redis)."""

from __future__ import annotations

import uuid

import pytest

from metering.local_services import ensure_started
from metering.workers.common import AccountsWatcher
from rating.accounts import parse_accounts
from rating.catalog import parse_catalog
from tests.helpers import account, catalog_dict
from wallet_debiter.redis_store import RedisWalletStore, connect

pytestmark = pytest.mark.integration


def test_accounts_reload_only_after_an_import() -> None:
    ep = ensure_started()
    db = 1 + uuid.uuid4().int % 14
    client = connect(f"{ep.redis_url.rsplit('/', 1)[0]}/{db}")
    store = RedisWalletStore(client)
    cat = parse_catalog(catalog_dict())
    first, second = f"w-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    store.import_accounts(parse_accounts({"accounts": [account(first)]}, cat).values())
    watcher = AccountsWatcher(store, every_s=0)
    assert first in watcher.accounts
    assert watcher.changed() is None  # nothing imported since: no reload
    store.import_accounts(parse_accounts({"accounts": [account(second, plan="payg")]}, cat).values())
    reloaded = watcher.changed()
    assert reloaded is not None and reloaded[second].plan_id == "payg" and first in reloaded
    assert watcher.changed() is None
