"""`metering movements export`: one account's wallet movements over a time range as CSV, read
from a real chDB (`wallet_movements FINAL`); and `metering accounts credit` replayed re-sends
its movement and wallet event with the original `at`, so ClickHouse counts them once."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from click.testing import CliRunner, Result

from metering.cli import main
from metering.config import Settings
from metering.local_services import ensure_started
from metering.storage.clickhouse_sink import ClickHouseSink
from metering.storage.movements_csv import format_at, parse_bound, to_ms
from schemas.records import Movement
from tests.chdb_http import clickhouse_dsn
from tests.helpers import read_topic

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"
HEADER = ["seq", "movement_id", "account_id", "at", "type", "amount", "balance_after", "reference"]
HEADER_LINE = b"seq,movement_id,account_id,at,type,amount,balance_after,reference\r\n"

ODD = 'acc,"odd"\nline;é'  # comma, quotes, line break, non-ASCII
OTHER = "acc-other"


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _mv(seq: int, mid: str, at: str, kind: str, amount: int, balance: int, ref: str, account: str = ODD) -> Movement:
    return Movement(movement_id=mid, account_id=account, at=_t(at), type=kind, amount=amount,
                    balance_after=balance, reference=ref, seq=seq)


# Inserted in this order (not the export order); seq is the order Redis applied them in, and
# the balances chain along it. The late debit `d-late` was applied after the credit `c-mid`
# although its CDR's `at` is earlier: by seq its balance_after follows on. `x-legacy` was
# written before seq existed (0): it comes first.
MOVES = [
    _mv(1, "c-oct", "2026-10-31T23:59:59.999+00:00", "credit", 1_000_000, 1_000_000, "before the range"),
    _mv(2, "t-first", "2026-11-01T00:00:00.000+00:00", "topup", 25_000_000, 26_000_000, 'pay,"1"\r\nx'),
    _mv(4, "d-b", "2026-11-15T10:00:00.500+00:00", "debit", -1, 20_999_999, "ev-b"),
    _mv(3, "d-a", "2026-11-15T10:00:00.500+00:00", "debit", -5_000_000, 21_000_000, "ev-a"),
    _mv(5, "c-mid", "2026-11-20T08:00:00.000+00:00", "credit", 999_999_999_979_000_000, 999_999_999_999_999_999, "max"),
    _mv(6, "d-late", "2026-11-19T23:00:00.000+01:00", "debit", -10, 999_999_999_999_999_989, "late cdr"),
    _mv(7, "a-zero", "2026-11-30T23:59:59.999+00:00", "adjustment", 0, 999_999_999_999_999_989,
        "fee:2026-11-01:starter"),
    _mv(8, "c-dec", "2026-12-01T00:00:00.000+00:00", "credit", 1, 999_999_999_999_999_990, "after the range"),
    _mv(0, "x-legacy", "2026-11-25T00:00:00.000+00:00", "adjustment", -999_999_999_999_999_999,
        -999_999_999_999_999_999, "written before seq"),
    _mv(1, "c-other", "2026-11-10T00:00:00.000+00:00", "credit", 7, 7, "someone else", account=OTHER),
]
NOVEMBER = [  # --from 2026-11-01 --to 2026-12-01, exactly as the CSV holds it
    ["0", "x-legacy", ODD, "2026-11-25T00:00:00.000Z", "adjustment", "-999999999999.999999", "-999999999999.999999",
     "written before seq"],
    ["2", "t-first", ODD, "2026-11-01T00:00:00.000Z", "topup", "25.000000", "26.000000", 'pay,"1"\r\nx'],
    ["3", "d-a", ODD, "2026-11-15T10:00:00.500Z", "debit", "-5.000000", "21.000000", "ev-a"],
    ["4", "d-b", ODD, "2026-11-15T10:00:00.500Z", "debit", "-0.000001", "20.999999", "ev-b"],
    ["5", "c-mid", ODD, "2026-11-20T08:00:00.000Z", "credit", "999999999979.000000", "999999999999.999999", "max"],
    ["6", "d-late", ODD, "2026-11-19T22:00:00.000Z", "debit", "-0.000010", "999999999999.999989", "late cdr"],
    ["7", "a-zero", ODD, "2026-11-30T23:59:59.999Z", "adjustment", "0.000000", "999999999999.999989",
     "fee:2026-11-01:starter"],
]


@pytest.fixture(params=["chdb", "http"])
def chdb_env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ClickHouseSink, dict[str, str]]]:
    """A chDB folder with the schema and MOVES inserted twice (a replay), and the environment
    that points the CLI at it. The sink stays open: in-process CLI runs share its engine.
    "http": the same through a server's `http://` DSN (tests/chdb_http.py), so the export's
    query parameters and streamed blocks go through clickhouse-connect's HTTP client."""
    # closed at the end (chDB: one engine per process; free it for the next test's folder)
    with clickhouse_dsn(request.param, tmp_path) as dsn, ClickHouseSink(dsn) as sink:
        sink.ensure_schema()
        sink.insert_movements(MOVES)
        sink.insert_movements(MOVES)  # replayed: FINAL keeps one row per movement_id
        yield sink, {"METERING_CLICKHOUSE_DSN": dsn, "METERING_CLICKHOUSE_DATABASE": "metering"}


