"""The example catalog/accounts obey the SPEC, and metering.traffic generates what it promises."""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.traffic import (
    LABEL_DUPLICATE,
    LABEL_OK,
    MALFORMED_KINDS,
    generate_events,
    generate_labeled_events,
    load_accounts_list,
    load_catalog_dict,
)
from schemas.events import EVENT_KINDS, CallEvent, MeterEvent, SmsEvent, event_decoder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "deploy" / "examples"
CATALOG_PATH = EXAMPLES / "catalog.yaml"
ACCOUNTS_PATH = EXAMPLES / "accounts.yaml"
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
DECODER = event_decoder()
ISO2 = re.compile(r"^[A-Z]{2}$")
CLASSES = {"fixed", "mobile", "premium", "tollfree"}
NATURAL_REJECTS = {"unknown_destination", "no_rate"}
MALFORMED_REASONS = set(MALFORMED_KINDS.values())


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    return load_catalog_dict(CATALOG_PATH)


@pytest.fixture(scope="module")
def accounts() -> list[dict[str, Any]]:
    return load_accounts_list(ACCOUNTS_PATH)


@pytest.fixture(scope="module")
def dest(catalog: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {d["prefix"]: d for d in catalog["destinations"]}


def _longest(digits: str, prefixes: set[str] | dict[str, Any]) -> str | None:
    for i in range(len(digits), 0, -1):
        if digits[:i] in prefixes:
            return digits[:i]
    return None


def _is_price(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    d = Decimal(value)
    return d.is_finite() and d >= 0


def _labeled(catalog: dict[str, Any], accounts: list[dict[str, Any]], **kw: Any) -> list[tuple[str, bytes, str]]:
    kw.setdefault("start", START)
    return list(generate_labeled_events(catalog, accounts, **kw))


def _event_time(obj: dict[str, Any]) -> datetime:
    text = obj.get("started_at") or obj.get("sent_at") or obj.get("at")
    assert isinstance(text, str)
    return datetime.fromisoformat(text)


# --------------------------------------------------------------------------- catalog


def test_catalog_top_level_keys_are_exactly_the_spec_ones(catalog: dict[str, Any]) -> None:
    assert set(catalog) == {"version", "currency", "destinations", "zones", "rate_tables", "packages", "plans"}
    assert catalog["version"] == "2026-11-01"
    assert catalog["currency"] == "USD"


def test_committed_catalog_is_what_the_generator_writes(catalog: dict[str, Any]) -> None:
    mk = _load_script("make_catalog")
    built = mk.build_catalog(mk.DEFAULT_SEED)
    assert CATALOG_PATH.read_text(encoding="utf-8") == mk.to_yaml(built, mk.DEFAULT_SEED)
    assert yaml.safe_load(mk.to_yaml(built, mk.DEFAULT_SEED)) == catalog
    # deterministic, and the seed matters
    assert mk.build_catalog(mk.DEFAULT_SEED) == built
    assert mk.build_catalog(mk.DEFAULT_SEED + 1)["destinations"] != built["destinations"]


def test_destinations_are_unique_digit_prefixes_with_country_and_class(catalog: dict[str, Any]) -> None:
    dests = catalog["destinations"]
    prefixes = [d["prefix"] for d in dests]
    assert len(prefixes) == len(set(prefixes))
    assert 2000 <= len(prefixes) <= 5000
    for d in dests:
        assert set(d) == {"prefix", "country", "class"}
        assert isinstance(d["prefix"], str) and re.fullmatch(r"[0-9]{1,15}", d["prefix"]), d
        # strings, not YAML 1.1 booleans: Norway is "NO", not False
        assert isinstance(d["country"], str) and ISO2.match(d["country"]), d
        assert d["class"] in CLASSES, d
    countries = {d["country"] for d in dests}
    assert len(countries) >= 35
    assert "NO" in countries
    assert collections.Counter(d["class"] for d in dests).keys() == CLASSES


def test_destinations_cover_the_promised_numbering_ranges(dest: dict[str, dict[str, str]]) -> None:
    expect = {
        "1": ("US", "fixed"), "1212": ("US", "fixed"), "1416": ("CA", "fixed"), "1604": ("CA", "fixed"),
        "1800": ("US", "tollfree"), "1888": ("US", "tollfree"), "1877": ("US", "tollfree"),
        "1866": ("US", "tollfree"), "1900": ("US", "premium"),
        "44": ("GB", "fixed"), "447": ("GB", "mobile"), "4490": ("GB", "premium"),
        "4491": ("GB", "premium"), "44800": ("GB", "tollfree"), "44808": ("GB", "tollfree"),
        "49": ("DE", "fixed"), "4915": ("DE", "mobile"), "4916": ("DE", "mobile"),
        "4917": ("DE", "mobile"), "49900": ("DE", "premium"), "49800": ("DE", "tollfree"),
        "33": ("FR", "fixed"), "336": ("FR", "mobile"), "337": ("FR", "mobile"),
        "3389": ("FR", "premium"), "33800": ("FR", "tollfree"),
        "3519": ("PT", "mobile"), "91": ("IN", "fixed"),
    }
    for prefix, (country, cls) in expect.items():
        assert prefix in dest, prefix
        assert (dest[prefix]["country"], dest[prefix]["class"]) == (country, cls), prefix
    for a in "6789":
        for b in "0123456789":
            assert dest["91" + a + b]["class"] == "mobile"
    # a number under a UK mobile operator prefix resolves to a GB mobile destination
    hit = _longest("447700900123", dest)
    assert hit and dest[hit]["class"] == "mobile" and dest[hit]["country"] == "GB"
    for iso in ("ES", "IT", "NL", "BE", "IE", "SE", "NO", "DK", "FI", "PL", "AT", "CH", "CZ", "GR",
                "CN", "JP", "SG", "HK", "KR", "PH", "ID", "MY", "TH", "VN", "AU", "NZ", "BR", "MX",
                "ZA", "AE", "IL", "TR"):
        assert any(d["country"] == iso for d in dest.values()), iso


def test_rate_tables_have_unique_prefixes_and_string_prices(catalog: dict[str, Any]) -> None:
    tables = catalog["rate_tables"]
    assert set(tables) == {"standard", "inbound_tollfree"}
    for name, items in tables.items():
        prefixes = [r["prefix"] for r in items]
        assert len(prefixes) == len(set(prefixes)), name
        for r in items:
            assert isinstance(r["prefix"], str) and re.fullmatch(r"[0-9]{1,15}", r["prefix"])
            assert set(r) <= {"prefix", "per_minute", "connect_fee", "increments", "intervals"}
            assert _is_price(r.get("connect_fee", "0")), r
            if "intervals" in r:
                assert "per_minute" not in r and "increments" not in r, r
                assert all(_is_price(iv["per_minute"]) for iv in r["intervals"]), r
            else:
                assert _is_price(r["per_minute"]), r
                inc = r["increments"]
                assert isinstance(inc, list) and len(inc) == 2, r
                assert all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in inc), r
    standard = tables["standard"]
    increments = collections.Counter(tuple(r["increments"]) for r in standard if "increments" in r)
    for common in ((60, 60), (30, 6), (1, 1)):
        assert increments[common] >= 20, increments


def test_interval_rates_follow_the_spec_rules(catalog: dict[str, Any]) -> None:
    with_intervals = [r for t in catalog["rate_tables"].values() for r in t if "intervals" in r]
    assert 5 <= len(with_intervals) <= 20
    assert "3519" in {r["prefix"] for r in with_intervals}
    for r in with_intervals:
        ivs = r["intervals"]
        assert len(ivs) >= 2
        assert ivs[0]["from_s"] == 0
        for iv in ivs:
            assert set(iv) == {"from_s", "per_minute", "increment_s"}
            assert isinstance(iv["increment_s"], int) and iv["increment_s"] > 0
        for a, b in zip(ivs, ivs[1:], strict=False):
            assert b["from_s"] > a["from_s"]
            assert (b["from_s"] - a["from_s"]) % a["increment_s"] == 0, r


def test_standard_table_prices_nearly_every_destination_by_its_own_class(
    catalog: dict[str, Any], dest: dict[str, dict[str, str]]
) -> None:
    standard = {r["prefix"]: r for r in catalog["rate_tables"]["standard"]}
    unrated = []
    for prefix, d in dest.items():
        hit = _longest(prefix, standard)
        if hit is None:
            unrated.append(prefix)
            continue
        # the rate that applies was written for a destination of the same country and class
        assert hit in dest, (prefix, hit)
        assert (dest[hit]["country"], dest[hit]["class"]) == (d["country"], d["class"]), (prefix, hit)
    assert 1 <= len(unrated) <= 5, unrated  # a couple of exotic ones, so no_rate can happen
    assert len(unrated) / len(dest) < 0.01

    def pm(prefix: str) -> Decimal:
        r = standard[prefix]
        return Decimal(r["per_minute"] if "per_minute" in r else r["intervals"][0]["per_minute"])

    assert pm("1") < pm("447") < pm("4490")
    assert Decimal(standard["4490"]["connect_fee"]) > 0
    assert pm("1800") == 0
    fixed = [pm(p) for p, d in dest.items() if d["class"] == "fixed" and p in standard]
    premium = [pm(p) for p, d in dest.items() if d["class"] == "premium" and p in standard]
    assert min(premium) > max(sorted(fixed)[: len(fixed) // 2])  # premium dearer than typical fixed


def test_inbound_tollfree_table_prices_tollfree_and_frees_home_numbers(catalog: dict[str, Any]) -> None:
    inbound = {r["prefix"]: r for r in catalog["rate_tables"]["inbound_tollfree"]}
    for tf in ("1800", "1888", "1877", "1866", "44800"):
        assert Decimal(inbound[tf]["per_minute"]) > 0
    for root in ("1", "44", "49", "33", "91"):
        assert Decimal(inbound[root]["per_minute"]) == 0


def test_zones_and_packages(catalog: dict[str, Any], dest: dict[str, dict[str, str]]) -> None:
    countries = {d["country"] for d in dest.values()}
    zones = catalog["zones"]
    assert {"europe", "asia", "north_america"} <= set(zones)
    for members in zones.values():
        assert all(isinstance(c, str) and ISO2.match(c) and c in countries for c in members)
    assert {"GB", "CH", "NO", "DE", "FR"} <= set(zones["europe"]) and "US" not in zones["europe"]
    assert set(zones["asia"]) == {"IN", "CN", "JP", "SG", "HK", "KR", "PH", "ID", "MY", "TH", "VN"}
    assert set(zones["north_america"]) == {"US", "CA"}

    packages = catalog["packages"]
    assert set(packages) == {"us-domestic", "north-america", "europe", "europe-fixed", "asia", "dev-free"}
    for name, pkg in packages.items():
        assert set(pkg) <= {"countries", "classes", "scope", "minutes", "fair_use_minutes"}, name
        assert pkg["classes"] and set(pkg["classes"]) <= {"fixed", "mobile"}, name  # never premium/tollfree
        c = pkg["countries"]
        if isinstance(c, str):
            assert c.startswith("zone:") and c[5:] in zones, name
        else:
            assert c and all(isinstance(x, str) and ISO2.match(x) for x in c), name
        assert pkg["scope"] in ("domestic", "international")
        if pkg["minutes"] == "unlimited":
            assert isinstance(pkg["fair_use_minutes"], int) and pkg["fair_use_minutes"] > 0
        else:
            assert isinstance(pkg["minutes"], int) and pkg["minutes"] > 0 and "fair_use_minutes" not in pkg
    assert packages["us-domestic"] == {"countries": ["US"], "classes": ["fixed", "mobile"], "scope": "domestic",
                                       "minutes": "unlimited", "fair_use_minutes": 5000}
    assert packages["europe-fixed"]["classes"] == ["fixed"]
    assert packages["dev-free"]["minutes"] == 60


def test_plans_reference_existing_tables_and_packages(catalog: dict[str, Any]) -> None:
    plans = catalog["plans"]
    assert set(plans) == {"starter", "pro", "business", "developer", "voice-ai"}
    keys = {"monthly_fee", "billing", "rate_table", "inbound_rate_table", "packages", "sms", "meters",
            "allow_premium"}
    for name, plan in plans.items():
        assert set(plan) == keys, name
        assert _is_price(plan["monthly_fee"]), name
        assert plan["billing"] in ("prepaid", "postpaid")
        assert plan["rate_table"] in catalog["rate_tables"]
        assert plan["inbound_rate_table"] is None or plan["inbound_rate_table"] in catalog["rate_tables"]
        assert all(p in catalog["packages"] for p in plan["packages"]), name
        assert set(plan["sms"]) == {"outbound", "inbound"} and all(_is_price(v) for v in plan["sms"].values())
        assert all(_is_price(v) for v in plan["meters"].values()), name
        assert isinstance(plan["allow_premium"], bool)
    assert plans["business"]["billing"] == "postpaid"
    assert plans["business"]["inbound_rate_table"] == "inbound_tollfree"
    assert plans["business"]["packages"] == ["us-domestic", "north-america", "europe", "asia"]
    assert plans["developer"]["monthly_fee"] == "0" and plans["developer"]["allow_premium"] is False
    assert plans["voice-ai"]["meters"] == {"llm_tokens": "0.000002", "tts_characters": "0.000015",
                                           "stt_seconds": "0.0004"}


def test_the_rating_validator_accepts_the_examples() -> None:
    from rating import accounts as accounts_mod
    from rating import catalog as catalog_mod

    cat = catalog_mod.load_catalog(CATALOG_PATH)
    accs = accounts_mod.parse_accounts(yaml.safe_load(ACCOUNTS_PATH.read_text()), cat, str(ACCOUNTS_PATH))
    assert len(accs) == 200


# --------------------------------------------------------------------------- accounts


def test_committed_accounts_are_what_the_generator_writes(catalog: dict[str, Any]) -> None:
    mk = _load_script("make_accounts")
    accs = mk.make_accounts(catalog["plans"], 200, mk.DEFAULT_SEED)
    assert ACCOUNTS_PATH.read_text(encoding="utf-8") == mk.to_yaml(accs, mk.DEFAULT_SEED)
    assert mk.make_accounts(catalog["plans"], 57, 3) == mk.make_accounts(catalog["plans"], 57, 3)
    assert len(mk.make_accounts(catalog["plans"], 57, 3)) == 57
    assert mk.make_accounts(catalog["plans"], 57, 3) != mk.make_accounts(catalog["plans"], 57, 4)


def test_accounts_follow_the_spec_shape(catalog: dict[str, Any], accounts: list[dict[str, Any]]) -> None:
    keys = {"id", "plan", "home_country", "billing", "balance", "period_anchor_day", "auto_topup",
            "low_balance_alert", "credit_limit"}
    money = re.compile(r"^-?[0-9]+(\.[0-9]{1,6})?$")
    ids = [a["id"] for a in accounts]
    assert len(ids) == len(set(ids)) == 200
    for a in accounts:
        assert set(a) == keys, a
        assert re.fullmatch(r"acc-[0-9]{6}", a["id"])
        plan = catalog["plans"][a["plan"]]
        assert a["billing"] == plan["billing"]
        assert isinstance(a["home_country"], str) and ISO2.match(a["home_country"])
        assert 1 <= a["period_anchor_day"] <= 28
        assert isinstance(a["balance"], str) and money.match(a["balance"])
        for k in ("low_balance_alert", "credit_limit"):
            assert a[k] is None or (isinstance(a[k], str) and money.match(a[k]))
        if a["auto_topup"] is not None:
            assert set(a["auto_topup"]) == {"threshold", "amount"}
            assert Decimal(a["auto_topup"]["amount"]) > 0
        if a["billing"] == "postpaid":
            assert a["balance"] == "0.00" and a["auto_topup"] is None
        else:
            assert a["credit_limit"] is None
    prepaid = [a for a in accounts if a["billing"] == "prepaid"]
    assert any(Decimal(a["balance"]) <= 3 and a["auto_topup"] is None for a in prepaid)
    assert sum(a["auto_topup"] is not None for a in prepaid) >= 20
    assert any(a["credit_limit"] for a in accounts if a["billing"] == "postpaid")
    homes = collections.Counter(a["home_country"] for a in accounts)
    assert homes["US"] > len(accounts) / 2 and {"GB", "DE", "FR", "IN"} <= set(homes)
    assert set(a["plan"] for a in accounts) == set(catalog["plans"])


# --------------------------------------------------------------------------- traffic


def test_valid_events_decode_with_the_input_schema(
    catalog: dict[str, Any], accounts: list[dict[str, Any]], dest: dict[str, dict[str, str]]
) -> None:
    events = _labeled(catalog, accounts, count=20_000, seed=11, duplicate_rate=0.02, malformed_rate=0.03)
    ids = {a["id"] for a in accounts}
    last = START
    n_valid = 0
    for key, value, label in events:
        if label in MALFORMED_REASONS:
            continue
        ev = DECODER.decode(value)  # raises on any schema violation
        n_valid += 1
        assert ev.account_id == key and key in ids
        assert isinstance(ev, CallEvent | SmsEvent | MeterEvent)
        ts = ev.started_at if isinstance(ev, CallEvent) else ev.sent_at if isinstance(ev, SmsEvent) else ev.at
        assert ts.tzinfo is not None and ts >= START
        if isinstance(ev, CallEvent | SmsEvent):
            for number in (ev.from_, ev.to):
                assert len(number) - 1 <= 15
        if isinstance(ev, MeterEvent):
            assert ev.quantity >= 0
        if label != LABEL_DUPLICATE:
            assert ts >= last  # event-time order
            last = ts
        raw = json.loads(value)
        assert set(raw) <= {"event_id", "account_id", "kind", "direction", "from", "to", "started_at",
                            "duration_s", "seat_id", "sent_at", "segments", "meter", "quantity", "at"}
        text = raw.get("started_at") or raw.get("sent_at") or raw.get("at")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)", text)
    assert n_valid > 18_000
    assert last - START < timedelta(hours=2)  # a few ms per event


def test_generation_is_deterministic_by_seed(catalog: dict[str, Any], accounts: list[dict[str, Any]]) -> None:
    kw: dict[str, Any] = dict(count=3000, start=START, duplicate_rate=0.05, malformed_rate=0.05)
    a = list(generate_events(catalog, accounts, seed=5, **kw))
    b = list(generate_events(catalog, accounts, seed=5, **kw))
    c = list(generate_events(catalog, accounts, seed=6, **kw))
    assert a == b
    assert len(a) == 3000
    assert a != c and sum(x == y for x, y in zip(a, c, strict=True)) < 10
    # generate_events is generate_labeled_events without the labels
    assert [(k, v) for k, v, _ in _labeled(catalog, accounts, seed=5, **kw)] == a


def test_generation_does_not_depend_on_hash_randomization() -> None:
    code = (
        "import hashlib, datetime as dt\n"
        "from metering.traffic import *\n"
        f"c = load_catalog_dict({str(CATALOG_PATH)!r}); a = load_accounts_list({str(ACCOUNTS_PATH)!r})\n"
        "h = hashlib.sha256()\n"
        "for k, v in generate_events(c, a, count=2000, seed=9, malformed_rate=0.1, duplicate_rate=0.1,"
        " start=dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)):\n"
        "    h.update(k.encode() + b'|' + v + b'\\n')\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True, text=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_duplicates_are_exact_redeliveries_at_the_requested_rate(
    catalog: dict[str, Any], accounts: list[dict[str, Any]]
) -> None:
    events = _labeled(catalog, accounts, count=20_000, seed=21, duplicate_rate=0.05)
    seen: set[tuple[str, bytes]] = set()
    ids: set[tuple[str, str]] = set()
    dups = 0
    for key, value, label in events:
        if label == LABEL_DUPLICATE:
            dups += 1
            assert (key, value) in seen  # the exact bytes of an earlier valid message
            continue
        ev = DECODER.decode(value)
        assert (key, ev.event_id) not in ids  # event ids are unique per account
        ids.add((key, ev.event_id))
        if label == LABEL_OK:
            seen.add((key, value))
    assert 0.04 <= dups / len(events) <= 0.06
    none = _labeled(catalog, accounts, count=5000, seed=21)
    assert not any(label == LABEL_DUPLICATE for _, _, label in none)
    assert len({v for _, v, _ in none}) == 5000


def test_malformed_events_are_real_defects_at_the_requested_rate(
    catalog: dict[str, Any], accounts: list[dict[str, Any]]
) -> None:
    now = START + timedelta(hours=1)
    events = _labeled(catalog, accounts, count=20_000, seed=31, malformed_rate=0.10, now=now)
    plans = {a["id"]: catalog["plans"][a["plan"]] for a in accounts}
    malformed = [(k, v, r) for k, v, r in events if r in MALFORMED_REASONS]
    assert 0.085 <= len(malformed) / len(events) <= 0.115
    assert {r for _, _, r in malformed} == MALFORMED_REASONS
    by_reason = collections.Counter(r for _, _, r in malformed)
    assert by_reason["invalid_field"] > by_reason["invalid_json"]  # 7 of 12 defects are field errors
    for key, value, reason in malformed:
        if reason == "invalid_json":
            with pytest.raises(msgspec.DecodeError):
                msgspec.json.decode(value)
            continue
        raw = json.loads(value)
        assert raw["account_id"] == key
        if reason == "invalid_field":
            try:
                ev = DECODER.decode(value)
            except msgspec.ValidationError:
                continue
            # the ones decoding lets through, for the engine to refuse: a quantity not a number or < 0
            assert isinstance(ev, MeterEvent), value
            assert type(ev.quantity) not in (int, Decimal) or ev.quantity < 0, value
        elif reason == "unknown_kind":
            assert raw["kind"] not in EVENT_KINDS
        elif reason == "unknown_account":
            assert key not in plans
            DECODER.decode(value)
        elif reason == "unknown_meter":
            ev = DECODER.decode(value)
            assert isinstance(ev, MeterEvent) and ev.meter not in plans[key]["meters"]
        elif reason == "future_timestamp":
            ev = DECODER.decode(value)
            assert _event_time(raw) > now + timedelta(hours=24)
        else:  # pragma: no cover
            pytest.fail(f"unexpected reason {reason}")


def test_traffic_mix_and_destinations(
    catalog: dict[str, Any], accounts: list[dict[str, Any]], dest: dict[str, dict[str, str]]
) -> None:
    events = _labeled(catalog, accounts, count=40_000, seed=41)
    acc = {a["id"]: a for a in accounts}
    tables = {name: {r["prefix"] for r in t} for name, t in catalog["rate_tables"].items()}
    kinds: collections.Counter[str] = collections.Counter()
    calls: list[dict[str, Any]] = []
    unknown = 0
    for key, value, label in events:
        raw = json.loads(value)
        kinds[raw["kind"]] += 1
        plan = catalog["plans"][acc[key]["plan"]]
        if raw["kind"] == "call":
            calls.append(raw)
            assert 0 <= raw["duration_s"] <= 86_400
        elif raw["kind"] == "sms":
            assert raw["segments"] in (1, 2, 3)
        else:
            assert raw["meter"] in plan["meters"]  # meters only from plans that price them
            assert isinstance(raw["quantity"], int | float) and raw["quantity"] >= 0
        if raw["kind"] == "call" and raw["direction"] == "outbound":
            hit = _longest(raw["to"][1:], dest)
            if label == "unknown_destination":
                unknown += 1
                assert hit is None
                continue
            assert hit is not None
            if dest[hit]["class"] == "premium":
                assert plan["allow_premium"]
            table = tables[plan["rate_table"]]
            assert (_longest(raw["to"][1:], table) is None) == (label == "no_rate")
    n = len(events)
    assert 0.66 <= kinds["call"] / n <= 0.74
    assert 0.17 <= kinds["sms"] / n <= 0.23
    assert 0.06 <= kinds["meter"] / n <= 0.14
    inbound = sum(c["direction"] == "inbound" for c in calls) / len(calls)
    assert 0.12 <= inbound <= 0.18
    unanswered = sum(c["duration_s"] == 0 for c in calls) / len(calls)
    assert 0.17 <= unanswered <= 0.23
    answered = sorted(c["duration_s"] for c in calls if c["duration_s"])
    assert 30 <= answered[len(answered) // 2] <= 300
    assert 0 < unknown / n < 0.005
    # domestic destinations dominate outbound calls
    out = [c for c in calls if c["direction"] == "outbound"]
    domestic = sum(
        1 for c in out
        if (h := _longest(c["to"][1:], dest)) and dest[h]["country"] == acc[c["account_id"]]["home_country"]
    )
    assert domestic / len(out) > 0.6


def test_account_activity_is_skewed_unless_disabled(
    catalog: dict[str, Any], accounts: list[dict[str, Any]]
) -> None:
    skewed = collections.Counter(k for k, _ in generate_events(catalog, accounts, count=20_000, seed=51, start=START))
    flat = collections.Counter(
        k for k, _ in generate_events(catalog, accounts, count=20_000, seed=51, start=START, rate_per_account_skew=False)
    )
    assert skewed.most_common(1)[0][1] > 10 * (20_000 / len(accounts))
    assert flat.most_common(1)[0][1] < 3 * (20_000 / len(accounts))
    assert len(flat) == len(accounts)


def test_offsets_and_naive_start(catalog: dict[str, Any], accounts: list[dict[str, Any]]) -> None:
    naive = list(generate_events(catalog, accounts, count=500, seed=3, start=START.replace(tzinfo=None)))
    assert naive == list(generate_events(catalog, accounts, count=500, seed=3, start=START))
    suffixes = {re.search(r"(Z|[+-]\d\d:\d\d)\"", v.decode()).group(1) for _, v in naive}  # type: ignore[union-attr]
    assert "Z" in suffixes and len(suffixes) >= 2


def test_bad_arguments_are_refused(catalog: dict[str, Any], accounts: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        list(generate_events(catalog, accounts, count=-1, seed=1, start=START))
    with pytest.raises(ValueError):
        list(generate_events(catalog, accounts, count=1, seed=1, start=START, duplicate_rate=0.7, malformed_rate=0.7))
    with pytest.raises(ValueError):
        list(generate_events(catalog, [], count=1, seed=1, start=START))
    with pytest.raises(ValueError, match="plan"):
        list(generate_events(catalog, [{**accounts[0], "plan": "nope"}], count=1, seed=1, start=START))


def test_loaders_accept_both_account_layouts(tmp_path: Path, accounts: list[dict[str, Any]]) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(accounts[:3]))
    assert load_accounts_list(bare) == accounts[:3]
    assert load_accounts_list(ACCOUNTS_PATH)[:3] == accounts[:3]
    bad = tmp_path / "bad.yaml"
    bad.write_text("just a string\n")
    with pytest.raises(ValueError):
        load_catalog_dict(bad)


@functools.lru_cache(maxsize=1)
def _small_world() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return load_catalog_dict(CATALOG_PATH), load_accounts_list(ACCOUNTS_PATH)[:40]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    count=st.integers(min_value=0, max_value=300),
    dup=st.floats(min_value=0, max_value=0.3),
    bad=st.floats(min_value=0, max_value=0.3),
    skew=st.booleans(),
)
def test_any_seed_gives_exact_count_and_decodable_valid_events(
    seed: int, count: int, dup: float, bad: float, skew: bool
) -> None:
    catalog, accounts = _small_world()
    events = list(
        generate_labeled_events(catalog, accounts, count=count, seed=seed, start=START, duplicate_rate=dup,
                                malformed_rate=bad, rate_per_account_skew=skew)
    )
    assert len(events) == count
    for key, value, label in events:
        assert isinstance(key, str) and isinstance(value, bytes)
        if label in (LABEL_OK, LABEL_DUPLICATE, *NATURAL_REJECTS):
            assert DECODER.decode(value).account_id == key


def test_labels_agree_with_the_offline_rating_engine(tmp_path: Path, catalog: dict[str, Any],
                                                     accounts: list[dict[str, Any]]) -> None:
    """End to end: `metering rate` gives every message the outcome the generator predicts."""
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    events = _labeled(catalog, accounts, count=5000, seed=61, start=now - timedelta(days=1),
                      duplicate_rate=0.03, malformed_rate=0.08, now=now)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(v.replace(b"\n", b" ") + b"\n" for _, v, _ in events))
    out = subprocess.run(
        [sys.executable, "-m", "metering.cli", "rate", "--catalog", str(CATALOG_PATH), "--accounts",
         str(ACCOUNTS_PATH), "--events", str(path), "--now", now.isoformat()],
        capture_output=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(events)
    got = [r["reason"] if r["status"] == "rejected" else r["status"] for r in lines]
    want = ["rated" if label == LABEL_OK else label for _, _, label in events]
    mismatches = [(w, g, v[:200]) for w, g, (_, v, _) in zip(want, got, events, strict=True) if w != g]
    assert not mismatches, mismatches[:5]


def test_the_generator_command_refuses_bad_input_in_one_line_and_leaves_a_closed_pipe_quietly(tmp_path: Path) -> None:
    """`python -m metering.traffic` (README quick start) ended every operator mistake with a
    Python traceback and exit 1: `--count -5` (ValueError: count must be >= 0), a missing
    `--catalog` or `--out` folder (FileNotFoundError), and `| head -1` (BrokenPipeError)."""
    root = Path(__file__).resolve().parents[1]

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "metering.traffic", *args], cwd=root, capture_output=True,
                              timeout=120)

    for args, needle in ((("--count", "-5"), "--count: expected a count >= 0"),
                         (("--duplicate-rate", "2"), "--duplicate-rate: expected a share from 0 to 1"),
                         (("--catalog", str(tmp_path / "nope.yaml")), f"error: --catalog {tmp_path}/nope.yaml: No such"),
                         (("--accounts", str(tmp_path)), f"error: --accounts {tmp_path}: Is a directory"),
                         (("--out", str(tmp_path / "no" / "x.jsonl")), "cannot write: No such file or directory")):
        out = run("--count", "5", *args)  # the last --count given wins
        err = out.stderr.decode()
        assert out.returncode == 2 and needle in err and "Traceback" not in err, (args, err)
    proc = subprocess.Popen([sys.executable, "-m", "metering.traffic", "--count", "200000"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"event_id"')
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err
