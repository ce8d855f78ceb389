"""Catalog validation: every problem listed with its path and a hint; good catalogs compile."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating.accounts import AccountsError, load_accounts, parse_accounts
from rating.catalog import CatalogError, PrefixTable, load_catalog, parse_catalog
from tests.helpers import account, catalog_dict

ROOT = Path(__file__).resolve().parents[1]


def _errors(data: object) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, "test.yaml")
    return info.value.errors


def test_spec_example_catalog_is_accepted() -> None:
    cat = load_catalog(ROOT / "tests/data/spec_catalog.yaml")
    assert cat.version == "2026-11-01"
    assert cat.destinations.lookup("4490123") .dest_class == "premium"  # type: ignore[union-attr]
    assert cat.rate_tables["standard"].lookup("3519123").connect_fee_pico == 400_000_000_000  # type: ignore[union-attr]


def test_every_error_is_listed_with_path_and_hint() -> None:
    data = catalog_dict()
    data["rate_tables"]["standard"][3]["increments"] = [0, 60]
    data["rate_tables"]["standard"].append({"prefix": "44", "per_minute": "0.5", "increments": [60, 60]})
    data["rate_tables"]["standard"][0]["per_minute"] = "abc"
    data["packages"]["europe"]["countries"] = "zone:europa"
    data["packages"]["europe"]["classes"] = ["fixed", "premium"]
    data["plans"]["payg"]["rate_table"] = "retail"
    data["plans"]["starter"]["colour"] = "blue"
    errors = _errors(data)
    expected = [
        "rate_tables.standard[3].increments: expected [first, next] positive integers, got [0, 60]",
        "rate_tables.standard[9].prefix: duplicate prefix '44' in rate table 'standard'",
        'rate_tables.standard[0].per_minute: expected a decimal string like "0.0125", got \'abc\'',
        "packages.europe.countries: unknown zone 'europa'",
        "packages.europe.classes[1]: class 'premium' is never covered by a package",
        "plans.payg.rate_table: names a missing rate table 'retail'",
        "plans.starter.colour: unknown key",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errors), (want, errors)
    assert len(errors) == len(expected)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda d: d["rate_tables"]["standard"].__setitem__(0, {"prefix": "1", "per_minute": 0.01, "increments": [60, 60]}), "rate_tables.standard[0].per_minute"),
        (lambda d: d["destinations"].append({"prefix": 44, "country": "GB", "class": "fixed"}), "destinations[10].prefix"),
        (lambda d: d["destinations"].append({"prefix": "33", "country": "France", "class": "fixed"}), "destinations[10].country"),
        (lambda d: d["destinations"].append({"prefix": "33\n", "country": "FR", "class": "fixed"}), "destinations[10].prefix"),
        (lambda d: d["destinations"].append({"prefix": "33", "country": "FR\n", "class": "fixed"}), "destinations[10].country"),
        (lambda d: d["destinations"].append({"prefix": "33", "country": "FR", "class": "satellite"}), "destinations[10].class"),
        (lambda d: d["destinations"].append({"prefix": "44", "country": "GB", "class": "fixed"}), "destinations[10].prefix"),
        (lambda d: d["rate_tables"]["standard"][7]["intervals"][1].__setitem__("from_s", 90), "rate_tables.standard[7].intervals[0]"),
        (lambda d: d["rate_tables"]["standard"][7]["intervals"][0].__setitem__("from_s", 5), "rate_tables.standard[7].intervals[0].from_s"),
        (lambda d: d["packages"]["europe"].__setitem__("minutes", -5), "packages.europe.minutes"),
        (lambda d: d["plans"]["starter"].__setitem__("packages", ["asia"]), "plans.starter.packages[0]"),
        (lambda d: d["plans"]["starter"].__setitem__("billing", "credit"), "plans.starter.billing"),
        (lambda d: d["plans"]["starter"]["meters"].__setitem__("llm_tokens", "1e-3x"), "plans.starter.meters.llm_tokens"),
        (lambda d: d.__setitem__("currency", "dollars"), "currency"),
        (lambda d: d.__setitem__("extra", 1), "extra"),
    ],
)
def test_single_errors_name_their_path(change, path: str) -> None:  # noqa: ANN001
    data = catalog_dict()
    change(data)
    errors = _errors(data)
    assert any(e.startswith(path + ":") for e in errors), errors


def test_optional_keys_take_their_defaults() -> None:
    """Exactly SPEC's optional keys: a catalog with only the required ones loads."""
    data = catalog_dict()
    del data["zones"]
    data["packages"]["europe"]["countries"] = ["GB", "DE"]
    del data["rate_tables"]["standard"][0]["connect_fee"]
    cat = parse_catalog(data)
    payg = cat.plans["payg"]
    assert set(data["plans"]["payg"]) == {"rate_table", "sms"}
    assert payg.billing == "prepaid" and payg.allow_premium and payg.packages == ()
    assert payg.inbound_rate_table is None and payg.monthly_fee_pico == 0 and dict(payg.meters_pico) == {}
    assert cat.rate_tables["standard"].lookup("1").connect_fee_pico == 0  # type: ignore[union-attr]
    del data["packages"]
    data["plans"] = {"payg": data["plans"]["payg"]}
    assert parse_catalog(data).packages == {}


