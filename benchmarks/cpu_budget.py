"""CPU time per component while a benchmark phase runs: where each event's CPU goes on this box.

On a shared VM, events/s moves with the host's load; CPU seconds per event move much less, and
they tell what a throughput target needs: with every component on one box, events/s can never
exceed `cores / (CPU seconds per event, all components summed)`.

Components (read from /proc and Redis's INFO, before and after the phase):
  * this process, its threads grouped by name: Python threads keep the process's name (the
    pipeline and writer threads, the GIL holders), librdkafka names its threads "rdk:*", and
    every other named thread is chDB's embedded ClickHouse engine (ThreadPool, MergeMutate,
    QueryPipelineEx, ...);
  * Redis: `used_cpu_user + used_cpu_sys` from its INFO (its Lua scripts run there);
  * the Kafka broker: the JVM whose pid `deploy/local/services.sh` wrote, when it runs here;
  * the whole box: busy share of all cores from /proc/stat, to show whether the phase was
    bound by CPU (near 100 %) or by waiting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(stat_text: str) -> tuple[str, float]:
    """(thread or process name, user + system CPU seconds) from a /proc/.../stat line."""
    name = stat_text[stat_text.index("(") + 1 : stat_text.rindex(")")]
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    return name, (int(rest[11]) + int(rest[12])) / _TICK  # utime, stime (fields 14, 15)


def thread_groups(pid: int | str = "self") -> dict[str, float]:
    """CPU seconds of a process's threads, grouped as the module doc says."""
    own_name = _stat_cpu(Path(f"/proc/{pid}/stat").read_text())[0]
    groups = {"python": 0.0, "librdkafka": 0.0, "chdb": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, cpu = _stat_cpu((task / "stat").read_text())
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
        group = "python" if name == own_name else "librdkafka" if name.startswith("rdk:") else "chdb"
        groups[group] += cpu
    return groups


def process_cpu(pid: int) -> float | None:
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())[1]
    except (OSError, ValueError):
        return None


def box_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - idle) / _TICK, total / _TICK


def local_kafka_pid(state_dir: Path) -> int | None:
    """The broker `deploy/local/services.sh` started (its pid file), if it is alive here."""
    try:
        pid = int((state_dir / "kafka" / "kafka.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"kafka" in cmdline else None


@dataclass
class Snapshot:
    threads: dict[str, float]
    redis: float | None
    kafka: float | None
    box: tuple[float, float]


def snapshot(redis_client: Any, kafka_pid: int | None) -> Snapshot:
    try:
        info = redis_client.info("cpu")
        redis = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:  # noqa: BLE001 - a figure missing from the report, not a failed benchmark
        redis = None
    return Snapshot(thread_groups(), redis, None if kafka_pid is None else process_cpu(kafka_pid), box_cpu())


def per_event_us(before: Snapshot, after: Snapshot, events: int, extra: dict[str, float] | None = None) -> dict[str, Any]:
    """Microseconds of CPU per event for each component between two snapshots, their total,
    the ceiling it implies on this box's cores, and how busy the box was. `extra`: CPU seconds
    of other processes measured by the caller (e.g. the load generator)."""
    n = max(events, 1)
    us: dict[str, float] = {}
    for group, cpu in after.threads.items():
        us[f"process: {group}"] = (cpu - before.threads.get(group, 0.0)) / n * 1e6
    if before.redis is not None and after.redis is not None:
        us["redis"] = (after.redis - before.redis) / n * 1e6
    if before.kafka is not None and after.kafka is not None:
        us["kafka broker"] = (after.kafka - before.kafka) / n * 1e6
    for name, cpu in (extra or {}).items():
        us[name] = cpu / n * 1e6
    total = sum(us.values())
    cores = os.cpu_count() or 1
    busy = after.box[0] - before.box[0]
    span = after.box[1] - before.box[1]
    return {"us_per_event": us, "total_us": total, "cores": cores,
            "ceiling_events_per_s": cores * 1e6 / total if total > 0 else float("inf"),
            "box_busy": busy / span if span > 0 else 0.0}


def report_lines(budget: dict[str, Any], label: str) -> list[str]:
    """The budget as report lines (two-space indent, like the benchmarks' tables)."""
    parts = " | ".join(f"{k} {v:.1f}" for k, v in budget["us_per_event"].items())
    return [
        f"  CPU per event while {label} (us)",
        f"    {parts}",
        f"    total {budget['total_us']:.1f} us/event; {budget['cores']} cores at that cost allow at most "
        f"{budget['ceiling_events_per_s']:,.0f} events/s; box busy {budget['box_busy'] * 100:.0f} % meanwhile",
    ]
