"""CPU instructions per event of decode + rate, counted by valgrind's callgrind: the same
number on every run, however busy the box is (events/s here varies by +-20 % between runs).

    python benchmarks/rating_instructions.py --count 60000

Runs this file twice under callgrind, once setting up only and once setting up and rating
`--count` events of the bench_rating stream (10 000 accounts, example catalog, memory store);
the difference divided by the count is the engine's cost per event. Slow (~1 min for 60 000).
"""

from __future__ import annotations

import argparse
import pickle
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rating import ROOT, accounts_10k  # noqa: E402

from metering.traffic import generate_events, load_accounts_list, load_catalog_dict  # noqa: E402
from rating.accounts import parse_accounts  # noqa: E402
from rating.catalog import load_catalog  # noqa: E402
from rating.engine import Rater  # noqa: E402
from rating.wallet import MemoryWalletStore  # noqa: E402

NOW = datetime(2026, 11, 23, tzinfo=UTC)
CATALOG = ROOT / "deploy/examples/catalog.yaml"
ACCOUNTS = ROOT / "deploy/examples/accounts.yaml"


def rate(values_file: str, count: int) -> None:
    """The measured child: set up, then rate the first `count` events in batches of 5000."""
    catalog = load_catalog(CATALOG)
    accounts = parse_accounts({"accounts": accounts_10k(load_accounts_list(ACCOUNTS))}, catalog)
    with open(values_file, "rb") as f:
        values = pickle.load(f)
    rater = Rater(catalog, accounts, MemoryWalletStore(accounts))
    items = [(v, f"0:{i}") for i, v in enumerate(values)]
    for i in range(0, count, 5000):
        rater.rate_batch(items[i:min(i + 5000, count)], NOW)


def instructions(values_file: str, count: int) -> int:
    with tempfile.NamedTemporaryFile(suffix=".callgrind") as out:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", sys.executable,
             __file__, "--_child", values_file, "--count", str(count)],
            capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if not found:
        raise SystemExit(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=60_000)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        rate(args._child, args.count)
        return
    values = [v for _, v in generate_events(load_catalog_dict(CATALOG), accounts_10k(load_accounts_list(ACCOUNTS)),
                                            count=args.count, seed=42, start=NOW - timedelta(days=2),
                                            duplicate_rate=0.01, malformed_rate=0.005, now=NOW)]
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        pickle.dump(values, f)
        f.flush()
        print(f"counting instructions (callgrind) for set-up only, then set-up + {args.count:,} events ...",
              file=sys.stderr)
        base = instructions(f.name, 0)
        full = instructions(f.name, args.count)
    print(f"decode + rate: {(full - base) / args.count:,.0f} instructions per event "
          f"({args.count:,} events, set-up {base / 1e9:.2f} G instructions excluded)")


if __name__ == "__main__":
    main()