def test_longest_prefix_wins_and_lookup_ignores_table_size() -> None:
    table = PrefixTable({"4": "a", "44": "b", "447": "c", **{f"9{n:05d}": "x" for n in range(50_000)}})
    assert table.lookup("4471234") == "c"
    assert table.lookup("4412") == "b"
    assert table.lookup("4912") == "a"
    assert table.lookup("512") is None
    assert table.lookup("900042123") == "x"


def test_accounts_file_errors_name_account_and_field() -> None:
    cat = parse_catalog(catalog_dict())
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [
            account(plan="gold"), account("acc-2", balance=1.5), account("acc-3", period_anchor_day=31),
            account("acc-4", balance="0.0000001"), account("acc-5", home_country="GB\n"),
        ]}, cat)
    text = "\n".join(info.value.errors)
    assert "accounts[0] (acc-1).plan: unknown plan 'gold'" in text
    assert "accounts[1] (acc-2).balance: money must be a quoted decimal string" in text
    assert "accounts[2] (acc-3).period_anchor_day: expected an integer 1..28, got 31" in text
    assert "accounts[3] (acc-4).balance: at most 6 decimal places" in text
    assert "accounts[4] (acc-5).home_country: expected an ISO alpha-2 code, got 'GB\\n'" in text


def test_cli_refuses_a_bad_catalog_with_exit_2(tmp_path: Path) -> None:
    data = catalog_dict()
    data["rate_tables"]["standard"][3]["increments"] = [0, 60]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "rate_tables.standard[3].increments: expected [first, next] positive integers, got [0, 60]" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(ROOT / "tests/data/spec_catalog.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "package europe: 1000 min, international" in ok.stdout


def test_prices_that_could_charge_one_event_beyond_the_maximum_are_refused() -> None:
    """A 24 h call or a 255-segment SMS must fit the per-event maximum (1e9 units), or the
    Redis scripts (doubles) and ClickHouse (Decimal(18, 6)) could not hold the charge exactly."""
    data = catalog_dict()
    data["rate_tables"]["standard"][0]["per_minute"] = "694444"  # 1441 min * 694444 > 1e9
    data["plans"]["payg"]["sms"]["outbound"] = "4000000"  # 255 * 4e6 > 1e9
    errors = _errors(data)
    assert any(e.startswith("rate_tables.standard[0]: a 86400 s call would cost more than the per-event "
                            "maximum 1000000000.000000") for e in errors), errors
    assert any(e.startswith("plans.payg.sms.outbound: 255 segments would cost more than") for e in errors), errors
    data = catalog_dict()
    data["rate_tables"]["standard"][0]["per_minute"] = "693000"  # 1441 min * 693000 < 1e9: fine
    parse_catalog(data, "test.yaml")


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys; a doubled per_minute or balance is a typo."""
    text = (ROOT / "tests/data/spec_catalog.yaml").read_text(encoding="utf-8")
    doubled = text.replace('per_minute: "0.0100",', 'per_minute: "0.0100", per_minute: "5.00",', 1)
    assert doubled != text
    path = tmp_path / "doubled.yaml"
    path.write_text(doubled, encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert "found the key 'per_minute' twice" in str(info.value)
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text('accounts:\n  - {id: a1, plan: starter, home_country: US, balance: "100", balance: "-5"}\n',
                        encoding="utf-8")
    with pytest.raises(AccountsError) as acc_info:
        load_accounts(accounts, load_catalog(ROOT / "tests/data/spec_catalog.yaml"))
    assert "found the key 'balance' twice" in str(acc_info.value)


def test_files_that_are_not_utf8_are_refused_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b'version: "v1"\ncurrency: "\xff\xfe"\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert info.value.errors == ["(file): not UTF-8 text (byte 25)"]
    with pytest.raises(AccountsError) as acc_info:
        load_accounts(path, load_catalog(ROOT / "tests/data/spec_catalog.yaml"))
    assert acc_info.value.errors == ["(file): not UTF-8 text (byte 25)"]


@pytest.mark.parametrize("price", ["1_0", "\u0661.\u0665", " 1e-2 ", "1e2", "+1", ".5", "0x10", "Infinity", "NaN"])
def test_prices_are_plain_decimal_text(price: str) -> None:
    """Decimal() reads "1_0" as 10 and Arabic-Indic digits as digits: a typo or a look-alike
    must not become a price."""
    data = catalog_dict()
    data["rate_tables"]["standard"][0]["per_minute"] = price
    assert any(e.startswith("rate_tables.standard[0].per_minute: expected a decimal string") for e in _errors(data))


def test_every_accounts_error_is_listed_and_auto_topup_needs_both_values() -> None:
    cat = parse_catalog(catalog_dict())
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [
            account("a0", plan="gold"), account("a1"), account("a1"), account("a0"),
            account("a2", auto_topup={"threshold": None, "amount": "10.00"}),
            account("a3", auto_topup={"threshold": "5.00", "amount": None}),
        ]}, cat)
    errors = info.value.errors
    assert "accounts[2] (a1).id: duplicate account id" in errors
    assert "accounts[3] (a0).id: duplicate account id" in errors  # a0 had an error already
    assert any(e.startswith("accounts[4] (a2).auto_topup.threshold: missing") for e in errors), errors
    assert any(e.startswith("accounts[5] (a3).auto_topup.amount: missing") for e in errors), errors


def test_rate_cli_output_problems_are_messages_not_tracebacks(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"kind":"sms"}\n', encoding="utf-8")
    rate = [sys.executable, "-m", "metering.cli", "rate", "--catalog", str(ROOT / "deploy/examples/catalog.yaml"),
            "--accounts", str(ROOT / "deploy/examples/accounts.yaml"), "--events", str(events)]

    def run(*extra: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*rate, *extra], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    same = run("--wallet-events", str(events))
    assert same.returncode == 2 and "is the events file" in same.stderr
    assert events.read_text(encoding="utf-8") == '{"kind":"sms"}\n'  # not emptied
    nowhere = run("--wallet-events", str(tmp_path / "missing-dir" / "w.jsonl"))
    assert nowhere.returncode == 2 and "cannot write: No such file or directory" in nowhere.stderr
    with open("/dev/full", "w") as full:
        out = run(stdout=full)
    assert out.returncode == 1 and out.stderr.strip() == "error: writing the output: No space left on device"


def test_more_mistakes_are_each_listed() -> None:
    """Every bad interval (not only the first), an empty zone, a package listed twice, an
    empty meter name, a bad name with its section, and stray top-level keys in accounts."""
    data = catalog_dict()
    data["rate_tables"]["standard"].append({"prefix": "99", "connect_fee": "0", "intervals": [
        {"from_s": 0, "per_minute": "0.1", "increment_s": 0},
        {"from_s": 60, "per_minute": 0.2, "increment_s": 1, "typo": 1}]})
    data["zones"]["empty"] = []
    data["plans"]["starter"]["packages"] = ["europe", "europe"]
    data["plans"]["starter"]["meters"] = {"": "0.1"}
    data["plans"]["bad name!"] = {"rate_table": "standard", "sms": {"outbound": "0", "inbound": "0"}}
    errors = _errors(data)
    n = len(data["rate_tables"]["standard"]) - 1
    for want in (f"rate_tables.standard[{n}].intervals[0].increment_s: expected a positive integer",
                 f"rate_tables.standard[{n}].intervals[1].typo: unknown key",
                 f"rate_tables.standard[{n}].intervals[1].per_minute: prices must be quoted decimal strings",
                 "zones.empty: expected a non-empty list", "plans.starter.packages[1]: lists package 'europe' twice",
                 "plans.starter.meters.: meter names may use", "plans.bad name!: names may use"):
        assert any(e.startswith(want) for e in errors), (want, errors)
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [account()], "acounts_extra": 1}, parse_catalog(catalog_dict()))
    assert info.value.errors == ["acounts_extra: unknown key (the file holds `accounts:` only)"]


def test_yaml_merge_keys_work_and_complex_keys_are_refused(tmp_path: Path) -> None:
    """`<<: *base` merges as YAML defines it (written keys win); a key written twice is still
    refused; a list or mapping as a key is a YAML error naming the file, not a TypeError."""
    text = (ROOT / "tests/data/spec_catalog.yaml").read_text(encoding="utf-8")
    merged = text.replace("  europe:      {", "  europe: &eu {", 1).replace(
        "plans:\n", "  eu-fixed: {<<: *eu, classes: [fixed], minutes: 200}\nplans:\n", 1)
    path = tmp_path / "merged.yaml"
    path.write_text(merged, encoding="utf-8")
    cat = load_catalog(path)
    eu, eu_fixed = cat.packages["europe"], cat.packages["eu-fixed"]
    assert (eu_fixed.countries, eu_fixed.scope) == (eu.countries, "international")
    assert (sorted(eu_fixed.classes), eu_fixed.allowance_s, eu.allowance_s) == (["fixed"], 200 * 60, 1000 * 60)
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text("base: &b {a: 1}\nm: {<<: *b, a: 2, a: 3}\n", encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(doubled)
    assert "found the key 'a' twice" in str(info.value)
    for body in ("? [x]\n: 1\n", "version: v1\n? {a: 1}\n: 2\n"):
        complex_key = tmp_path / "complex.yaml"
        complex_key.write_text(body, encoding="utf-8")
        with pytest.raises(CatalogError) as info:
            load_catalog(complex_key)
        assert "found a complex key (a list or mapping); keys must be plain text" in str(info.value)
        assert f'in "{complex_key}", line' in str(info.value) and "<unicode string>" not in str(info.value)
        with pytest.raises(AccountsError) as acc_info:
            load_accounts(complex_key, cat)
        assert "keys must be plain text" in str(acc_info.value)


def test_yaml_values_python_cannot_hold_are_yaml_errors(tmp_path: Path) -> None:
    """`2026-13-01` is read as a date and an integer of 5 000 digits as an int: both raised a
    ValueError out of the loader (a traceback, exit 1)."""
    for body in ("version: 2026-13-01\n", "version: 1" + "0" * 5000 + "\n"):
        path = tmp_path / "bad.yaml"
        path.write_text(body, encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(path)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert "(yaml): cannot read this value:" in proc.stderr and f'in "{path}", line 1, column 10' in proc.stderr
        assert "Traceback" not in proc.stderr


def _alias_bomb(anchor: str = "l", levels: int = 9) -> str:
    """A YAML flow list of a few hundred bytes whose repr() is hundreds of megabytes."""
    items = [f"&{anchor}0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&{anchor}{n} [" + ", ".join([f"*{anchor}{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_error_messages_show_values_shortened(tmp_path: Path) -> None:
    """A value 1 000 lists deep made repr() raise RecursionError (a traceback); an alias bomb
    under currency made a 522 MB message. Every message shows a shortened value."""
    data = catalog_dict()
    deep: list[Any] = []
    for _ in range(1000):
        deep = [deep]
    data["version"] = deep
    data["rate_tables"]["standard"][0]["per_minute"] = "9" * 1000
    errors = _errors(data)
    assert "version: expected a non-empty string like \"2026-11-01\", got [[[...]]]" in errors, errors
    assert any(e.startswith("rate_tables.standard[0].per_minute: expected a decimal string")
               or e.startswith("rate_tables.standard[0]: a 86400 s call") for e in errors), errors
    assert max(len(e) for e in errors) < 300, errors
    text = (ROOT / "tests/data/spec_catalog.yaml").read_text(encoding="utf-8")
    bombed = tmp_path / "bomb.yaml"
    bombed.write_text(text.replace("currency: USD", "currency: " + _alias_bomb())
                      .replace('per_minute: "0.0100"', "per_minute: " + _alias_bomb("p")),
                      encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(bombed)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr) < 1000, proc.stderr[:2000]
    assert "currency: expected an ISO 4217 code like USD, got [['lol', 'lol', 'lol', 'lol', ...], [[...], [...]" in proc.stderr
    assert "rate_tables.standard[0].per_minute: expected a decimal string" in proc.stderr
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(f"accounts:\n  - {{id: a1, plan: starter, home_country: {_alias_bomb()}, balance: {_alias_bomb('b')}}}\n",
                        encoding="utf-8")
    with pytest.raises(AccountsError) as info:
        load_accounts(accounts, load_catalog(ROOT / "tests/data/spec_catalog.yaml"))
    assert [e.split(":")[0] for e in info.value.errors] == ["accounts[0] (a1).home_country", "accounts[0] (a1).balance"]
    assert max(len(e) for e in info.value.errors) < 300, info.value.errors


def test_a_name_that_is_a_list_or_mapping_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A list or mapping where a name belongs raised TypeError (unhashable) from a set or
    dict lookup: a traceback and exit 1 from `metering catalog check`."""
    data = catalog_dict()
    data["plans"]["starter"]["rate_table"] = ["standard"]
    data["plans"]["starter"]["inbound_rate_table"] = {"a": 1}
    data["plans"]["starter"]["packages"] = [["us-domestic"], "europe"]
    data["packages"]["europe"]["classes"] = [["fixed"], "mobile"]
    data["plans"]["payg"]["rate_table"] = True
    data["plans"]["business"]["billing"] = [[["x"] * 9] * 9] * 9
    del data["plans"]["business"]["rate_table"]
    errors = _errors(data)
    assert errors == [
        "packages.europe.classes[0]: expected fixed or mobile, got ['fixed']",
        "plans.starter.rate_table: expected a rate table name, got ['standard']",
        "plans.starter.inbound_rate_table: expected a rate table name, got {'a': 1}",
        "plans.starter.packages[0]: expected a package name, got ['us-domestic']",
        "plans.payg.rate_table: expected a rate table name, got True",
        "plans.business.billing: expected prepaid or postpaid, got [[[...], [...], [...], [...], ...], [[...], [...], "
        "[...], [...], ...], [[...], [...], [...], [...], ...], [[...], [.....",
        "plans.business.rate_table: missing: the name of a rate table (rate tables: inbound, standard)",
    ], errors
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [account(plan=["starter"]), account("a2", plan=None)]}, parse_catalog(catalog_dict()))
    assert info.value.errors == [
        "accounts[0] (acc-1).plan: expected a plan name, got ['starter'] (plans: business, payg, starter)",
        "accounts[1] (a2).plan: missing (plans: business, payg, starter)",
    ]
    path = tmp_path / "listed.yaml"
    path.write_text((ROOT / "tests/data/spec_catalog.yaml").read_text(encoding="utf-8")
                    .replace("rate_table: standard", "rate_table: [standard]"), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "  - plans.starter.rate_table: expected a rate table name, got ['standard']\n" in proc.stderr


def test_numeric_names_are_found_by_numeric_references(tmp_path: Path) -> None:
    """`rate_tables: {2026: ...}` and `rate_table: 2026` are both the integer 2026 in YAML: the
    table was stored as "2026" but looked up as 2026 ("names a missing rate table 2026 (tables:
    2026)"). An integer reference is its text; other non-text names and references are errors."""
    data = catalog_dict()
    data["rate_tables"][2026] = data["rate_tables"].pop("standard")
    data["packages"][7] = data["packages"].pop("europe")
    data["plans"][100] = data["plans"].pop("starter")
    for plan in data["plans"].values():
        plan["rate_table"] = 2026
        plan["packages"] = [7 if p == "europe" else p for p in plan.get("packages", [])]
    cat = parse_catalog(data)
    assert (cat.plans["100"].rate_table, cat.plans["100"].packages) == ("2026", ("us-domestic", "7"))
    accounts = parse_accounts({"accounts": [account(plan=100), account("a2", plan="100")]}, cat)
    assert accounts["acc-1"].plan_id == accounts["a2"].plan_id == "100"
    data["rate_tables"]["2026"] = data["rate_tables"][2026]
    data["zones"][True] = ["GB"]
    data["plans"][1.5] = {"rate_table": "2026", "sms": {"outbound": "0", "inbound": "0"}}
    data["plans"]["payg"]["rate_table"] = 2026.0
    assert _errors(data) == [
        "zones.True: a name must be text, got the bool True (quote it)",
        "rate_tables.2026: given twice (once as a number, once as text)",
        "plans.payg.rate_table: expected a rate table name, got 2026.0",
        "plans.1.5: a name must be text, got the float 1.5 (quote it)",
    ]
    path = tmp_path / "numeric.yaml"
    path.write_text((ROOT / "tests/data/spec_catalog.yaml").read_text(encoding="utf-8")
                    .replace("  standard:", "  2026:").replace("rate_table: standard", "rate_table: 2026"), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "plan starter: prepaid, rates 2026," in proc.stdout, proc.stderr


def test_keys_spec_does_not_list_as_optional_are_required() -> None:
    """SPEC lists the optional keys; sms, scope and an unlimited package's fair_use_minutes are
    not among them. Defaulting them rated SMS free, made a package international and an
    unlimited package limitless."""
    data = catalog_dict()
    del data["plans"]["payg"]["sms"]
    del data["plans"]["starter"]["sms"]["inbound"]
    data["plans"]["business"]["sms"] = None
    del data["packages"]["europe"]["scope"]
    del data["packages"]["us-domestic"]["fair_use_minutes"]
    assert _errors(data) == [
        "packages.us-domestic.fair_use_minutes: missing: an unlimited package needs its fair-use limit "
        "(minutes per period covered before calls are charged)",
        "packages.europe.scope: missing: domestic (calls to the account's home country only) or international",
        "plans.starter.sms.inbound: missing: a price per segment like \"0.0075\" (\"0\": free)",
        "plans.payg.sms: missing: SMS prices per segment, e.g. {outbound: \"0.0075\", inbound: \"0\"} (\"0\": free)",
        "plans.business.sms: expected a mapping, got NoneType",
    ]
    free = catalog_dict()
    free["plans"]["payg"]["sms"] = {"outbound": "0", "inbound": "0"}
    assert parse_catalog(free).plans["payg"].sms_outbound_pico == 0


def test_account_money_is_bounded_by_what_the_stores_hold_exactly() -> None:
    """A balance of 99999999999999999999.5 was accepted: Redis scripts (doubles) are exact
    below 2^53 micros and ClickHouse Decimal(18, 6) below 1e12 units. Every account amount is
    at most rating.money.MAX_CHARGE_MICROS (1 000 000 000 units) in magnitude."""
    cat = parse_catalog(catalog_dict())
    big, limit = "99999999999999999999.5", "1000000000.000000"
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [
            account("a1", balance=big), account("a2", balance="-1000000000.000001"),
            account("a3", auto_topup={"threshold": big, "amount": big}),
            account("a4", low_balance_alert=big, plan="business", billing="postpaid", credit_limit=big),
        ]}, cat)
    paths = ["a1).balance", "a2).balance", "a3).auto_topup.threshold", "a3).auto_topup.amount",
             "a4).low_balance_alert", "a4).credit_limit"]
    assert [e.split(" (")[1].split(":")[0] for e in info.value.errors] == paths, info.value.errors
    assert info.value.errors[0] == (f"accounts[0] (a1).balance: at most {limit} in magnitude, got '{big}' (Redis "
                                    "scripts are exact below 2^53 micros, ClickHouse Decimal(18, 6) below 1e12)")
    ok = parse_accounts({"accounts": [account(balance="-" + limit, auto_topup={"threshold": limit, "amount": limit})]}, cat)
    assert ok["acc-1"].balance == -10**15 and ok["acc-1"].topup_amount == 10**15