def _export(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, ["movements", "export", *args], env=env, catch_exceptions=False)


def _rows(result: Result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    text = result.stdout_bytes.decode("utf-8")
    return list(csv.reader(io.StringIO(text, newline="")))


# --------------------------------------------------------------------------- pure helpers


def test_bounds_dates_are_utc_midnight_and_timestamps_need_an_offset() -> None:
    assert parse_bound("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_bound("2026-11-01T13:00:00.250+01:00") == datetime(2026, 11, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert parse_bound("2026-11-01T12:00:00Z") == datetime(2026, 11, 1, 12, tzinfo=UTC)
    for bad in ("2026-13-01", "2026-11-31", "yesterday", "", "2026-11-01T12:00:00", "01/11/2026"):
        with pytest.raises(ValueError):
            parse_bound(bad)
    # `at` is whole milliseconds: a sub-millisecond bound rounds up (same rows for >= and <)
    assert to_ms(datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == 1
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone(timedelta(hours=1)))) == -3_599_000
    assert format_at(to_ms(parse_bound("2026-11-15T10:00:00.5Z"))) == "2026-11-15T10:00:00.500Z"
    assert format_at(0) == "1970-01-01T00:00:00.000Z"


# --------------------------------------------------------------------------- on chDB


def test_export_is_exact_ordered_deduplicated_and_bounded(chdb_env: tuple[ClickHouseSink, dict[str, str]]) -> None:
    sink, env = chdb_env
    stored = sink.client.query("SELECT count() FROM metering.wallet_movements").result_rows[0][0]
    assert stored in (len(MOVES), 2 * len(MOVES))  # both inserts landed (unless merged already)
    result = _export(env, ODD, "--from", "2026-11-01", "--to", "2026-12-01")
    raw = result.stdout_bytes
    assert raw.startswith(HEADER_LINE)
    assert '"acc,""odd""\nline;é"'.encode() in raw  # RFC 4180 quoting, UTF-8
    rows = _rows(result)
    assert rows[0] == HEADER
    assert rows[1:] == NOVEMBER  # once each, in seq order, money exact
    chained = [(int(r[0]), Decimal(r[5]), Decimal(r[6])) for r in rows[2:]]  # after x-legacy
    for (_, _, before), (_, amount, after) in zip(chained, chained[1:], strict=False):
        assert before + amount == after  # ordered by seq, every balance follows from the last
    assert f"{ODD}: 7 movements" in result.stderr


def test_range_boundaries_inclusive_from_exclusive_to(chdb_env: tuple[ClickHouseSink, dict[str, str]]) -> None:
    _, env = chdb_env

    def ids(start: str, end: str) -> list[str]:
        return [r[1] for r in _rows(_export(env, ODD, "--from", start, "--to", end))[1:]]

    assert ids("2026-10-31T23:59:59.999Z", "2026-11-01T00:00:00.000Z") == ["c-oct"]
    assert ids("2026-10-31T23:59:59.999Z", "2026-11-01T00:00:00.001Z") == ["c-oct", "t-first"]
    assert ids("2026-11-15T10:00:00.500Z", "2026-11-15T10:00:00.501Z") == ["d-a", "d-b"]
    assert ids("2026-11-15T11:00:00.500+01:00", "2026-11-15T11:00:00.500+01:00") == []  # empty range
    assert ids("2026-11-30T23:59:59.999Z", "2026-12-01") == ["a-zero"]
    assert ids("2026-12-01", "2026-12-02") == ["c-dec"]
    assert ids("2026-01-01", "2027-01-01") == ["x-legacy", "c-oct", *(r[1] for r in NOVEMBER[1:]), "c-dec"]


def test_unknown_account_or_empty_range_is_the_header_only(chdb_env: tuple[ClickHouseSink, dict[str, str]]) -> None:
    _, env = chdb_env
    for args in (["nobody", "--from", "2026-01-01", "--to", "2027-01-01"],
                 [ODD, "--from", "2025-01-01", "--to", "2025-02-01"],
                 ["acc", "--from", "2026-01-01", "--to", "2027-01-01"]):  # a prefix is not a match
        result = _export(env, *args)
        assert result.exit_code == 0
        assert result.stdout_bytes == HEADER_LINE
    other = _rows(_export(env, OTHER, "--from", "2026-11-01", "--to", "2026-12-01"))
    assert other == [HEADER, ["1", "c-other", OTHER, "2026-11-10T00:00:00.000Z", "credit", "0.000007", "0.000007",
                              "someone else"]]


def test_out_file_is_the_same_csv_written_whole(chdb_env: tuple[ClickHouseSink, dict[str, str]],
                                                tmp_path: Path) -> None:
    _, env = chdb_env
    target = tmp_path / "out" / "moves.csv"
    target.parent.mkdir()
    target.write_text("old content\n")
    to_stdout = _export(env, ODD, "--from", "2026-11-01", "--to", "2026-12-01").stdout_bytes
    result = _export(env, ODD, "--from", "2026-11-01", "--to", "2026-12-01", "--out", str(target))
    assert result.exit_code == 0 and result.stdout_bytes == b""
    assert target.read_bytes() == to_stdout
    assert os.listdir(target.parent) == ["moves.csv"]  # no temporary file left
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_options_name_the_field_and_exit_2(chdb_env: tuple[ClickHouseSink, dict[str, str]]) -> None:
    _, env = chdb_env
    cases = [
        (["--from", "2026-13-01", "--to", "2026-12-01"], "--from"),
        (["--from", "2026-11-01", "--to", "next week"], "--to"),
        (["--from", "2026-11-01T00:00:00", "--to", "2026-12-01"], "--from"),  # no offset
        (["--from", "2026-12-01", "--to", "2026-11-01"], "--to"),  # before --from
    ]
    for args, field in cases:
        result = CliRunner().invoke(main, ["movements", "export", ODD, *args], env=env)
        assert result.exit_code == 2, (args, result.output)
        assert field in result.stderr, (args, result.stderr)
        assert result.stdout_bytes == b""


def test_clickhouse_unreachable_exits_2_with_a_clear_message() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    env = {"METERING_CLICKHOUSE_DSN": f"http://127.0.0.1:{port}"}
    result = CliRunner().invoke(main, ["movements", "export", "a", "--from", "2026-11-01", "--to", "2026-12-01"],
                                env=env)
    assert result.exit_code == 2, result.output
    assert result.stdout_bytes == b""
    assert "METERING_CLICKHOUSE_DSN" in result.stderr and f"127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("chdb_env", ["chdb"], indirect=True)  # a folder held: embedded only
def test_as_a_process_chdb_held_elsewhere_missing_schema_then_success(
        chdb_env: tuple[ClickHouseSink, dict[str, str]], tmp_path: Path) -> None:
    """The real command in its own process: while this process holds the chDB folder it
    cannot open it (exit 2, says why); a folder without the schema is an error too; once the
    folder is free it writes the same bytes as the in-process run."""
    sink, env = chdb_env
    args = [sys.executable, "-m", "metering.cli", "movements", "export", ODD, "--from", "2026-11-01",
            "--to", "2026-12-01"]
    expected = _export(env, *args[5:]).stdout_bytes

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, env={**os.environ, **extra}, cwd=ROOT, capture_output=True, timeout=120)

    held = run(env)
    assert held.returncode == 2 and held.stdout == b""
    assert b"METERING_CLICKHOUSE_DSN" in held.stderr, held.stderr
    # who holds it (chDB's own reason went to its stderr line only; the error said "BAD_ARGUMENTS")
    assert f"is in use by another process (pid {os.getpid()})".encode() in held.stderr, held.stderr
    empty = run({"METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'empty'}"})
    assert empty.returncode == 2 and empty.stdout == b""
    assert b"export query failed" in empty.stderr, empty.stderr
    sink.close()  # free the folder for the other process
    done = run(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


# ------------------------------------------------------- accounts credit replayed: same `at`




@pytest.mark.integration
def test_replayed_credit_re_emits_with_the_original_at_and_clickhouse_counts_it_once(tmp_path: Path) -> None:
    ep = ensure_started(("kafka", "redis"))
    db = 1 + uuid.uuid4().int % 14  # no FLUSHDB: the account id is unique to this run
    account = f"acc-replay-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **ep.as_env(), "METERING_REDIS_URL": f"{ep.redis_url.rsplit('/', 1)[0]}/{db}",
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
           "METERING_GROUP_PREFIX": f"g{uuid.uuid4().hex[:8]}", "METERING_CATALOG": str(CATALOG),
           "METERING_METRICS_PORT": "0"}
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(  # imported at a balance <= 0: starts blocked, so the credit unblocks it
        f'accounts:\n  - {{id: "{account}", plan: "starter", home_country: "US", billing: "prepaid", '
        'balance: "-1.00", period_anchor_day: 1, auto_topup: null, low_balance_alert: null, credit_limit: null}\n')
    cli = [sys.executable, "-m", "metering.cli"]

    def metering(*args: str) -> str:
        out = subprocess.run([*cli, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    metering("setup")
    metering("accounts", "import", str(accounts))
    first = metering("accounts", "credit", account, "5.00", "--reference", "pay-1")
    assert "balance 4.000000" in first and "already applied" not in first
    time.sleep(0.05)  # the wall clock moves on: a replay must not take the new time
    # replayed with another amount by mistake: nothing applied, a warning, and the re-sent
    # movement is the one Redis recorded (5.00), not the mistaken 7.00
    replay = subprocess.run([*cli, "accounts", "credit", account, "7.00", "--reference", "pay-1"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 2, replay.stderr[-3000:]  # a payment script must not take it for success
    assert "reference 'pay-1' was already used for a credit of 5.000000: nothing changed" in replay.stderr

    settings = Settings.from_env(env)
    opening, *moves = [json.loads(m.value() or b"") for m in read_topic(
        ep.kafka_bootstrap, settings.topics.movements, lambda ms: len(ms) >= 3)]
    events = [json.loads(m.value() or b"") for m in read_topic(ep.kafka_bootstrap, settings.topics.wallet_events,
                                                          lambda ms: len(ms) >= 2)]
    assert len(moves) == 2 and len(events) == 2
    # the import's: the wallet's opening balance (below 0 here), before the credit
    assert {k: opening[k] for k in ("movement_id", "type", "amount", "balance_after", "reference", "seq")} == {
        "movement_id": f"opening:{account}", "type": "adjustment", "amount": "-1.000000",
        "balance_after": "-1.000000", "reference": "opening", "seq": 0}
    assert opening["at"] <= moves[0]["at"]
    assert moves[0] == moves[1]  # the replay re-sent the very same movement, `at` included
    assert events[0] == events[1] and events[0]["type"] == "unblocked"
    assert events[0]["at"] == moves[0]["at"]
    at = datetime.fromisoformat(moves[0]["at"])
    assert at.microsecond % 1000 == 0  # whole milliseconds, like ClickHouse's DateTime64(3)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 120

    # the sink worker writes both messages of each; FINAL counts one row
    proc = subprocess.run([*cli, "worker", "sink", "--until-idle", "3"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = clickhouse_connect.get_client(dsn=env["METERING_CLICKHOUSE_DSN"])
    try:
        ev = client.query("SELECT type, event_id, toUnixTimestamp64Milli(at) FROM metering.wallet_events FINAL "
                          "WHERE account_id = {a:String}", parameters={"a": account}).result_rows
        mv = client.query("SELECT movement_id, toUnixTimestamp64Milli(at), toInt64(amount * 1000000) "
                          "FROM metering.wallet_movements FINAL WHERE account_id = {a:String} ORDER BY seq",
                          parameters={"a": account}).result_rows
    finally:
        client.close()
    at_ms = to_ms(at)
    opened_ms = to_ms(datetime.fromisoformat(opening["at"]))
    assert ev == [("unblocked", f"credit:{account}:pay-1", at_ms)]
    assert mv == [(f"opening:{account}", opened_ms, -1_000_000), (f"credit:{account}:pay-1", at_ms, 5_000_000)]

    # and the export shows it once
    day = datetime.fromisoformat(opening["at"]).date().isoformat()  # (the import may be before midnight)
    csv_text = metering("movements", "export", account, "--from", day, "--to", (at.date() + timedelta(days=1)).isoformat())
    assert list(csv.reader(io.StringIO(csv_text, newline=""))) == [
        HEADER,
        ["0", f"opening:{account}", account, format_at(opened_ms), "adjustment", "-1.000000", "-1.000000", "opening"],
        ["1", f"credit:{account}:pay-1", account, format_at(at_ms), "credit", "5.000000", "4.000000", "pay-1"]]
    # a negative adjustment needs no `--` before its amount; one of 0 is refused
    assert "balance 3.500000" in metering("accounts", "credit", account, "-0.50", "--type", "adjustment",
                                          "--reference", "adj-1")
    zero = subprocess.run([*cli, "accounts", "credit", account, "0", "--type", "adjustment", "--reference", "adj-2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert zero.returncode == 2 and "an adjustment of 0 changes nothing" in zero.stderr
