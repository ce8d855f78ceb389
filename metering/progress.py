"""One progress line from a worker's /metrics (the demo prints it every few seconds)."""

from __future__ import annotations

import contextlib
import sys
import urllib.request


def line(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    for raw in text.splitlines():
        if not raw or raw.startswith("#"):
            continue
        name, _, value = raw.rpartition(" ")
        base = name.split("{", 1)[0]
        sums[base] = sums.get(base, 0.0) + float(value)

    def g(key: str) -> int:
        return int(sums.get(key, 0.0))

    return (f"consumed {g('metering_consumed_total'):>9}  rated {g('metering_rated_total'):>9}  "
            f"rejected {g('metering_rejected_total'):>6}  duplicates {g('metering_duplicates_total'):>6}  "
            f"lag {g('metering_consumer_lag'):>7}  blocked {g('metering_wallets_blocked_total'):>4}  "
            f"top-ups requested {g('metering_topups_requested_total'):>4}")


if __name__ == "__main__":
    with contextlib.suppress(OSError):
        print(line(int(sys.argv[1])), flush=True)
