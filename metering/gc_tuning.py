"""Python's cyclic garbage collector, tuned for the batch loops (`run`, `worker`, `rate`).

Each batch allocates many short-lived containers (decoded events, row tuples, Redis and
ClickHouse arguments). With CPython's default thresholds (700, 10, 10) a young collection
runs every 700 net allocations, and every hundredth one is a full collection that walks
every long-lived object again: the catalog's routes, the accounts, the loaded libraries. A
py-spy profile of `benchmarks/bench_pipeline.py --phase 1` put 27 % of the pipeline thread's
samples there (README, Benchmarks). Freezing what exists after start-up takes it out of
every collection; a young generation of 50 000 allocations makes collections rare. Cycles
are still collected, only later.
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
