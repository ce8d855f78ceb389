"""Operator commands on the real Kafka, Redis and chDB (`accounts credit|show`, `run
--until-idle`): what an operator types by mistake is refused in one line with exit 2 and changes
nothing; what they ask for is what happens (found by an audit of these commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import clickhouse_connect
import pytest

from metering.local_services import ensure_started
from wallet_debiter.redis_store import RedisWalletStore, connect, wallet_key

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
pytestmark = pytest.mark.integration


@pytest.fixture()
def op(tmp_path: Path) -> dict[str, str]:
    ep = ensure_started(("kafka", "redis"))
    db = 1 + uuid.uuid4().int % 14  # no FLUSHDB: the account ids are unique to this run
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, **ep.as_env(), "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{db}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"t{tag}.",
           "METERING_GROUP_PREFIX": f"g{tag}", "METERING_CATALOG": str(CATALOG), "METERING_METRICS_PORT": "0",
           "ACCOUNT": f"op-{tag}"}
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(
        f'accounts:\n  - {{id: "op-{tag}", plan: "starter", home_country: "US", billing: "prepaid", '
        'balance: "10.00", period_anchor_day: 1, auto_topup: {threshold: "5.00", amount: "20.00"}, '
        'low_balance_alert: null, credit_limit: null}\n')
    _cli(env, "setup")
    _cli(env, "accounts", "import", str(accounts))
    return env


def _cli(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "metering.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc


def _refused(env: dict[str, str], *args: str, needle: str) -> None:
    last = _cli(env, *args, code=2).stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_credit_mistakes_are_refused_in_one_line_and_change_nothing(op: dict[str, str]) -> None:
    account = op["ACCOUNT"]
    store = RedisWalletStore(connect(op["METERING_REDIS_URL"]))
    before = store.balances([account])[account]
    _refused(op, "accounts", "credit", "nobody-" + account, "5", "--reference", "x", needle="not in Redis")
    _refused(op, "accounts", "show", "nobody-" + account, needle="not in Redis")
    # the reference is the idempotency key: an empty one would swallow every later credit
    _refused(op, "accounts", "credit", account, "5", "--reference", "", needle="--reference")
    _refused(op, "accounts", "credit", account, "5", "--reference", "   ", needle="--reference")
    # beyond what Redis (doubles) and ClickHouse (Decimal(18, 6)) hold exactly: rounded before
    _refused(op, "accounts", "credit", account, "99999999999.000001", "--reference", "big", needle="beyond")
    # over 4 300 digits: hiredis crashed the process (SIGSEGV, exit -11) packing the integer for Redis
    _refused(op, "accounts", "credit", account, "9" * 5000, "--type", "adjustment", "--reference", "huge",
             needle="beyond")
    _cli(op, "accounts", "credit", account, "600000000", "--reference", "big-1")
    _refused(op, "accounts", "credit", account, "600000000", "--reference", "big-2", needle="beyond")
    assert store.balances([account])[account] == before + 600_000_000_000_000
    assert store.credit_record(account, "big-2") is None  # not applied, not recorded
    # a reference reused for another amount: nothing applied, and not a success
    _refused(op, "accounts", "credit", account, "7", "--reference", "big-1", needle="already used")
    assert store.balances([account])[account] == before + 600_000_000_000_000
    _cli(op, "accounts", "credit", account, "-600000000", "--type", "adjustment", "--reference", "big-undo")
    assert store.balances([account])[account] == before


def test_topup_failed_says_whether_a_request_was_open(op: dict[str, str]) -> None:
    account = op["ACCOUNT"]
    client = connect(op["METERING_REDIS_URL"])
    out = _cli(op, "accounts", "credit", account, "--topup-failed").stdout
    assert "no open top-up request" in out
    client.hset(wallet_key(account), "topup_pending", "1")  # as a debit crossing the threshold leaves it
    out = _cli(op, "accounts", "credit", account, "--topup-failed").stdout
    assert "settled as failed" in out and client.hget(wallet_key(account), "topup_pending") == b"0"


def _movements(env: dict[str, str], account: str) -> list[tuple[str, str, str]]:
    """(type, amount, reference) of the account's movements in ClickHouse, in seq order."""
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        return client.query("SELECT type, toString(amount), reference FROM metering.wallet_movements FINAL "
                            "WHERE account_id = {a:String} ORDER BY seq", parameters={"a": account}).result_rows
    finally:
        client.close()