def test_each_rate_and_account_reports_all_its_errors() -> None:
    """A rate without per_minute reported that alone (its increments were not checked); after
    an unordered interval the later intervals were not checked; an account with a bad id
    skipped all its other checks."""
    data = catalog_dict()
    data["rate_tables"]["standard"].append({"prefix": "99", "increments": [0, 60]})
    data["rate_tables"]["standard"].append({"prefix": "98", "intervals": [
        {"from_s": 0, "per_minute": "0.1", "increment_s": 60},
        {"from_s": 120, "per_minute": "0.1", "increment_s": 60},
        {"from_s": 60, "per_minute": "0.1", "increment_s": 60},
        {"from_s": 200, "per_minute": "0.1", "increment_s": 60},
        {"from_s": 250, "per_minute": "0.1", "increment_s": 1}]})
    assert _errors(data) == [
        "rate_tables.standard[9].per_minute: missing: give per_minute + increments, or intervals",
        "rate_tables.standard[9].increments: expected [first, next] positive integers, got [0, 60]",
        "rate_tables.standard[10].intervals[2].from_s: intervals must be ordered by strictly increasing from_s",
        "rate_tables.standard[10].intervals[2]: interval length 140s (from_s 60 to 200) is not a multiple of "
        "increment_s 60",
        "rate_tables.standard[10].intervals[3]: interval length 50s (from_s 200 to 250) is not a multiple of "
        "increment_s 60",
    ]
    with pytest.raises(AccountsError) as info:
        parse_accounts({"accounts": [account(5, plan="gold", balance=1.5, home_country="gb")]},  # type: ignore[arg-type]
                       parse_catalog(catalog_dict()))
    assert [e.split(":")[0] for e in info.value.errors] == [
        "accounts[0].id", "accounts[0].plan", "accounts[0].home_country", "accounts[0].balance"]


