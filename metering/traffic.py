"""Seeded generator of realistic usage traffic (CDRs) for `metering simulate`, benchmarks and tests.

    catalog = load_catalog_dict("deploy/examples/catalog.yaml")
    accounts = load_accounts_list("deploy/examples/accounts.yaml")
    for key, value in generate_events(catalog, accounts, count=1_000_000, seed=1,
                                      start=datetime(2026, 11, 1, tzinfo=UTC)):
        producer.produce("usage.events", key=key, value=value)

What comes out (SPEC "Input events"), one JSON object per message, keyed by `account_id`:

* ~70 % calls (85 % outbound, 15 % inbound; 20 % unanswered with `duration_s` 0, answered
  durations log-normal around 1.5 min with a rare hours-long tail, capped at 86 400 s),
  ~20 % SMS (1..3 segments), ~10 % meters (only from accounts whose plan prices meters; the
  share adapts so the overall mix stays near 10 %).
* Destinations weighted by the account's home country: mostly domestic fixed/mobile, some
  international (countries of the plan's packages favoured), a few toll-free and premium
  numbers (never premium for plans with `allow_premium: false`, whose dialer refuses them),
  ~0.2 % unknown destinations and ~0.1 % destinations without a rate (`no_rate`).
  Numbers are a catalog prefix plus random digits to the country's usual E.164 length; the
  first padding digit is chosen so the number stays in the picked destination (a number
  made from "44" never silently becomes a "447" mobile).
* Zipf-like account activity (rank r gets weight 1/r) unless `rate_per_account_skew=False`.
* Event time starts at `start` and advances by exponential gaps (mean `mean_gap_ms`); each
  account writes its timestamps in its own fixed UTC offset ("Z", "-05:00", "+01:00",
  "+05:30"), all RFC 3339.
* `event_id` is 128 random bits from the seeded RNG as 32 hex digits (so runs with
  different seeds never collide in dedupe state).
* `duplicate_rate`: re-yield the exact bytes of a recent valid event (a Kafka redelivery).
* `malformed_rate`: one deliberate defect per event, spread over invalid JSON, a missing or
  mistyped field, a bad E.164 number, a negative or > 86 400 s duration, 0 segments, an
  unknown kind, an unknown account, a negative meter quantity, an unknown meter and a
  timestamp more than 24 h ahead.

The same arguments (and seed) always give the same bytes, independent of PYTHONHASHSEED.
`generate_labeled_events` yields the expected outcome with every message ("ok",
"duplicate" or the SPEC reject reason) for tests that check the rating engine end to end.
No validation happens here: `rating/` owns catalog and account validation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from random import Random
from statistics import NormalDist
from typing import Any

import msgspec

from rating.yaml_text import YAMLError, parse_yaml

__all__ = [
    "MALFORMED_KINDS",
    "LABEL_OK",
    "LABEL_DUPLICATE",
    "generate_events",
    "generate_labeled_events",
    "load_accounts_list",
    "load_catalog_dict",
]

LABEL_OK = "ok"
LABEL_DUPLICATE = "duplicate"

# defect -> the SPEC reject reason the rating engine must give it
MALFORMED_KINDS: dict[str, str] = {
    "invalid_json": "invalid_json",
    "missing_field": "invalid_field",
    "mistyped_field": "invalid_field",
    "bad_e164": "invalid_field",
    "negative_duration": "invalid_field",
    "duration_too_long": "invalid_field",
    "zero_segments": "invalid_field",
    "unknown_kind": "unknown_kind",
    "unknown_account": "unknown_account",
    "negative_quantity": "invalid_field",
    "unknown_meter": "unknown_meter",
    "future_timestamp": "future_timestamp",
}

MAX_CALL_SECONDS = 86_400
MAX_E164_DIGITS = 15

# Usual E.164 length in digits (country code included) per ISO country: (fixed, mobile).
# Unknown countries fall back to 11/11; numbers are never longer than 15 digits.
E164_DIGITS: dict[str, tuple[int, int]] = {
    "US": (11, 11), "CA": (11, 11), "PR": (11, 11), "JM": (11, 11), "DO": (11, 11),
    "TT": (11, 11), "BS": (11, 11), "BB": (11, 11),
    "GB": (12, 12), "DE": (12, 13), "FR": (11, 11), "ES": (11, 11), "IT": (12, 12),
    "NL": (11, 11), "BE": (10, 11), "PT": (12, 12), "IE": (12, 12), "SE": (11, 11),
    "NO": (10, 10), "DK": (10, 10), "FI": (12, 12), "PL": (11, 11), "AT": (12, 13),
    "CH": (11, 11), "CZ": (12, 12), "GR": (12, 12), "HU": (10, 11), "RO": (11, 11),
    "BG": (11, 12), "HR": (11, 12), "SK": (12, 12), "SI": (11, 11), "LU": (11, 12),
    "EE": (10, 11), "LV": (11, 11), "LT": (11, 11), "IS": (10, 10), "CY": (11, 11),
    "MT": (11, 11),
    "IN": (12, 12), "CN": (12, 13), "JP": (12, 12), "SG": (10, 10), "HK": (11, 11),
    "KR": (11, 12), "PH": (11, 12), "ID": (11, 13), "MY": (11, 12), "TH": (10, 11),
    "VN": (11, 11),
    "AU": (11, 11), "NZ": (10, 11), "BR": (12, 13), "MX": (12, 12), "AR": (12, 13),
    "CO": (12, 12), "CL": (11, 11), "TR": (12, 12), "AE": (11, 12), "IL": (11, 12),
    "SA": (12, 12), "EG": (11, 12), "ZA": (11, 11), "NG": (11, 13), "RU": (11, 11),
    "KZ": (11, 11), "SH": (8, 8), "FK": (8, 8), "NF": (9, 9),
}

# Relative popularity of international destinations (default 1).
INTL_POPULARITY: dict[str, float] = {
    "IN": 9, "MX": 8, "CA": 8, "GB": 7, "PH": 6, "CN": 6, "DE": 5, "FR": 4, "US": 10,
    "BR": 3, "NG": 3, "VN": 3, "ES": 3, "IT": 3, "DO": 2.5, "JM": 2, "PK": 2, "CO": 2,
    "JP": 2, "KR": 2, "AU": 2, "PL": 2, "NL": 2, "IE": 1.5, "IL": 1.5, "TR": 1.5, "AE": 1.5,
}

# Fixed UTC offsets a switch in each home country may stamp its records with (minutes).
HOME_OFFSETS: dict[str, tuple[int, ...]] = {
    "US": (0, 0, -300), "CA": (0, -300), "GB": (0,), "DE": (60, 0), "FR": (60, 0),
    "IN": (330, 0),
}

# Meter quantities: (median, sigma, decimal places or None for integers)
METER_SHAPES: dict[str, tuple[float, float, int | None]] = {
    "llm_tokens": (1200.0, 0.9, None),
    "tts_characters": (350.0, 0.8, None),
    "stt_seconds": (30.0, 0.9, 1),
}
METER_WEIGHTS: dict[str, float] = {"llm_tokens": 5, "tts_characters": 3, "stt_seconds": 2}

_QUANTILES = 8192


@lru_cache(maxsize=64)
def _lognormal_table(median: float, sigma: float) -> tuple[float, ...]:
    """Inverse-CDF samples of a log-normal at evenly spaced quantiles: one list index per
    draw instead of a log/exp/gauss computation (same distribution, several times cheaper)."""
    nd = NormalDist(math.log(median), sigma)
    return tuple(math.exp(nd.inv_cdf((i + 0.5) / _QUANTILES)) for i in range(_QUANTILES))


@lru_cache(maxsize=1)
def _hms_table() -> tuple[str, ...]:
    """"HH:MM:SS" for every second of a day."""
    return tuple(f"{h:02d}:{m:02d}:{x:02d}" for h in range(24) for m in range(60) for x in range(60))


UNKNOWN_PREFIX_CANDIDATES = ("999", "998", "990", "997", "888", "878", "80", "83", "89")
DIGITS = "0123456789"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FMT = ["%0" + str(k) + "d" for k in range(20)]
_POW = [10**k for k in range(20)]

# A pool entry: (head "+digits", safe first padding digits, random digits after that)
Entry = tuple[str, str, int]


# --------------------------------------------------------------------------- loading


def load_catalog_dict(path: str | Path) -> dict[str, Any]:
    """Read a catalog YAML file as plain data (no validation: rating/ validates)."""
    data = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return data


def load_accounts_list(path: str | Path) -> list[dict[str, Any]]:
    """Read accounts YAML (`accounts: [...]` or a bare list) as plain dicts (no validation)."""
    data = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    items = data.get("accounts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of accounts or a mapping with key accounts")
    return [dict(a) for a in items]


# --------------------------------------------------------------------------- catalog model


class _Sampler:
    """Weighted choice over entries via a cumulative array and bisect (O(log n) per pick)."""

    __slots__ = ("entries", "fast", "labels", "cum", "total")

    def __init__(self, weighted: Sequence[tuple[float, Entry, str]]) -> None:
        items = [w for w in weighted if w[0] > 0]
        if not items:
            raise ValueError("empty sampler")
        self.entries = [e for _, e, _ in items]
        # (head, safe digits, len(safe), "%0Nd", 10**N): what the hot loop needs, unpacked
        self.fast = [(h, sd, len(sd), _FMT[n], _POW[n]) for h, sd, n in self.entries]
        self.labels = [lab for _, _, lab in items]
        cum: list[float] = []
        acc = 0.0
        for w, _, _ in items:
            acc += w
            cum.append(acc)
        self.cum = cum
        self.total = acc


def _covered(digits: str, table: frozenset[str] | set[str]) -> bool:
    return any(digits[:i] in table for i in range(1, len(digits) + 1))


def _used_next_digits(prefixes: Sequence[str], within: set[str]) -> dict[str, set[str]]:
    """For each prefix q in `within`: the digits d such that some prefix starts with q + d."""
    used: dict[str, set[str]] = {}
    for p in prefixes:
        for i in range(1, len(p)):
            q = p[:i]
            if q in within:
                used.setdefault(q, set()).add(p[i])
    return used


class _Model:
    """Catalog facts the generator needs, precomputed once per (catalog, accounts)."""

    def __init__(self, catalog: Mapping[str, Any]) -> None:
        raw = catalog.get("destinations") or []
        self.dest: dict[str, tuple[str, str]] = {}
        for d in raw:
            self.dest[str(d["prefix"])] = (str(d["country"]), str(d["class"]))
        dest_prefixes = sorted(self.dest)
        dest_set = set(dest_prefixes)
        self.tables: dict[str, frozenset[str]] = {
            str(name): frozenset(str(r["prefix"]) for r in (items or []))
            for name, items in (catalog.get("rate_tables") or {}).items()
        }
        self.zones: dict[str, list[str]] = {
            str(k): [str(c) for c in v] for k, v in (catalog.get("zones") or {}).items()
        }
        self.packages: dict[str, dict[str, Any]] = dict(catalog.get("packages") or {})
        self.plans: dict[str, dict[str, Any]] = dict(catalog.get("plans") or {})
        # by country and class, in catalog prefix order (sorted: deterministic)
        self.by_country: dict[str, dict[str, list[str]]] = {}
        for p in dest_prefixes:
            country, cls = self.dest[p]
            self.by_country.setdefault(country, {}).setdefault(cls, []).append(p)
        self.countries = sorted(self.by_country)
        used = _used_next_digits(dest_prefixes, dest_set)
        self.safe: dict[str, str] = {}
        for p in dest_prefixes:
            banned = set(used.get(p, ()))
            if not any(p[:i] in dest_set for i in range(1, len(p))):
                banned.add("0")  # right after a country code: 0 is a trunk prefix, never dialled
            if p[0] == "1" and len(p) in (1, 4):
                banned.update("01")  # NANP: area code and exchange start with 2-9
            self.safe[p] = "".join(d for d in DIGITS if d not in banned)
        # an unknown prefix: no destination is a prefix of it, and it is a prefix of none
        self.unknown_prefix: str | None = None
        for cand in UNKNOWN_PREFIX_CANDIDATES:
            if not _covered(cand, dest_set) and not any(p.startswith(cand) for p in dest_prefixes):
                self.unknown_prefix = cand
                break
        self._no_rate_cache: dict[str, list[Entry]] = {}

    def entry(self, prefix: str) -> Entry | None:
        """How to make numbers inside destination `prefix` (None: it has no room of its own)."""
        safe = self.safe[prefix]
        if not safe:
            return None
        country, cls = self.dest[prefix]
        fixed_len, mobile_len = E164_DIGITS.get(country, (11, 11))
        total = mobile_len if cls == "mobile" else fixed_len
        total = min(MAX_E164_DIGITS, max(total, len(prefix) + 3))
        return ("+" + prefix, safe, total - len(prefix) - 1)

    def no_rate_entries(self, table_name: str) -> list[Entry]:
        """Destinations the table prices nowhere, with padding that avoids every rate prefix."""
        if table_name not in self._no_rate_cache:
            table = self.tables.get(table_name, frozenset())
            out: list[Entry] = []
            uncovered = [p for p in sorted(self.dest) if not _covered(p, table)]
            if uncovered:
                used = _used_next_digits(sorted(set(self.dest) | table), set(uncovered))
                for p in uncovered:
                    e = self.entry(p)
                    safe = "".join(d for d in (e[1] if e else "") if d not in used.get(p, ()))
                    if e and safe:
                        out.append((e[0], safe, e[2]))
            self._no_rate_cache[table_name] = out
        return self._no_rate_cache[table_name]

    def package_countries(self, plan: Mapping[str, Any]) -> set[str]:
        out: set[str] = set()
        for name in plan.get("packages") or []:
            spec = self.packages.get(name) or {}
            countries = spec.get("countries")
            items = [countries] if isinstance(countries, str) else list(countries or [])
            for c in items:
                if isinstance(c, str) and c.startswith("zone:"):
                    out.update(self.zones.get(c[5:], []))
                else:
                    out.add(str(c))
        return out


# --------------------------------------------------------------------------- per account


class _Account:
    __slots__ = (
        "id", "plan_id", "home", "offset_min", "suffix", "dids", "did_labels", "tollfree_did",
        "tollfree_label", "outbound", "party", "sms_to", "meters", "meter_cum", "p_call",
        "p_sms", "seats", "has_inbound_table",
    )

    id: str
    plan_id: str
    home: str
    offset_min: int
    suffix: str
    dids: list[str]
    did_labels: list[str]
    tollfree_did: str | None
    tollfree_label: str
    outbound: _Sampler
    party: _Sampler
    sms_to: _Sampler
    meters: list[str]
    meter_cum: list[float]
    p_call: float
    p_sms: float
    seats: int
    has_inbound_table: bool


def _offset_suffix(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "+" if minutes > 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"{sign}{h:02d}:{m:02d}"


class _Builder:
    """Builds the samplers (cached per home country and plan)."""

    def __init__(self, model: _Model) -> None:
        self.m = model
        self._outbound: dict[tuple[str, str], _Sampler] = {}
        self._party: dict[str, _Sampler] = {}
        self._sms: dict[str, _Sampler] = {}
        self._pools: dict[tuple[str, str, frozenset[str] | None], list[Entry]] = {}

    def _pool(self, country: str, cls: str, table: frozenset[str] | None) -> list[Entry]:
        key = (country, cls, table)
        hit = self._pools.get(key)
        if hit is None:
            hit = []
            for p in self.m.by_country.get(country, {}).get(cls, []):
                if table is not None and not _covered(p, table):
                    continue
                e = self.m.entry(p)
                if e:
                    hit.append(e)
            self._pools[key] = hit
        return hit

    def home_of(self, home: str) -> str:
        return home if home in self.m.by_country else ("US" if "US" in self.m.by_country else self.m.countries[0])

    def outbound(self, home: str, plan_id: str) -> _Sampler:
        key = (home, plan_id)
        if key in self._outbound:
            return self._outbound[key]
        m = self.m
        plan = m.plans.get(plan_id) or {}
        table_name = str(plan.get("rate_table", ""))
        table = m.tables.get(table_name, frozenset())
        allow_premium = plan.get("allow_premium", True) is not False
        in_package = m.package_countries(plan)
        weighted: list[tuple[float, Entry, str]] = []

        def spread(weight: float, pool: list[Entry], label: str = LABEL_OK) -> None:
            if pool and weight > 0:
                w = weight / len(pool)
                weighted.extend((w, e, label) for e in pool)

        dom_fixed = self._pool(home, "fixed", table)
        dom_mobile = self._pool(home, "mobile", table)
        if dom_mobile:
            spread(0.42, dom_fixed)
            spread(0.30, dom_mobile)
        else:  # NANP: one class for fixed and mobile numbers
            spread(0.72, dom_fixed)
        spread(0.02, self._pool(home, "tollfree", table))
        if allow_premium:
            spread(0.006, self._pool(home, "premium", table))
        others = [c for c in m.countries if c != home]
        weights = {c: INTL_POPULARITY.get(c, 1.0) * (3.0 if c in in_package else 1.0) for c in others}
        total = sum(weights.values()) or 1.0
        for c in others:
            share = 0.245 * weights[c] / total
            fixed = self._pool(c, "fixed", table)
            mobile = self._pool(c, "mobile", table)
            if fixed and mobile:
                spread(share * 0.45, fixed)
                spread(share * 0.55, mobile)
            else:
                spread(share, fixed or mobile)
        if allow_premium:
            intl_premium = [e for c in others for e in self._pool(c, "premium", table)]
            spread(0.002, intl_premium)
        if m.unknown_prefix:
            spread(0.003, [("+" + m.unknown_prefix, DIGITS, 8)], "unknown_destination")
        spread(0.0015, m.no_rate_entries(table_name), "no_rate")
        sampler = _Sampler(weighted)
        self._outbound[key] = sampler
        return sampler

    def party(self, home: str) -> _Sampler:
        """Who calls or texts the account: mostly domestic, some international (all known)."""
        if home not in self._party:
            weighted: list[tuple[float, Entry, str]] = []
            fixed, mobile = self._pool(home, "fixed", None), self._pool(home, "mobile", None)
            for w, pool in ((0.45, fixed), (0.40, mobile)) if fixed and mobile else ((0.85, fixed or mobile),):
                weighted.extend((w / len(pool), e, LABEL_OK) for e in pool)
            others = [c for c in self.m.countries if c != home]
            total = sum(INTL_POPULARITY.get(c, 1.0) for c in others) or 1.0
            for c in others:
                pool = self._pool(c, "mobile", None) or self._pool(c, "fixed", None)
                if pool:
                    w = 0.15 * INTL_POPULARITY.get(c, 1.0) / total / len(pool)
                    weighted.extend((w, e, LABEL_OK) for e in pool)
            self._party[home] = _Sampler(weighted)
        return self._party[home]

    def sms_to(self, home: str) -> _Sampler:
        """SMS go to mobiles (NANP: any number), mostly domestic."""
        if home not in self._sms:
            weighted: list[tuple[float, Entry, str]] = []
            dom = self._pool(home, "mobile", None) or self._pool(home, "fixed", None)
            weighted.extend((0.85 / len(dom), e, LABEL_OK) for e in dom)  # (no division: empty)
            others = [c for c in self.m.countries if c != home]
            total = sum(INTL_POPULARITY.get(c, 1.0) for c in others) or 1.0
            for c in others:
                pool = self._pool(c, "mobile", None) or self._pool(c, "fixed", None)
                if pool:
                    w = 0.15 * INTL_POPULARITY.get(c, 1.0) / total / len(pool)
                    weighted.extend((w, e, LABEL_OK) for e in pool)
            self._sms[home] = _Sampler(weighted)
        return self._sms[home]


def _number(rng: Random, e: Entry) -> str:
    head, safe, rest = e
    r = rng.random
    return head + safe[int(r() * len(safe))] + (_FMT[rest] % int(r() * _POW[rest]) if rest > 0 else "")


def _build_accounts(
    model: _Model, accounts: Sequence[Mapping[str, Any]], rng: Random
) -> list[_Account]:
    b = _Builder(model)
    out: list[_Account] = []
    for raw in accounts:
        a = _Account()
        a.id = str(raw["id"])
        a.plan_id = str(raw.get("plan", ""))
        plan = model.plans.get(a.plan_id)
        if plan is None:
            raise ValueError(f"account {a.id}: plan {a.plan_id!r} is not in the catalog")
        a.home = b.home_of(str(raw.get("home_country", "US")))
        offsets = HOME_OFFSETS.get(a.home, (0,))
        a.offset_min = offsets[int(rng.random() * len(offsets))]
        a.suffix = _offset_suffix(a.offset_min)
        a.outbound = b.outbound(a.home, a.plan_id)
        a.party = b.party(a.home)
        a.sms_to = b.sms_to(a.home)
        inbound_table_name = plan.get("inbound_rate_table")
        inbound_table = model.tables.get(str(inbound_table_name)) if inbound_table_name else None
        a.has_inbound_table = inbound_table is not None
        # the account's own numbers: 1..3 ordinary numbers, and a toll-free one for some plans
        did_pool = b._pool(a.home, "fixed", None) or b._pool(a.home, "mobile", None) or a.party.entries
        a.dids = [_number(rng, did_pool[int(rng.random() * len(did_pool))]) for _ in range(1 + int(rng.random() * 3))]
        a.did_labels = [
            LABEL_OK if inbound_table is None or _covered(n[1:], inbound_table) else "no_rate" for n in a.dids
        ]
        tf_pool = b._pool(a.home, "tollfree", None)
        a.tollfree_did = None
        a.tollfree_label = LABEL_OK
        if tf_pool and (inbound_table is not None or rng.random() < 0.2):
            a.tollfree_did = _number(rng, tf_pool[int(rng.random() * len(tf_pool))])
            if inbound_table is not None and not _covered(a.tollfree_did[1:], inbound_table):
                a.tollfree_label = "no_rate"
        meters = [str(k) for k in (plan.get("meters") or {})]
        a.meters = meters
        acc = 0.0
        a.meter_cum = []
        for name in meters:
            acc += METER_WEIGHTS.get(name, 1.0)
            a.meter_cum.append(acc)
        a.seats = (5 + int(rng.random() * 45)) if (a.has_inbound_table or meters) else 0
        out.append(a)
    return out


# --------------------------------------------------------------------------- generation


def generate_events(
    catalog_dict: Mapping[str, Any],
    accounts_list: Sequence[Mapping[str, Any]],
    *,
    count: int,
    seed: int,
    start: datetime,
    duplicate_rate: float = 0.0,
    malformed_rate: float = 0.0,
    rate_per_account_skew: bool = True,
    mean_gap_ms: float = 50.0,
    now: datetime | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Yield `count` messages `(key, value)`: key = account_id, value = JSON bytes.

    `count` includes duplicates and malformed messages. `start` is the first event time
    (a naive datetime is taken as UTC); times advance by exponential gaps of mean
    `mean_gap_ms`. `now` is the reference "wall clock" for future-timestamp defects (they get
    max(event time, now) + 2..30 days); by default the event time itself.
    """
    for key, value, _label in generate_labeled_events(
        catalog_dict,
        accounts_list,
        count=count,
        seed=seed,
        start=start,
        duplicate_rate=duplicate_rate,
        malformed_rate=malformed_rate,
        rate_per_account_skew=rate_per_account_skew,
        mean_gap_ms=mean_gap_ms,
        now=now,
    ):
        yield key, value