def test_run_until_idle_waits_for_operator_movements(op: dict[str, str], tmp_path: Path) -> None:
    """The idle exit looked at usage.events only: a credit made just before a short run was
    left on wallet.movements (its consumer not even assigned yet) and missed ClickHouse."""
    account = op["ACCOUNT"]
    _cli(op, "accounts", "credit", account, "3.00", "--reference", "pay-idle")
    _cli(op, "run", "--until-idle", "0.5")
    assert _movements(op, account) == [("adjustment", "10", "opening"), ("credit", "3", "pay-idle")]


def test_import_sends_each_opening_balance_once_as_a_movement_and_a_rerun_resends_it(op: dict[str, str],
                                                                                    tmp_path: Path) -> None:
    """A wallet's movements did not add up to its balance: the balance its first import gave it
    was in no movement. Now the import sends it as an `adjustment` (reference `opening`, seq 0,
    at the wallet's creation) from what Redis kept, so an import whose movements Kafka refused
    (topics of a prefix never set up: exit 1) sends them when run again, and a re-import of a
    wallet sends the same movement (one row). A wallet opened at 0 has none."""
    account = op["ACCOUNT"]
    zero = f"{account}-zero"
    path = tmp_path / "more.yaml"
    path.write_text(
        f'accounts:\n  - {{id: "{zero}", plan: "starter", home_country: "US", billing: "postpaid", '
        'balance: "0", period_anchor_day: 1, auto_topup: null, low_balance_alert: null, credit_limit: null}\n'
        f'  - {{id: "{account}-new", plan: "starter", home_country: "US", billing: "prepaid", '
        'balance: "7.25", period_anchor_day: 1, auto_topup: null, low_balance_alert: null, credit_limit: null}\n')
    bare = {**op, "METERING_TOPIC_PREFIX": f"bare{uuid.uuid4().hex[:8]}.", "METERING_CLICKHOUSE_DSN":
            op["METERING_CLICKHOUSE_DSN"] + "-bare"}
    last = _cli(bare, "accounts", "import", str(path), code=1).stderr.strip().splitlines()[-1]
    assert last.startswith("error: accounts: 2 created, 0 updated in Redis") and "re-sends the 1 opening" in last, last
    out = _cli(op, "accounts", "import", str(path)).stdout
    assert "0 created, 2 updated" in out and "1 opening balance movements sent" in out, out
    _cli(op, "accounts", "import", str(tmp_path / "accounts.yaml"))  # the fixture's account, again
    _cli(op, "accounts", "credit", account, "-1.50", "--type", "adjustment", "--reference", "adj-open")
    _cli(op, "run", "--until-idle", "0.5")
    assert _movements(op, f"{account}-new") == [("adjustment", "7.25", "opening")]
    assert _movements(op, zero) == []
    assert _movements(op, account) == [("adjustment", "10", "opening"), ("adjustment", "-1.5", "adj-open")]
    store = RedisWalletStore(connect(op["METERING_REDIS_URL"]))
    assert store.balances([account])[account] == 8_500_000  # = the sum of its movements


def test_run_warns_at_start_about_accounts_on_plans_the_catalog_lacks(op: dict[str, str], tmp_path: Path) -> None:
    """Their events are all rejected unknown_account: the operator hears it at start."""
    import yaml

    catalog = yaml.safe_load(CATALOG.read_text())
    del catalog["plans"]["starter"]
    path = tmp_path / "catalog-without-starter.yaml"
    path.write_text(yaml.safe_dump(catalog))
    err = _cli({**op, "METERING_CATALOG": str(path)}, "run", "--until-idle", "0.5").stderr
    [line] = [x for x in err.splitlines() if "plans missing from the catalog" in x]
    warning = json.loads(line)  # the database may hold other tests' accounts too
    assert warning["plans"]["starter"] >= 1 and warning["level"] == "warning", line


