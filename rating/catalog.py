"""Tariff catalog: YAML in, validated and compiled lookup structures out.

Validation collects *every* problem with its path and a hint before refusing the catalog, so an
operator fixes a file in one pass. The compiled form is what the hot path uses: prefix dicts,
prices as integer pico-units, intervals as tuples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rating.money import (
    MAX_CHARGE_MICROS,
    PICO_PER_MICRO,
    MoneyError,
    format_micros,
    parse_price_pico,
)
from rating.shown import shown
from rating.yaml_text import YAMLError, parse_yaml
from schemas.events import MAX_CALL_SECONDS, MAX_SMS_SEGMENTS

DEST_CLASSES = ("fixed", "mobile", "premium", "tollfree")
NEVER_COVERED = frozenset({"premium", "tollfree"})
SCOPES = ("domestic", "international")
BILLING_MODES = ("prepaid", "postpaid")
_PREFIX_RE = re.compile(r"^[0-9]{1,15}$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

MAX_VERSION_CHARS = 64
_TOP_KEYS = {"version", "currency", "destinations", "zones", "rate_tables", "packages", "plans"}
_DEST_KEYS = {"prefix", "country", "class"}
_RATE_KEYS = {"prefix", "per_minute", "connect_fee", "increments", "intervals"}
_INTERVAL_KEYS = {"from_s", "per_minute", "increment_s"}
_PACKAGE_KEYS = {"countries", "classes", "scope", "minutes", "fair_use_minutes"}
_PLAN_KEYS = {
    "monthly_fee", "billing", "rate_table", "inbound_rate_table", "packages", "sms", "meters",
    "allow_premium",
}


class CatalogError(ValueError):
    """A catalog that must not be used; `errors` lists every problem as "path: message"."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{source}: catalog refused, {len(errors)} error(s):\n{lines}")


@dataclass(frozen=True, slots=True)
class Interval:
    from_s: int
    end_s: int | None  # None: open-ended last interval
    per_minute_pico: int
    increment_s: int


@dataclass(frozen=True, slots=True)
class Rate:
    prefix: str
    intervals: tuple[Interval, ...]
    connect_fee_pico: int

    @property
    def simple(self) -> tuple[int, int, int] | None:
        """(first, next, per_minute_pico) when one price applies throughout (the common
        `increments: [first, next]` form), which the engine prices without a loop."""
        ivs = self.intervals
        if len(ivs) == 2 and ivs[0].per_minute_pico == ivs[1].per_minute_pico and ivs[0].end_s == ivs[0].increment_s:
            return ivs[0].increment_s, ivs[1].increment_s, ivs[0].per_minute_pico
        if len(ivs) == 1:
            return ivs[0].increment_s, ivs[0].increment_s, ivs[0].per_minute_pico
        return None


@dataclass(frozen=True, slots=True)
class Destination:
    prefix: str
    country: str
    dest_class: str


@dataclass(frozen=True, slots=True)
class Package:
    package_id: str
    countries: frozenset[str]
    classes: frozenset[str]
    scope: str
    allowance_s: int | None  # finite minutes * 60; None for unlimited
    fair_use_s: int | None  # unlimited only: seconds before fair use is exceeded

    @property
    def unlimited(self) -> bool:
        return self.allowance_s is None

    @property
    def limit_s(self) -> int | None:
        """Seconds this package covers per period (None: no limit at all)."""
        return self.fair_use_s if self.allowance_s is None else self.allowance_s


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    monthly_fee_pico: int
    billing: str
    rate_table: str
    inbound_rate_table: str | None
    packages: tuple[str, ...]
    sms_outbound_pico: int
    sms_inbound_pico: int
    meters_pico: Mapping[str, int]
    allow_premium: bool