def generate_labeled_events(
    catalog_dict: Mapping[str, Any],
    accounts_list: Sequence[Mapping[str, Any]],
    *,
    count: int,
    seed: int,
    start: datetime,
    duplicate_rate: float = 0.0,
    malformed_rate: float = 0.0,
    rate_per_account_skew: bool = True,
    mean_gap_ms: float = 50.0,
    now: datetime | None = None,
) -> Iterator[tuple[str, bytes, str]]:
    """Like `generate_events`, plus the expected outcome of each message: "ok" (rated),
    "duplicate" (exact redelivery of an earlier "ok" message) or the SPEC reject reason
    ("invalid_json", "invalid_field", "unknown_kind", "unknown_account",
    "unknown_destination", "no_rate", "unknown_meter", "future_timestamp")."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 0.0 <= duplicate_rate <= 1.0 or not 0.0 <= malformed_rate <= 1.0:
        raise ValueError("duplicate_rate and malformed_rate must be within 0..1")
    if duplicate_rate + malformed_rate > 1.0:
        raise ValueError("duplicate_rate + malformed_rate must be <= 1")
    if not accounts_list:
        raise ValueError("no accounts to generate traffic for")
    if mean_gap_ms < 0:
        raise ValueError("mean_gap_ms must be >= 0")
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)

    rng = Random(seed)
    model = _Model(catalog_dict)
    accs = _build_accounts(model, accounts_list, rng)
    order = list(range(len(accs)))
    rng.shuffle(order)  # who is busy is seeded too
    ranked = [accs[i] for i in order]
    cum: list[float] = []
    acc_w = 0.0
    for rank, _a in enumerate(ranked, start=1):
        acc_w += (1.0 / rank) if rate_per_account_skew else 1.0
        cum.append(acc_w)
    total_w = acc_w
    # meter share among meter-capable accounts, so that ~10 % of all events are meters
    meter_w = sum((1.0 / r if rate_per_account_skew else 1.0) for r, a in enumerate(ranked, 1) if a.meters)
    p_meter = min(0.6, 0.10 / (meter_w / total_w)) if meter_w > 0 else 0.0
    for a in ranked:
        pm = p_meter if a.meters else 0.0
        a.p_call = (1.0 - pm) * 0.70 / 0.90
        a.p_sms = a.p_call + (1.0 - pm) * 0.20 / 0.90
    known_ids = {a.id for a in accs}
    meter_accounts = [a for a in ranked if a.meters]

    encode = msgspec.json.Encoder().encode
    rand = rng.random
    getbits = rng.getrandbits
    now_ms = None if now is None else int((now if now.tzinfo else now.replace(tzinfo=UTC)).timestamp() * 1000)
    t_ms = int(start.timestamp() * 1000)
    t_sec, t_milli = divmod(t_ms, 1000)
    t_frag = f".{t_milli:03d}"
    ring: list[tuple[str, bytes]] = []
    ring_size = 4096
    ring_pos = 0
    dup_cut = duplicate_rate
    mal_cut = duplicate_rate + malformed_rate
    n_q = _QUANTILES
    durations = [min(MAX_CALL_SECONDS, int(x) + 1) for x in _lognormal_table(95.0, 1.0)]
    quantities: dict[str, list[int] | list[float]] = {}
    for name in sorted({m for a in accs for m in a.meters} | {"llm_tokens"}):
        median, sigma, places = METER_SHAPES.get(name, (100.0, 1.0, None))
        table = _lognormal_table(median, sigma)
        quantities[name] = (
            [int(x) + 1 for x in table] if places is None else [max(round(x, places), 0.1) for x in table]
        )
    # per UTC offset: [second, "YYYY-MM-DDTHH:MM:SS" of that second in that offset]
    tcache: dict[int, list[Any]] = {a.offset_min: [None, ""] for a in accs}

    hms = _hms_table()
    days: dict[int, str] = {}

    def stamp(sec: int, offset_min: int) -> str:
        """Local "YYYY-MM-DDTHH:MM:SS" of epoch second `sec` at a fixed UTC offset."""
        day, sod = divmod(sec + offset_min * 60, 86_400)
        prefix = days.get(day)
        if prefix is None:
            prefix = days[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
        return prefix + hms[sod]

    def fmt(ms: int, offset_min: int, suffix: str) -> str:
        sec, milli = divmod(ms, 1000)
        return f"{stamp(sec, offset_min)}.{milli:03d}{suffix}"

    def pick_account() -> _Account:
        return ranked[bisect_right(cum, rand() * total_w)]

    log = math.log

    def make(a: _Account, kind: str | None = None) -> tuple[dict[str, Any], str]:
        """One valid event for account `a` (kind forced when given) and its expected label."""
        r = rand()
        if kind is None:
            kind = "call" if r < a.p_call else ("sms" if r < a.p_sms else "meter")
        hit = tcache[a.offset_min]
        if hit[0] != t_sec:
            hit[0] = t_sec
            hit[1] = stamp(t_sec, a.offset_min)
        ts = hit[1] + t_frag + a.suffix
        if kind == "call":
            if rand() < 0.85:
                s = a.outbound
                i = bisect_right(s.cum, rand() * s.total)
                label = s.labels[i]
                head, safe, nsafe, dfmt, dpow = s.fast[i]
                ev: dict[str, Any] = {
                    "event_id": f"{getbits(128):032x}", "account_id": a.id, "kind": "call",
                    "direction": "outbound", "from": a.dids[int(rand() * len(a.dids))],
                    "to": head + safe[int(rand() * nsafe)] + dfmt % int(rand() * dpow),
                    "started_at": ts,
                }
            else:
                if a.tollfree_did is not None and rand() < 0.3:
                    to, label = a.tollfree_did, a.tollfree_label
                else:
                    j = int(rand() * len(a.dids))
                    to, label = a.dids[j], a.did_labels[j]
                p = a.party
                head, safe, nsafe, dfmt, dpow = p.fast[bisect_right(p.cum, rand() * p.total)]
                ev = {
                    "event_id": f"{getbits(128):032x}", "account_id": a.id, "kind": "call",
                    "direction": "inbound",
                    "from": head + safe[int(rand() * nsafe)] + dfmt % int(rand() * dpow),
                    "to": to, "started_at": ts,
                }
            r = rand()
            if r < 0.20:
                ev["duration_s"] = 0
            elif r < 0.9995:
                ev["duration_s"] = durations[int(rand() * n_q)]
            else:
                ev["duration_s"] = 3600 + int(rand() * 30000)  # the forgotten-line tail
            if a.seats and rand() < 0.7:
                ev["seat_id"] = f"seat-{int(rand() * a.seats):03d}"
            return ev, label
        if kind == "sms":
            s = a.sms_to
            head, safe, nsafe, dfmt, dpow = s.fast[bisect_right(s.cum, rand() * s.total)]
            other = head + safe[int(rand() * nsafe)] + dfmt % int(rand() * dpow)
            own = a.dids[int(rand() * len(a.dids))]
            r = rand()
            seg = 1 if r < 0.75 else (2 if r < 0.93 else 3)
            if rand() < 0.8:
                return {
                    "event_id": f"{getbits(128):032x}", "account_id": a.id, "kind": "sms",
                    "direction": "outbound", "from": own, "to": other, "sent_at": ts,
                    "segments": seg,
                }, LABEL_OK
            return {
                "event_id": f"{getbits(128):032x}", "account_id": a.id, "kind": "sms",
                "direction": "inbound", "from": other, "to": own, "sent_at": ts, "segments": seg,
            }, LABEL_OK
        names = a.meters or ["llm_tokens"]
        if len(names) == 1:
            name = names[0]
        else:
            name = names[bisect_right(a.meter_cum, rand() * a.meter_cum[-1])]
        return {
            "event_id": f"{getbits(128):032x}", "account_id": a.id, "kind": "meter", "meter": name,
            "quantity": quantities[name][int(rand() * n_q)], "at": ts,
        }, LABEL_OK

    def malformed() -> tuple[str, bytes, str]:
        kinds = list(MALFORMED_KINDS)
        if not meter_accounts:
            kinds.remove("negative_quantity")
        defect = kinds[int(rand() * len(kinds))]
        reason = MALFORMED_KINDS[defect]
        if defect == "negative_quantity":
            a = meter_accounts[int(rand() * len(meter_accounts))]
            want: str | None = "meter"
        else:
            a = pick_account()
            want = {
                "bad_e164": "call" if rand() < 0.7 else "sms",
                "negative_duration": "call", "duration_too_long": "call",
                "zero_segments": "sms", "unknown_meter": "meter",
            }.get(defect)
        for _ in range(100):  # the base event must be valid so the defect is the only problem
            ev, label = make(a, want)
            if label == LABEL_OK:
                break
        key = a.id
        kind = ev["kind"]
        if defect == "invalid_json":
            body = encode(ev)
            r = rand()
            if r < 0.6:
                return key, body[: 1 + int(rand() * (len(body) - 2))], reason  # truncated
            if r < 0.75:
                return key, body[:-1] + b",}", reason  # trailing comma
            if r < 0.9:
                return key, f"CDR;{ev['event_id']};{kind};{a.id}".encode(), reason
            return key, b"\xff\xfe" + body, reason
        if defect == "missing_field":
            required = {
                "call": ("event_id", "direction", "from", "to", "started_at", "duration_s"),
                "sms": ("event_id", "direction", "from", "to", "sent_at", "segments"),
                "meter": ("event_id", "meter", "quantity", "at"),
            }[kind]
            del ev[required[int(rand() * len(required))]]
        elif defect == "mistyped_field":
            if kind == "call":
                ev["duration_s"] = str(ev["duration_s"])
            elif kind == "sms":
                ev["segments"] = [ev["segments"]]
            else:
                ev["quantity"] = (None, "n/a", str(ev["quantity"]))[int(rand() * 3)]
        elif defect == "bad_e164":
            field = "to" if rand() < 0.7 else "from"
            digits = ev[field][1:]
            bad = [
                "00" + digits, digits, "+" + digits[:2] + " " + digits[2:5] + " " + digits[5:],
                "+" + digits + "1234567890123456"[: 16 - len(digits)] if len(digits) < 16 else "+" + digits + "0",
                "+", "", "+" + digits[:3] + "ABC" + digits[3:],
            ]
            ev[field] = bad[int(rand() * len(bad))]
        elif defect == "negative_duration":
            ev["duration_s"] = -1 - int(rand() * 600)
        elif defect == "duration_too_long":
            ev["duration_s"] = MAX_CALL_SECONDS + 1 + int(rand() * 200_000)
        elif defect == "zero_segments":
            ev["segments"] = 0 if rand() < 0.8 else -1
        elif defect == "unknown_kind":
            ev["kind"] = ("fax", "mms", "video", "data", "CALL")[int(rand() * 5)]
        elif defect == "unknown_account":
            ghost = a.id
            while ghost in known_ids:
                ghost = f"acc-{900000 + int(rand() * 100000):06d}"
            ev["account_id"] = key = ghost
        elif defect == "negative_quantity":
            ev["quantity"] = -(1 + int(rand() * 1000)) if rand() < 0.5 else -0.5
        elif defect == "unknown_meter":
            ghost_meter = ("video_minutes", "gpu_seconds", "image_generations", "storage_gb")[int(rand() * 4)]
            if ghost_meter in a.meters:
                ghost_meter = "x_" + ghost_meter
            ev["meter"] = ghost_meter
        elif defect == "future_timestamp":
            base = max(t_ms, now_ms) if now_ms is not None else t_ms
            future = base + 2 * 86_400_000 + int(rand() * 28 * 86_400_000)
            ts_field = {"call": "started_at", "sms": "sent_at", "meter": "at"}[kind]
            ev[ts_field] = fmt(future, a.offset_min, a.suffix)
        return key, encode(ev), reason

    for _ in range(count):
        if mean_gap_ms:
            t_ms += int(-mean_gap_ms * log(1.0 - rand()))  # exponential gap
            t_sec, t_milli = divmod(t_ms, 1000)
            t_frag = f".{t_milli:03d}"
        r = rand()
        if r < dup_cut and ring:
            key, value = ring[int(rand() * len(ring))]
            yield key, value, LABEL_DUPLICATE
            continue
        if r < mal_cut and r >= dup_cut:
            yield malformed()
            continue
        a = ranked[bisect_right(cum, rand() * total_w)]
        ev, label = make(a)
        value = encode(ev)
        if label == LABEL_OK:
            if len(ring) < ring_size:
                ring.append((a.id, value))
            else:
                ring[ring_pos] = (a.id, value)
                ring_pos = (ring_pos + 1) % ring_size
        yield a.id, value, label


# --------------------------------------------------------------------------- CLI


def _parse_time(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text}")
    return n


def _share(text: str) -> float:
    x = float(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text}")
    return x


def main(argv: list[str] | None = None) -> int:
    """`python -m metering.traffic` writes JSON lines (one event per line) for `metering rate`.
    A file that cannot be read or written ends it with one `error:` line (exit 2); a reader
    that leaves (`| head`) ends it quietly (exit 1), as `metering rate` does."""
    ap = argparse.ArgumentParser(description="Generate seeded usage events as JSON lines.")
    # the examples shipped with the project, wherever the command is run from
    examples = Path(__file__).resolve().parents[1] / "deploy/examples"
    ap.add_argument("--catalog", default=str(examples / "catalog.yaml"))
    ap.add_argument("--accounts", default=str(examples / "accounts.yaml"))
    ap.add_argument("--count", type=_count, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=_parse_time, default=None, help="RFC 3339; default: now - 1 day")
    ap.add_argument("--duplicate-rate", type=_share, default=0.0)
    ap.add_argument("--malformed-rate", type=_share, default=0.0)
    ap.add_argument("--uniform", action="store_true", help="no Zipf skew between accounts")
    ap.add_argument("--out", default="-", help="output file (default stdout)")
    args = ap.parse_args(argv)
    start = args.start or (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    try:
        catalog = load_catalog_dict(args.catalog)
    except (OSError, ValueError, YAMLError) as exc:  # a UnicodeDecodeError is a ValueError
        ap.exit(2, f"error: --catalog {args.catalog}: {getattr(exc, 'strerror', None) or exc}\n")
    try:
        accounts = load_accounts_list(args.accounts)
    except (OSError, ValueError, YAMLError) as exc:
        ap.exit(2, f"error: --accounts {args.accounts}: {getattr(exc, 'strerror', None) or exc}\n")
    events = generate_events(
        catalog, accounts, count=args.count, seed=args.seed, start=start, duplicate_rate=args.duplicate_rate,
        malformed_rate=args.malformed_rate, rate_per_account_skew=not args.uniform,
    )
    try:
        out = sys.stdout.buffer if args.out == "-" else open(args.out, "wb")  # noqa: SIM115
    except OSError as exc:
        ap.exit(2, f"error: --out {args.out}: cannot write: {exc.strerror}\n")
    try:
        for _key, value in events:
            # a malformed body may contain a newline-free anything; JSON lines keep one per line
            out.write(value.replace(b"\n", b" ") + b"\n")
        out.flush()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