def test_accounts_show_lists_live_holds(op: dict[str, str]) -> None:
    """The dialer's live reservations: money and package seconds held (expired ones left out)."""
    import time

    import msgspec

    from wallet_debiter.reservations import Hold

    account = op["ACCOUNT"]
    now_ms = int(time.time() * 1000)
    live = Hold(to="+447700900123", amount=1_230_000, seconds=600, field="europe|2026-11-01", duration_s=900,
                created_at_ms=now_ms, expires_at_ms=now_ms + 3_600_000)
    expired = msgspec.structs.replace(live, amount=9_000_000, expires_at_ms=now_ms - 1)
    connect(op["METERING_REDIS_URL"]).hset(f"h:{{{account}}}", mapping={
        "r-live": msgspec.json.encode(live), "r-old": msgspec.json.encode(expired)})
    out = _cli(op, "accounts", "show", account).stdout
    assert "holds (dialer reservations live now): 1, money 1.230000" in out, out
    assert "package europe, period from 2026-11-01: 10 min 0 s held" in out, out


def test_fees_for_a_future_day_warn_that_they_charge_ahead(op: dict[str, str]) -> None:
    from datetime import UTC, datetime, timedelta

    ahead = (datetime.now(UTC) + timedelta(days=40)).date().isoformat()
    proc = _cli(op, "fees", "charge", "--on", ahead)
    assert f"warning: --on {ahead} is after today" in proc.stderr and "accounts charged" in proc.stdout
    today = datetime.now(UTC).date().isoformat()
    assert "is after today" not in _cli(op, "fees", "charge", "--on", today).stderr  # (other warnings: other tests' accounts)
    # a timestamp is charged by its UTC day, and the warning names that day (it named the local one)
    late = datetime.now(UTC).date() + timedelta(days=70)
    proc = _cli(op, "fees", "charge", "--on", f"{late.isoformat()}T23:30:00-05:00")
    assert f"warning: --on {(late + timedelta(days=1)).isoformat()} is after today" in proc.stderr, proc.stderr


def test_fees_for_a_period_before_1970_are_refused_and_charge_nothing(op: dict[str, str]) -> None:
    """`fees charge --on 1926-11-01` (a typo) charged every account a fee `fee:1926-11-01:...`;
    ClickHouse's Date clamps that period to 1970-01-01, so v_usage_by_category showed the fees
    under a period that is neither the reference's nor any account's. Refused now, in one line,
    before any wallet is touched; the first day whose every period is storable is charged."""
    account = op["ACCOUNT"]
    store = RedisWalletStore(connect(op["METERING_REDIS_URL"]))
    before = store.balances([account])[account]
    _refused(op, "fees", "charge", "--on", "1926-11-01", needle="--on 1926-11-01")
    _refused(op, "fees", "charge", "--on", "1970-01-27", needle="1969-12-28")  # anchor 28: 1969-12-28
    assert store.balances([account])[account] == before
    assert store.credit_record(account, "fee:1926-11-01:starter") is None
    _cli(op, "fees", "charge", "--on", "1970-01-28")  # every anchor's period starts in 1970
    assert store.balances([account])[account] == before - 19_000_000
    assert store.credit_record(account, "fee:1970-01-01:starter") is not None


