"""`metering simulate`: realistic CDR traffic into `usage.events` with confluent-kafka."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from metering import kafka_io
from metering.config import Settings
from metering.traffic import generate_events, load_accounts_list, load_catalog_dict


def produce_traffic(settings: Settings, *, count: int, per_second: float = 0, seed: int = 1,
                    duplicate_rate: float = 0.0, malformed_rate: float = 0.0,
                    start: datetime | None = None, progress: bool = False,
                    on_sent: Callable[[int], None] | None = None,
                    stop: threading.Event | None = None,
                    gate: Callable[[str, bytes], bool] | None = None,
                    progress_every_s: float = 0) -> int:
    """Produce `count` events (keyed by account) at about `per_second` (0: flat out).
    `gate(account_id, value)` False: the attempt is refused (the demo's dialer refusing a
    blocked wallet's outbound call) and never produced; it still counts towards `count`.
    `progress`: a running count on stderr (a terminal); `progress_every_s` > 0: a progress line
    on stderr that often instead (a log). Returns the number produced."""
    now = datetime.now(UTC)
    start = start or now - timedelta(hours=2)
    catalog = load_catalog_dict(settings.catalog_path)
    accounts = load_accounts_list(settings.accounts_path)
    producer = kafka_io.make_producer(settings)
    delivery = kafka_io.DeliveryCheck()
    topic = settings.topics.events
    began = time.monotonic()
    next_line = began + progress_every_s
    sent = attempts = 0
    for key, value in generate_events(catalog, accounts, count=count, seed=seed, start=start,
                                      duplicate_rate=duplicate_rate, malformed_rate=malformed_rate,
                                      now=now):
        attempts += 1
        if gate is not None and not gate(key, value):
            continue
        kafka_io.produce(producer, topic, value, key.encode(), delivery)
        sent += 1
        if sent % 1000 == 0:
            producer.poll(0)
            if on_sent:
                on_sent(sent)
            if stop is not None and stop.is_set():
                break
            if per_second > 0:
                ahead = attempts / per_second - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
            if progress and sent % 20000 == 0:
                rate = sent / max(time.monotonic() - began, 1e-9)
                print(f"\rproduced {sent}/{count} ({rate:,.0f}/s)", end="", file=sys.stderr)
            elif progress_every_s > 0 and (t := time.monotonic()) >= next_line:
                next_line = t + progress_every_s
                print(f"progress: produced {sent} of {count} events ({sent / max(t - began, 1e-9):,.0f}/s)",
                      file=sys.stderr, flush=True)
    kafka_io.flush(producer)
    delivery.raise_if_failed()
    if progress:
        print(file=sys.stderr)
    if on_sent:
        on_sent(sent)
    return sent