class PrefixTable:
    """Longest-prefix match over digit strings: one dict probe per candidate length.

    Probing only the lengths that occur keeps a lookup independent of how many prefixes the
    table holds (thousands of prefixes cost the same as ten).
    """

    __slots__ = ("_by_prefix", "_lengths", "max_len")

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._by_prefix = dict(items)
        self._lengths = tuple(sorted({len(p) for p in items}, reverse=True))
        self.max_len = self._lengths[0] if self._lengths else 0

    def __len__(self) -> int:
        return len(self._by_prefix)

    def lookup(self, digits: str) -> Any | None:
        table = self._by_prefix
        n = len(digits)
        for length in self._lengths:
            if length <= n:
                hit = table.get(digits[:length])
                if hit is not None:
                    return hit
        return None


@dataclass(slots=True)
class Catalog:
    version: str
    currency: str
    destinations: PrefixTable
    zones: dict[str, frozenset[str]]
    rate_tables: dict[str, PrefixTable]
    packages: dict[str, Package]
    plans: dict[str, Plan]
    source: str = "<memory>"
    raw_rates: dict[str, dict[str, Rate]] = field(default_factory=dict)

    @property
    def max_prefix_len(self) -> int:
        return max([self.destinations.max_len, *(t.max_len for t in self.rate_tables.values())])


