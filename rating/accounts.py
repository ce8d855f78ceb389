"""Accounts: who is rated on which plan, with which wallet settings (SPEC accounts.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rating.catalog import BILLING_MODES, Catalog, name_text
from rating.money import MAX_CHARGE_MICROS, MoneyError, format_micros, parse_micros
from rating.shown import shown
from rating.yaml_text import YAMLError, parse_yaml

_ACCOUNT_KEYS = {
    "id", "plan", "home_country", "billing", "balance", "period_anchor_day", "auto_topup",
    "low_balance_alert", "credit_limit",
}


class AccountsError(ValueError):
    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{source}: accounts refused, {len(errors)} error(s):\n{lines}")


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    plan_id: str
    home_country: str
    billing: str  # prepaid | postpaid
    balance: int  # opening balance, micros
    period_anchor_day: int  # 1..28, UTC
    topup_threshold: int | None = None  # micros
    topup_amount: int | None = None  # micros
    low_balance_alert: int | None = None  # micros
    credit_limit: int | None = None  # micros, postpaid: block once owed amount passes it


def _money(errors: list[str], path: str, value: Any, *, allow_negative: bool = True) -> int | None:
    if value is None:
        return None
    if isinstance(value, float):
        errors.append(f'{path}: money must be a quoted decimal string like "10.00", got the float {shown(value)}')
        return None
    try:
        micros = parse_micros(value, allow_negative=allow_negative)
    except MoneyError as exc:
        errors.append(f"{path}: {exc}")
        return None
    if abs(micros) > MAX_CHARGE_MICROS:  # the same bound as one event's charge
        errors.append(f"{path}: at most {format_micros(MAX_CHARGE_MICROS)} in magnitude, got {shown(value)} "
                      "(Redis scripts are exact below 2^53 micros, ClickHouse Decimal(18, 6) below 1e12)")
        return None
    return micros


def parse_accounts(data: Any, catalog: Catalog, source: str = "<memory>") -> dict[str, Account]:
    items = data.get("accounts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise AccountsError(source, ["(top): expected a list of accounts (or a mapping with key accounts)"])
    errors: list[str] = []
    if isinstance(data, dict):
        errors += [f"{key}: unknown key (the file holds `accounts:` only)" for key in data if key != "accounts"]
    accounts: dict[str, Account] = {}
    seen_ids: set[str] = set()
    for i, item in enumerate(items):
        path = f"accounts[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{path}: expected a mapping, got {shown(item)}")
            continue
        for key in item:
            if key not in _ACCOUNT_KEYS:
                errors.append(f"{path}.{key}: unknown key (allowed: {', '.join(sorted(_ACCOUNT_KEYS))})")
        acc_id = item.get("id")
        if not isinstance(acc_id, str) or not 1 <= len(acc_id) <= 128:
            errors.append(f"{path}.id: expected a string of 1..128 chars, got {shown(acc_id)}")
            acc_id = None  # check the rest all the same: every error is listed
        else:
            path = f"accounts[{i}] ({acc_id})"
            if acc_id in seen_ids:
                errors.append(f"{path}.id: duplicate account id")
            seen_ids.add(acc_id)
        plan_id = name_text(item.get("plan"))  # `plan: 2026` is plan "2026", as in the catalog
        plan = None if plan_id is None else catalog.plans.get(plan_id)
        if "plan" not in item or item["plan"] is None:
            errors.append(f"{path}.plan: missing (plans: {', '.join(sorted(catalog.plans))})")
        elif plan_id is None:
            errors.append(f"{path}.plan: expected a plan name, got {shown(item.get('plan'))} "
                          f"(plans: {', '.join(sorted(catalog.plans))})")
        elif plan is None:
            errors.append(f"{path}.plan: unknown plan {shown(plan_id)} (plans: {', '.join(sorted(catalog.plans))})")
        home = item.get("home_country")
        if not isinstance(home, str) or not re.fullmatch(r"[A-Z]{2}", home):
            errors.append(f"{path}.home_country: expected an ISO alpha-2 code, got {shown(home)}")
        billing = item.get("billing", plan.billing if plan else "prepaid")
        if billing not in BILLING_MODES:
            errors.append(f"{path}.billing: expected prepaid or postpaid, got {shown(billing)}")
        anchor = item.get("period_anchor_day", 1)
        if not isinstance(anchor, int) or isinstance(anchor, bool) or not 1 <= anchor <= 28:
            errors.append(f"{path}.period_anchor_day: expected an integer 1..28, got {shown(anchor)}")
        balance = _money(errors, f"{path}.balance", item.get("balance", "0"))
        topup = item.get("auto_topup")
        threshold = amount = None
        if topup is not None:
            if not isinstance(topup, dict) or set(topup) != {"threshold", "amount"}:
                errors.append(f"{path}.auto_topup: expected {{threshold, amount}} or null, got {shown(topup)}")
            else:
                for key in ("threshold", "amount"):
                    if topup[key] is None:
                        errors.append(f'{path}.auto_topup.{key}: missing (a decimal string like "10.00"; '
                                      "no auto top-up: auto_topup: null)")
                threshold = _money(errors, f"{path}.auto_topup.threshold", topup["threshold"])
                amount = _money(errors, f"{path}.auto_topup.amount", topup["amount"], allow_negative=False)
                if amount == 0:
                    errors.append(f"{path}.auto_topup.amount: must be > 0")
        alert = _money(errors, f"{path}.low_balance_alert", item.get("low_balance_alert"))
        limit = _money(errors, f"{path}.credit_limit", item.get("credit_limit"), allow_negative=False)
        if errors or acc_id is None:  # keep checking the rest: every error is listed
            continue
        accounts[acc_id] = Account(
            account_id=acc_id,
            plan_id=str(plan_id),
            home_country=str(home),
            billing=str(billing),
            balance=balance or 0,
            period_anchor_day=int(anchor),
            topup_threshold=threshold,
            topup_amount=amount,
            low_balance_alert=alert,
            credit_limit=limit,
        )
    if errors:
        raise AccountsError(source, errors)
    return accounts


def load_accounts(path: str | Path, catalog: Catalog) -> dict[str, Account]:
    p = Path(path)
    try:
        data = parse_yaml(p.read_text(encoding="utf-8"), str(p))
    except OSError as exc:
        raise AccountsError(str(p), [f"(file): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise AccountsError(str(p), [f"(file): not UTF-8 text (byte {exc.start})"]) from None
    except YAMLError as exc:
        raise AccountsError(str(p), [f"(yaml): {exc}"]) from None
    return parse_accounts(data, catalog, str(p))