def test_check_warns_of_zone_and_package_countries_no_destination_has() -> None:
    """The SPEC-based catalog's europe zone lists six countries, its destinations only US, GB, DE, PT:
    a package can never apply to the others (often a typo: UK for GB). Valid, but said."""
    from rating.catalog import summarize

    lines = list(summarize(load_catalog(ROOT / "tests/data/spec_catalog.yaml")))
    zone = next(line for line in lines if line.startswith("zone europe:"))
    assert zone.endswith("; warning: no destination in ES, FR, IT, NL")
    europe = next(line for line in lines if line.startswith("package europe:"))
    assert europe.endswith("covers DE, ES, FR, GB, IT, NL; warning: no destination in ES, FR, IT, NL")
    us = next(line for line in lines if line.startswith("package us-domestic:"))
    assert "warning" not in us


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.extend(_paths(child, (*path, key)))
    return out


def _replaced(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of `data` with the value at `path` replaced (_DROP: removed)."""
    if not path:
        return value
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value is _DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


_DROP = object()
_ODD = st.one_of(
    st.sampled_from([_DROP, None, True, 0, -1, 1.5, float("nan"), float("inf"), 10**40, "", "x", "NaN", "-0", "1e5",
                     "0.0000001", "1" * 50, [], {}, [None], [[]], {"x": None}, "zone:", "zone:nope", "unlimited",
                     "\u0661", date(2026, 1, 1), b"x"]),
    st.integers(), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2),
)
_ACCOUNTS = {"accounts": [account("a1"), account("a2", plan="business", billing="postpaid", credit_limit="50.00",
                                                 auto_topup={"threshold": "5", "amount": "20"}, low_balance_alert="3")]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_value_anywhere_in_a_catalog_or_accounts_is_accepted_or_refused_naming_its_path(data: st.DataObject) -> None:
    """Fuzz: a wrong type, number or shape at any path (or the key removed) is a CatalogError /
    AccountsError whose errors name that path's section, never another exception."""
    good = catalog_dict()
    path = data.draw(st.sampled_from(_paths(good)))
    value = data.draw(_ODD)
    try:
        parse_catalog(_replaced(good, path, value), "test.yaml")
    except CatalogError as exc:
        assert exc.errors, (path, value)
        if path and value is not _DROP:  # (removing a rate table or package is named where it is used)
            assert any(str(path[0]) in e for e in exc.errors), (path, value, exc.errors)
    catalog = parse_catalog(good)
    path = data.draw(st.sampled_from(_paths(_ACCOUNTS)))
    try:
        parse_accounts(_replaced(_ACCOUNTS, path, value), catalog, "accounts.yaml")
    except AccountsError as exc:
        assert exc.errors, (path, value)
        if len(path) >= 3:  # accounts[i].field
            assert any(f"accounts[{path[1]}]" in e for e in exc.errors), (path, value, exc.errors)


def test_a_monthly_fee_beyond_what_a_wallet_holds_is_refused() -> None:
    """monthly_fee had no bound: `fees charge` then died on a traceback (BalanceOutOfRange) for a
    30-digit fee, and of SIGSEGV (hiredis packing the integer) for one of 5 000 digits."""
    for fee in ("1000000000.000001", "9" * 30, "9" * 5000):
        data = catalog_dict()
        data["plans"]["starter"]["monthly_fee"] = fee
        errors = _errors(data)
        assert len(errors) == 1 and errors[0].startswith("plans.starter.monthly_fee: at most 1000000000.000000"), errors
        assert len(errors[0]) < 200
    data = catalog_dict()
    data["plans"]["starter"]["monthly_fee"] = "1000000000"
    assert parse_catalog(data).plans["starter"].monthly_fee_pico == 10**21


def test_yaml_nested_beyond_the_limit_is_refused_not_a_crash(tmp_path: Path) -> None:
    """libyaml's composer recurses on the C stack: a catalog or accounts file nested ~30 000
    deep (a line of "[" or of "- ") killed `catalog check`, `metering rate`, and the dialer API
    on its catalog reload, with SIGSEGV (exit -11, no message)."""
    deep = tmp_path / "deep.yaml"
    for body in ("version: " + "[" * 100_000 + "]" * 100_000, "version: " + "{a: " * 50_000 + "1" + "}" * 50_000):
        deep.write_text(body, encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "metering.cli", "catalog", "check", str(deep)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
        assert "found more than 100 levels of nesting" in proc.stderr and f'in "{deep}", line 1' in proc.stderr
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text("accounts:\n  - " + "- " * 50_000 + "x\n", encoding="utf-8")
    with pytest.raises(AccountsError) as info:
        load_accounts(accounts, load_catalog(ROOT / "tests/data/spec_catalog.yaml"))
    assert "found more than 100 levels of nesting" in info.value.errors[0]
    # 99 levels under `version:` are read (and refused for what they are)
    deep.write_text("version: " + "[" * 98 + "]" * 98, encoding="utf-8")
    with pytest.raises(CatalogError) as caught:
        load_catalog(deep)
    assert caught.value.errors[0].startswith("version: expected a non-empty string"), caught.value.errors


def test_account_billing_defaults_to_the_plan_and_an_explicit_value_wins() -> None:
    # README "Choices where SPEC is silent": SPEC lists `billing` both on plans and on
    # accounts.yaml without saying which wins.
    cat = parse_catalog(catalog_dict())
    bare = {"id": "b1", "plan": "business", "home_country": "US"}
    accs = parse_accounts({"accounts": [
        bare, account("b2", plan="business", billing="prepaid"), account("s1", billing="postpaid"),
    ]}, cat)
    assert accs["b1"].billing == "postpaid"  # the business plan's billing
    assert accs["b2"].billing == "prepaid"  # explicit account value wins over the plan's
    assert accs["s1"].billing == "postpaid"
    assert (accs["b1"].balance, accs["b1"].period_anchor_day) == (0, 1)
    assert (accs["b1"].topup_threshold, accs["b1"].low_balance_alert, accs["b1"].credit_limit) == (None, None, None)


def test_version_is_short_printable_text() -> None:
    """The version is written on every rated row: a 5 000-character one or one with a line
    break in it was accepted and copied into each row and log line."""
    for version, needle in (("v" * 65, "got 65 characters"), ("2026-11-01\nx", "with a control character")):
        errors = _errors(catalog_dict(version=version))
        assert any(e.startswith("version: expected at most 64 printable characters") and needle in e
                   for e in errors), errors
    assert parse_catalog(catalog_dict(version="v" * 64), "mem").version == "v" * 64