# --------------------------------------------------------------------------- validation


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _unknown_keys(errs: _Errors, path: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            hint = ", ".join(sorted(allowed))
            errs.add(f"{path}.{key}" if path else str(key), f"unknown key (allowed: {hint})")


def _price(errs: _Errors, path: str, value: Any) -> int:
    if isinstance(value, float):
        errs.add(path, f'prices must be quoted decimal strings like "0.0125", got the float {shown(value)}')
        return 0
    try:
        return parse_price_pico(value)
    except MoneyError as exc:
        errs.add(path, str(exc))
        return 0


def _pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _mapping(errs: _Errors, path: str, value: Any, *, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        errs.add(path, f"expected a mapping, got {type(value).__name__}")
        return {}
    return value


def name_text(value: object) -> str | None:
    """A name as the catalog knows it: text, or an integer (YAML reads unquoted `2026` as one)
    as its digits, so that `rate_table: 2026` finds `rate_tables: {2026: ...}` and an
    account's `plan: 2026` finds plan 2026. None for anything else (a list, a date, true...)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _named(errs: _Errors, section: str, entries: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """(name, value) for the entries of a section whose key is a name (name_text); the others
    are errors, and so is a name given twice (`2026:` and `"2026":`)."""
    seen: set[str] = set()
    for key, value in entries.items():
        name = name_text(key)
        if name is None:
            errs.add(f"{section}.{shown(key)}", f"a name must be text, got the {type(key).__name__} "
                                                f"{shown(key)} (quote it)")
        elif name in seen:
            errs.add(f"{section}.{name}", "given twice (once as a number, once as text)")
        else:
            seen.add(name)
            yield name, value


def _reference(errs: _Errors, path: str, value: Any, what: str, known: Mapping[str, Any]) -> str | None:
    """The name `value` refers to when it is one in `known`; otherwise an error and None."""
    name = name_text(value)
    if value is None:
        errs.add(path, f"missing: the name of a {what} ({what}s: {', '.join(sorted(known)) or 'none'})")
    elif name is None:
        errs.add(path, f"expected a {what} name, got {shown(value)}")
    elif name not in known:
        errs.add(path, f"names a missing {what} {shown(name)} ({what}s: {', '.join(sorted(known)) or 'none'})")
    else:
        return name
    return None


def _validate_rate(errs: _Errors, path: str, item: Any) -> Rate | None:
    if not isinstance(item, dict):
        errs.add(path, f"expected a mapping with prefix and prices, got {shown(item)}")
        return None
    _unknown_keys(errs, path, item, _RATE_KEYS)
    raw_prefix = item.get("prefix")
    prefix = raw_prefix if isinstance(raw_prefix, str) else ""
    if not _PREFIX_RE.fullmatch(prefix):
        errs.add(f"{path}.prefix", f'expected a quoted string of 1..15 digits, got {shown(raw_prefix)}')
    connect = _price(errs, f"{path}.connect_fee", item.get("connect_fee", "0"))
    has_simple = "increments" in item or "per_minute" in item
    if "intervals" in item and has_simple:
        errs.add(path, "give either per_minute + increments or intervals, not both")
        return None
    intervals: list[Interval] = []
    if "intervals" in item:
        raw = item["intervals"]
        if not isinstance(raw, list) or not raw:
            errs.add(f"{path}.intervals", "expected a non-empty list of {from_s, per_minute, increment_s}")
            return None
        starts: list[int] = []
        parsed: list[tuple[int, int, int]] = []
        broken = False  # keep checking every interval (every error is listed), then give up
        for i, iv in enumerate(raw):
            ipath = f"{path}.intervals[{i}]"
            if not isinstance(iv, dict):
                errs.add(ipath, f"expected a mapping, got {shown(iv)}")
                broken = True
                continue
            _unknown_keys(errs, ipath, iv, _INTERVAL_KEYS)
            start, inc = iv.get("from_s"), iv.get("increment_s")
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                errs.add(f"{ipath}.from_s", f"expected an integer >= 0, got {shown(start)}")
                broken = True
            if not _pos_int(inc):
                errs.add(f"{ipath}.increment_s", f"expected a positive integer, got {shown(inc)}")
                broken = True
            if "per_minute" not in iv:
                errs.add(f"{ipath}.per_minute", "missing (a decimal string)")
            pm = _price(errs, f"{ipath}.per_minute", iv.get("per_minute", "0"))
            if not broken:
                assert isinstance(start, int) and isinstance(inc, int)
                starts.append(start)
                parsed.append((start, pm, inc))
        if broken:
            return None
        if starts[0] != 0:
            errs.add(f"{path}.intervals[0].from_s", f"the first interval must start at 0, got {starts[0]}")
        unordered = False  # still check every interval: every error is listed
        for i in range(1, len(parsed)):
            if parsed[i][0] <= parsed[i - 1][0]:
                errs.add(f"{path}.intervals[{i}].from_s", "intervals must be ordered by strictly increasing from_s")
                unordered = True
        for i, (start, pm, inc) in enumerate(parsed):
            end = parsed[i + 1][0] if i + 1 < len(parsed) else None
            if end is not None and end > start and (end - start) % inc:
                errs.add(
                    f"{path}.intervals[{i}]",
                    f"interval length {end - start}s (from_s {start} to {end}) is not a multiple of increment_s {inc}",
                )
            intervals.append(Interval(start, end, pm, inc))
        if unordered:
            return None
    else:
        simple_ok = "per_minute" in item  # check increments too: every error is listed
        if not simple_ok:
            errs.add(f"{path}.per_minute", "missing: give per_minute + increments, or intervals")
        pm = _price(errs, f"{path}.per_minute", item.get("per_minute", "0"))
        inc_raw = item.get("increments")
        if (
            not isinstance(inc_raw, list)
            or len(inc_raw) != 2
            or not all(_pos_int(x) for x in inc_raw)
        ):
            errs.add(f"{path}.increments", f"expected [first, next] positive integers, got {shown(inc_raw)}")
            simple_ok = False
        if not simple_ok:
            return None
        assert isinstance(inc_raw, list)
        first, nxt = inc_raw
        intervals = [Interval(0, first, pm, first), Interval(first, None, pm, nxt)]
    # The longest call, rounded up by at most one increment, at the dearest stretch's price.
    worst_s = MAX_CALL_SECONDS + max(iv.increment_s for iv in intervals)
    worst = connect + worst_s * max(iv.per_minute_pico for iv in intervals) // 60
    if worst > MAX_CHARGE_MICROS * PICO_PER_MICRO:
        errs.add(path, f"a {MAX_CALL_SECONDS} s call would cost more than the per-event maximum "
                       f"{format_micros(MAX_CHARGE_MICROS)}: prices too high")
    return Rate(prefix, tuple(intervals), connect)


def _validate(data: Any, source: str) -> Catalog:
    errs = _Errors()
    if not isinstance(data, dict):
        raise CatalogError(source, [f"(top): expected a YAML mapping, got {type(data).__name__}"])
    _unknown_keys(errs, "", data, _TOP_KEYS)
    version = data.get("version")
    if not isinstance(version, str) or not version:
        errs.add("version", f'expected a non-empty string like "2026-11-01", got {shown(version)}')
    elif len(version) > MAX_VERSION_CHARS or not version.isprintable():
        # written on every rated row, log line and `catalog reloaded` message
        errs.add("version", f"expected at most {MAX_VERSION_CHARS} printable characters like \"2026-11-01\", "
                            f"got {len(version)} characters{'' if version.isprintable() else ' with a control character'}")
    currency = data.get("currency")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency or ""):
        errs.add("currency", f"expected an ISO 4217 code like USD, got {shown(currency)}")

    # destinations
    dests: dict[str, Destination] = {}
    raw_dests = data.get("destinations")
    if not isinstance(raw_dests, list) or not raw_dests:
        errs.add("destinations", "expected a non-empty list of {prefix, country, class}")
        raw_dests = []
    for i, item in enumerate(raw_dests):
        path = f"destinations[{i}]"
        if not isinstance(item, dict):
            errs.add(path, f"expected a mapping, got {shown(item)}")
            continue
        _unknown_keys(errs, path, item, _DEST_KEYS)
        prefix, country, cls = item.get("prefix"), item.get("country"), item.get("class")
        ok = True
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            errs.add(f"{path}.prefix", f'expected a quoted string of 1..15 digits, got {shown(prefix)}')
            ok = False
        if not isinstance(country, str) or not _COUNTRY_RE.fullmatch(country):
            errs.add(f"{path}.country", f"expected an ISO 3166 alpha-2 code like GB, got {shown(country)}")
            ok = False
        if cls not in DEST_CLASSES:
            errs.add(f"{path}.class", f"expected one of {', '.join(DEST_CLASSES)}, got {shown(cls)}")
            ok = False
        if ok:
            assert isinstance(prefix, str) and isinstance(country, str) and isinstance(cls, str)
            if prefix in dests:
                errs.add(f"{path}.prefix", f"duplicate prefix {shown(prefix)} in destinations")
            dests[prefix] = Destination(prefix, country, cls)

    # zones
    zones: dict[str, frozenset[str]] = {}
    for name, members in _named(errs, "zones", _mapping(errs, "zones", data.get("zones"), required=False)):
        path = f"zones.{name}"
        if not isinstance(members, list) or not members or not all(
            isinstance(c, str) and _COUNTRY_RE.fullmatch(c) for c in members
        ):
            errs.add(path, f"expected a non-empty list of ISO alpha-2 country codes, got {shown(members)}")
            continue
        zones[name] = frozenset(members)

    # rate tables
    raw_rates: dict[str, dict[str, Rate]] = {}
    for name, items in _named(errs, "rate_tables", _mapping(errs, "rate_tables", data.get("rate_tables"))):
        path = f"rate_tables.{name}"
        if not isinstance(items, list) or not items:
            errs.add(path, "expected a non-empty list of rates")
            continue
        table: dict[str, Rate] = {}
        for i, item in enumerate(items):
            rate = _validate_rate(errs, f"{path}[{i}]", item)
            if rate is None:
                continue
            if rate.prefix in table:
                errs.add(f"{path}[{i}].prefix", f"duplicate prefix {shown(rate.prefix)} in rate table {shown(name)}")
            table[rate.prefix] = rate
        raw_rates[name] = table

    # packages
    packages: dict[str, Package] = {}
    for name, spec in _named(errs, "packages", _mapping(errs, "packages", data.get("packages"), required=False)):
        path = f"packages.{name}"
        if not isinstance(spec, dict):
            errs.add(path, f"expected a mapping, got {shown(spec)}")
            continue
        _unknown_keys(errs, path, spec, _PACKAGE_KEYS)
        countries_raw = spec.get("countries")
        countries: set[str] = set()
        if isinstance(countries_raw, str) and countries_raw.startswith("zone:"):
            zone = countries_raw[5:]
            if zone not in zones:
                errs.add(f"{path}.countries", f"unknown zone {shown(zone)} (zones: {', '.join(sorted(zones)) or 'none'})")
            countries = set(zones.get(zone, ()))
        elif isinstance(countries_raw, list) and countries_raw:
            for j, c in enumerate(countries_raw):
                if isinstance(c, str) and c.startswith("zone:"):
                    if c[5:] not in zones:
                        errs.add(f"{path}.countries[{j}]", f"unknown zone {shown(c[5:])}")
                    countries |= zones.get(c[5:], frozenset())
                elif isinstance(c, str) and _COUNTRY_RE.fullmatch(c):
                    countries.add(c)
                else:
                    errs.add(f"{path}.countries[{j}]", f"expected an ISO alpha-2 code or zone:NAME, got {shown(c)}")
        else:
            errs.add(f"{path}.countries", f"expected a list of countries or \"zone:NAME\", got {shown(countries_raw)}")
        classes_raw = spec.get("classes")
        classes: set[str] = set()
        if not isinstance(classes_raw, list) or not classes_raw:
            errs.add(f"{path}.classes", f"expected a non-empty list of classes, got {shown(classes_raw)}")
        else:
            for j, c in enumerate(classes_raw):
                if isinstance(c, str) and c in NEVER_COVERED:
                    errs.add(f"{path}.classes[{j}]", f"class {shown(c)} is never covered by a package")
                elif not isinstance(c, str) or c not in DEST_CLASSES:
                    errs.add(f"{path}.classes[{j}]", f"expected fixed or mobile, got {shown(c)}")
                else:
                    classes.add(c)
        scope = spec.get("scope")
        if "scope" not in spec:  # no default: SPEC lists it as required, and a guess changes coverage
            errs.add(f"{path}.scope", "missing: domestic (calls to the account's home country only) or international")
        elif scope not in SCOPES:
            errs.add(f"{path}.scope", f"expected domestic or international, got {shown(scope)}")
        minutes: Any = spec.get("minutes")
        fair: Any = spec.get("fair_use_minutes")
        allowance_s: int | None = None
        fair_s: int | None = None
        if minutes == "unlimited":
            if fair is None:  # SPEC rule 4: an unlimited package covers calls until its fair use is used up
                errs.add(f"{path}.fair_use_minutes", "missing: an unlimited package needs its fair-use limit "
                                                     "(minutes per period covered before calls are charged)")
            elif not _pos_int(fair):
                errs.add(f"{path}.fair_use_minutes", f"expected a positive integer, got {shown(fair)}")
            fair_s = int(fair) * 60 if _pos_int(fair) else None
        elif _pos_int(minutes):
            allowance_s = int(minutes) * 60
            if fair is not None:
                errs.add(f"{path}.fair_use_minutes", "only unlimited packages have a fair-use limit")
        else:
            errs.add(f"{path}.minutes", f"expected a positive integer or \"unlimited\", got {shown(minutes)}")
        packages[name] = Package(name, frozenset(countries), frozenset(classes), scope if isinstance(scope, str) else "",
                                 allowance_s, fair_s)

    # plans
    plans: dict[str, Plan] = {}
    raw_plans = _mapping(errs, "plans", data.get("plans"))
    if not raw_plans and isinstance(data.get("plans"), dict):
        errs.add("plans", "at least one plan is needed")
    for name, spec in _named(errs, "plans", raw_plans):
        path = f"plans.{name}"
        if not isinstance(spec, dict):
            errs.add(path, f"expected a mapping, got {shown(spec)}")
            continue
        _unknown_keys(errs, path, spec, _PLAN_KEYS)
        billing = spec.get("billing", "prepaid")
        if billing not in BILLING_MODES:
            errs.add(f"{path}.billing", f"expected prepaid or postpaid, got {shown(billing)}")
        table_name = _reference(errs, f"{path}.rate_table", spec.get("rate_table"), "rate table", raw_rates)
        inbound_raw = spec.get("inbound_rate_table")
        inbound = None
        if inbound_raw is not None:
            inbound = _reference(errs, f"{path}.inbound_rate_table", inbound_raw, "rate table", raw_rates)
        pkgs_raw = spec.get("packages", []) or []
        if not isinstance(pkgs_raw, list):
            errs.add(f"{path}.packages", f"expected a list of package names, got {shown(pkgs_raw)}")
            pkgs_raw = []
        pkgs: list[str] = []
        for j, p in enumerate(pkgs_raw):
            pkg_name = _reference(errs, f"{path}.packages[{j}]", p, "package", packages)
            if pkg_name is not None and pkg_name in pkgs:
                errs.add(f"{path}.packages[{j}]", f"lists package {shown(pkg_name)} twice")
            elif pkg_name is not None:
                pkgs.append(pkg_name)
        # No default: a plan without SMS prices would rate every SMS free. "0" says so.
        sms: dict[str, Any] = {}
        if "sms" not in spec:
            errs.add(f"{path}.sms", 'missing: SMS prices per segment, e.g. {outbound: "0.0075", inbound: "0"} ("0": free)')
        else:
            sms = _mapping(errs, f"{path}.sms", spec["sms"])
            for direction in ("outbound", "inbound"):
                if sms and direction not in sms:
                    errs.add(f"{path}.sms.{direction}", 'missing: a price per segment like "0.0075" ("0": free)')
        _unknown_keys(errs, f"{path}.sms", sms, {"outbound", "inbound"})
        sms_out = _price(errs, f"{path}.sms.outbound", sms.get("outbound", "0"))
        sms_in = _price(errs, f"{path}.sms.inbound", sms.get("inbound", "0"))
        for direction, price in (("outbound", sms_out), ("inbound", sms_in)):
            if price * MAX_SMS_SEGMENTS > MAX_CHARGE_MICROS * PICO_PER_MICRO:
                errs.add(f"{path}.sms.{direction}", f"{MAX_SMS_SEGMENTS} segments would cost more than the "
                                                    f"per-event maximum {format_micros(MAX_CHARGE_MICROS)}")
        meters = {
            str(m): _price(errs, f"{path}.meters.{m}", v)
            for m, v in _mapping(errs, f"{path}.meters", spec.get("meters"), required=False).items()
        }
        for m in meters:
            if not _NAME_RE.fullmatch(m):
                errs.add(f"{path}.meters.{m}", "meter names may use letters, digits and _ . : - (1..64 chars)")
        allow_premium = spec.get("allow_premium", True)
        if not isinstance(allow_premium, bool):
            errs.add(f"{path}.allow_premium", f"expected true or false, got {shown(allow_premium)}")
        fee = _price(errs, f"{path}.monthly_fee", spec.get("monthly_fee", "0"))
        if fee > MAX_CHARGE_MICROS * PICO_PER_MICRO:  # charged to the wallet like one event's charge
            errs.add(f"{path}.monthly_fee", f"at most {format_micros(MAX_CHARGE_MICROS)}, got "
                                            f"{shown(spec.get('monthly_fee'))}")
        plans[name] = Plan(
            plan_id=name,
            monthly_fee_pico=fee,
            billing=billing if isinstance(billing, str) else "",
            rate_table=table_name or "",
            inbound_rate_table=inbound,
            packages=tuple(pkgs),
            sms_outbound_pico=sms_out,
            sms_inbound_pico=sms_in,
            meters_pico=meters,
            allow_premium=bool(allow_premium),
        )
    for section, names in (("zones", zones), ("rate_tables", raw_rates), ("packages", packages), ("plans", plans)):
        for name in names:
            if not _NAME_RE.fullmatch(name):
                errs.add(f"{section}.{name}", "names may use letters, digits and _ . : - (1..64 chars)")
    if errs.items:
        raise CatalogError(source, errs.items)
    return Catalog(
        version=str(version),
        currency=str(currency),
        destinations=PrefixTable(dests),
        zones=zones,
        rate_tables={name: PrefixTable(t) for name, t in raw_rates.items()},
        packages=packages,
        plans=plans,
        source=source,
        raw_rates=raw_rates,
    )


def parse_catalog(data: Any, source: str = "<memory>") -> Catalog:
    """Validate an already-parsed YAML/JSON document and compile it."""
    return _validate(data, source)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; raises CatalogError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(str(p), [f"(file): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise CatalogError(str(p), [f"(file): not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = parse_yaml(text, str(p))
    except YAMLError as exc:
        raise CatalogError(str(p), [f"(yaml): {exc}"]) from None
    return _validate(data, str(p))


def summarize(catalog: Catalog) -> Iterable[str]:
    """Lines for `metering catalog check`: what the catalog holds and covers."""
    from collections import Counter

    dests = catalog.destinations._by_prefix
    yield f"catalog {catalog.version} ({catalog.currency}) from {catalog.source}"
    by_class = Counter(d.dest_class for d in dests.values())
    countries = sorted({d.country for d in dests.values()})
    yield (
        f"destinations: {len(dests)} prefixes in {len(countries)} countries ("
        + ", ".join(f"{c} {by_class[c]}" for c in DEST_CLASSES)
        + ")"
    )
    known = set(countries)

    def unreachable(members: Iterable[str]) -> str:
        # a typo (UK for GB) or a country whose destinations are not loaded yet: never matched
        missing = sorted(set(members) - known)
        return f"; warning: no destination in {', '.join(missing)}" if missing else ""

    for name, members in sorted(catalog.zones.items()):
        yield f"zone {name}: {', '.join(sorted(members))}{unreachable(members)}"
    for name, table in sorted(catalog.rate_tables.items()):
        rates = catalog.raw_rates[name].values()
        with_intervals = sum(1 for r in rates if len({iv.per_minute_pico for iv in r.intervals}) > 1 or len(r.intervals) > 2)
        unrated = sorted({d.country for p, d in dests.items() if table.lookup(p) is None})
        line = f"rate table {name}: {len(table)} prefixes, {with_intervals} with rate intervals"
        if unrated:
            line += f"; no rate for some prefixes of {', '.join(unrated)}"
        yield line
    for name, pkg in sorted(catalog.packages.items()):
        size = "unlimited" if pkg.unlimited else f"{(pkg.allowance_s or 0) // 60} min"
        if pkg.unlimited and pkg.fair_use_s:
            size += f" (fair use {pkg.fair_use_s // 60} min)"
        yield (
            f"package {name}: {size}, {pkg.scope}, classes {', '.join(sorted(pkg.classes))}, "
            f"covers {', '.join(sorted(pkg.countries))}{unreachable(pkg.countries)}"
        )
    for name, plan in sorted(catalog.plans.items()):
        yield (
            f"plan {name}: {plan.billing}, rates {plan.rate_table}, inbound "
            f"{plan.inbound_rate_table or 'free'}, packages [{', '.join(plan.packages)}], "
            f"meters [{', '.join(sorted(plan.meters_pico))}], premium {'allowed' if plan.allow_premium else 'refused'}"
        )
