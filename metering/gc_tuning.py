"""Python's cyclic garbage collector, tuned for the batch loops (`run`, `worker`, `rate`).

Each 5 000-event batch allocates hundreds of thousands of short-lived containers (decoded
events, row tuples, Redis and ClickHouse arguments). With CPython's default thresholds
(700, 10, 10) that is hundreds of young collections per batch, and every hundredth of them
a full one that walks every long-lived object again: the catalog's routes, 10 000 accounts,
the loaded libraries. `benchmarks/bench_pipeline.py --phase 1` spent about a third of the
pipeline thread's CPU there (README, Benchmarks). Freezing what exists after start-up takes
it out of every collection; a young generation of 50 000 allocations makes collections rare.
Cycles are still collected (the engine creates few: its rows are tuples of atomic values).
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
GEN1_THRESHOLD = 50
GEN2_THRESHOLD = 1_000


def tune_for_batches() -> None:
    """Collect once, freeze the survivors (start-up state) and raise the thresholds. Call once
    the worker has loaded its catalog and accounts, before its loop."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
