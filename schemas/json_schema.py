"""JSON Schemas (draft 2020-12) of every JSON message the product reads or writes, generated
from the msgspec types so they cannot drift from what the code accepts and emits.

    python -m schemas.json_schema --write   # regenerate schemas/json/*.schema.json
    python -m schemas.json_schema --check   # exit 1 if the committed files are stale

Switch vendors validate CDRs against `usage_event`; consumers of the topics and of
`metering rate` against the others. What a schema cannot say, the engine checks: a timestamp's
offset (`format: date-time` is an annotation most validators skip), `future_timestamp`, and
whether account, destination, rate and meter exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import UsageEvent
from schemas.messages import (
    MovementOut,
    Notification,
    OfflineLine,
    OfflineWalletEvent,
    WalletEventOut,
)

DIR = Path(__file__).resolve().parent / "json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# file stem -> (type, title, what it is)
MESSAGES: dict[str, tuple[Any, str, str]] = {
    "usage_event": (UsageEvent, "Usage event",
                    "A CDR on usage.events (key = account_id): a call, an SMS or a meter reading."),
    "rated_line": (OfflineLine, "Rated line",
                   "One `metering rate` output line per input event, in input order."),
    "offline_wallet_event": (OfflineWalletEvent, "Wallet event (offline)",
                             "One `metering rate --wallet-events` line."),
    "wallet_event": (WalletEventOut, "Wallet event",
                     "A message on wallet.events (key = account_id)."),
    "wallet_movement": (MovementOut, "Wallet movement",
                        "An operator credit, top-up or adjustment on wallet.movements (key = account_id)."),
    "notification": (Notification, "Notification",
                     "A customer notification on notifications (key = account_id), from `metering worker alerts`."),
}


def schema_of(name: str) -> dict[str, Any]:
    tp, title, description = MESSAGES[name]
    body = msgspec.json.schema(tp)
    head = {"$schema": DRAFT, "title": title, "description": description}
    if "$ref" in body and len(body) == 2:  # a single struct: inline its definition at the top
        ref = body["$ref"].rsplit("/", 1)[1]
        defs = body["$defs"]
        top = defs.pop(ref)
        top.pop("title", None)
        top.pop("description", None)
        return {**head, **top, **({"$defs": defs} if defs else {})}
    return {**head, **body}


def rendered(name: str) -> str:
    return json.dumps(schema_of(name), indent=2) + "\n"


def is_current(name: str) -> bool:
    """The committed file says what the types say (compared as data: layout does not count)."""
    path = DIR / f"{name}.schema.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")) == schema_of(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the files")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file is missing or stale")
    args = ap.parse_args()
    stale = []
    for name in MESSAGES:
        path = DIR / f"{name}.schema.json"
        if args.write:
            DIR.mkdir(exist_ok=True)
            path.write_text(rendered(name), encoding="utf-8")
        elif not is_current(name):
            stale.append(str(path))
    if stale:
        print("stale JSON Schemas (run python -m schemas.json_schema --write):", *stale, sep="\n  ",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