def test_a_fee_beyond_what_a_wallet_holds_is_refused_for_that_account_and_named(op: dict[str, str],
                                                                               tmp_path: Path) -> None:
    """`fees charge` on a wallet already near -1 000 000 000 ended in a BalanceOutOfRange
    traceback (exit 1, no summary; the accounts after it in the run were not charged). Now that
    account's fee is refused in a line naming it, the others are charged, and the exit is 1."""
    account, other = op["ACCOUNT"], f"{op['ACCOUNT']}-b"  # the other sorts after it: charged after
    (tmp_path / "other.yaml").write_text(
        f'accounts:\n  - {{id: "{other}", plan: "starter", home_country: "US", billing: "prepaid", '
        'balance: "50.00", period_anchor_day: 1}\n')
    _cli(op, "accounts", "import", str(tmp_path / "other.yaml"))
    store = RedisWalletStore(connect(op["METERING_REDIS_URL"]))
    _cli(op, "accounts", "credit", account, "-999999999", "--type", "adjustment", "--reference", "near-floor")
    try:
        before = store.balances([account])[account]
        assert before == 10_000_000 - 999_999_999_000_000
        proc = _cli(op, "fees", "charge", "--on", "2026-11-02", code=1)
        assert f"error: fee 19.000000 of plan 'starter' not charged: {account}: a change of -19.000000 would " \
               "take the balance beyond +-1000000000.000000" in proc.stderr, proc.stderr
        assert "refused (see above)" in proc.stdout, proc.stdout
        assert store.balances([account])[account] == before
        assert store.credit_record(account, "fee:2026-11-01:starter") is None
        assert store.balances([other])[other] == 50_000_000 - 19_000_000
    finally:
        # `fees charge` charges every wallet of the Redis database, which other tests of this
        # file may share (one of 14, picked at random): a wallet left near the floor made
        # their runs exit 1 (seen in CI)
        _cli(op, "accounts", "credit", account, "999999999", "--type", "adjustment", "--reference",
             "near-floor-undo")


def test_setup_asked_for_another_partition_count_than_the_topics_have_is_refused(op: dict[str, str]) -> None:
    """`metering setup --partitions 8` (or METERING_PARTITIONS=8) on topics that exist with 4:
    before, it printed `topics created: none (all exist)` and exit 0 with the topics unchanged,
    so an operator scaling out believed 8 debit workers would now each own a partition. Now it
    is refused in one line naming each topic's count, and nothing changes; without a count
    asked for, a rerun (the setup Job after a catalog change) succeeds and lists the counts."""
    from confluent_kafka.admin import AdminClient

    prefix = op["METERING_TOPIC_PREFIX"]
    _refused(op, "setup", "--partitions", "8", needle=f"{prefix}usage.events has 4")
    _refused({**op, "METERING_PARTITIONS": "2"}, "setup", needle="2 partitions asked for")
    topics = AdminClient({"bootstrap.servers": op["METERING_KAFKA_BOOTSTRAP"]}).list_topics(timeout=10).topics
    ours = {name: len(t.partitions) for name, t in topics.items() if name.startswith(prefix)}
    assert len(ours) == 6 and set(ours.values()) == {4}, ours
    out = _cli(op, "setup").stdout
    assert f"{prefix}usage.events 4, " in out and f"{prefix}usage.priced 4" in out, out
    _cli({**op, "METERING_PARTITIONS": "4"}, "setup")  # the count they have: fine


def test_credit_and_fees_whose_movements_kafka_refuses_fail_and_a_rerun_sends_them(op: dict[str, str]) -> None:
    """A message the broker refuses (here: topics of a prefix `metering setup` never created)
    leaves the producer's queue like a delivered one, and only the queue was checked: `accounts
    credit` printed `credit 2.500000, balance ...` and `fees charge` `fees: N accounts charged`,
    exit 0, while neither movement reached wallet.movements (nor ClickHouse). Now both exit 1
    saying the money is applied in Redis and what to run; the same commands after `setup` send
    the movements and charge nothing again."""
    account = op["ACCOUNT"]
    bare = {**op, "METERING_TOPIC_PREFIX": f"bare{uuid.uuid4().hex[:8]}.", "METERING_CLICKHOUSE_DSN":
            op["METERING_CLICKHOUSE_DSN"] + "-bare"}
    store = RedisWalletStore(connect(op["METERING_REDIS_URL"]))
    before = store.balances([account])[account]
    last = _cli(bare, "accounts", "credit", account, "2.50", "--reference", "pay-refused",
                code=1).stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {account}: the credit is applied in Redis"), last
    assert "Unknown topic or partition" in last and "metering setup" in last, last
    last = _cli(bare, "fees", "charge", code=1).stderr.strip().splitlines()[-1]
    assert last.startswith("error: fees: ") and "not all published" in last and "same --on" in last, last
    assert store.balances([account])[account] == before + 2_500_000 - 19_000_000  # applied once each
    _cli(bare, "setup")
    assert "already applied" in _cli(bare, "accounts", "credit", account, "2.50", "--reference", "pay-refused").stdout
    _cli(bare, "fees", "charge")
    assert store.balances([account])[account] == before + 2_500_000 - 19_000_000  # nothing charged twice
    _cli(bare, "run", "--until-idle", "0.5")
    rows = _movements(bare, account)
    assert [r[:2] for r in rows] == [("credit", "2.5"), ("adjustment", "-19")], rows
    assert rows[0][2] == "pay-refused" and rows[1][2].startswith("fee:"), rows


def test_fees_charge_stopped_by_sigterm_sends_every_fee_it_charged_and_a_rerun_finishes(op: dict[str, str],
                                                                                       tmp_path: Path) -> None:
    """SIGTERM (a Kubernetes Job's pod deleted, a cron timeout) killed `fees charge` at once:
    the fees applied in Redis just before had their movements still in the producer's queue and
    they were lost (the audit's run: 9 321 fees in Redis, 9 311 movements on wallet.movements),
    exit 143 without a word. Now the run stops after the account in hand, sends the movement of
    every fee it charged, says so (exit 1), and the same command again charges the rest."""
    import signal
    import time
    from datetime import UTC, datetime

    from confluent_kafka import Consumer, TopicPartition

    from rating.periods import period_start

    tag, n = op["ACCOUNT"] + "-f", 12_000
    ids = [f"{tag}{i:05d}" for i in range(n)]
    path = tmp_path / "many.yaml"
    path.write_text("accounts:\n" + "".join(
        f'  - {{id: "{a}", plan: starter, home_country: US, billing: prepaid, balance: "100", '
        'period_anchor_day: 1}\n' for a in ids))
    client = connect(op["METERING_REDIS_URL"])
    reference = f"fee:{period_start(datetime.now(UTC), 1).isoformat()}:starter"
    try:
        _cli(op, "accounts", "import", str(path))
        proc = subprocess.Popen([sys.executable, "-m", "metering.cli", "fees", "charge"], env=op, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not client.hexists(f"c:{{{ids[0]}}}", reference) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (proc.returncode, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: fees: stopped by a signal after ") and "same command" in last, last
        charged = {a for a in ids if client.hexists(f"c:{{{a}}}", reference)}
        assert 0 < len(charged) < n, len(charged)

        consumer = Consumer({"bootstrap.servers": op["METERING_KAFKA_BOOTSTRAP"], "group.id": f"check-{tag}",
                             "enable.auto.commit": False})
        topic = op["METERING_TOPIC_PREFIX"] + "wallet.movements"
        sent: set[str] = set()
        try:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                consumer.assign([TopicPartition(topic, p, lo)])
                pos = lo
                while pos < hi:
                    for m in consumer.consume(10_000, timeout=5):
                        assert not m.error(), m.error()
                        pos = m.offset() + 1
                        movement = json.loads(m.value())
                        if movement["reference"] == reference and movement["account_id"].startswith(tag):
                            sent.add(movement["account_id"])
        finally:
            consumer.close()
        assert sent == charged, (len(sent), len(charged))  # every fee charged has its movement

        _cli(op, "fees", "charge")
        assert all(client.hexists(f"c:{{{a}}}", reference) for a in ids)
        assert RedisWalletStore(client).balances(ids) == dict.fromkeys(ids, 81_000_000)  # 100 - 19, once each
    finally:
        client.srem("accounts", *ids)
        client.delete(*(f"{k}:{{{a}}}" for a in ids for k in ("w", "c")))


def test_simulate_logs_progress_lines_when_stderr_is_not_a_terminal(op: dict[str, str]) -> None:
    """`simulate` showed progress only on a terminal: run from a script or a Kubernetes job, a
    long run printed nothing until its end. Now a line every METERING_PROGRESS_S there."""
    proc = _cli({**op, "METERING_PROGRESS_S": "0.4"}, "simulate", "--count", "3000", "--rate", "1500")
    lines = [x for x in proc.stderr.splitlines() if x.startswith("progress: produced ")]
    assert len(lines) >= 2 and lines[0].endswith("/s)") and " of 3000 events (" in lines[0], proc.stderr
    assert proc.stdout.strip().startswith("produced 3000 events to "), proc.stdout
