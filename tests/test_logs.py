"""Structured logs: librdkafka's repeated lines are held back, not dropped silently."""

from __future__ import annotations

import logging

from metering.kafka_io import LOG as KAFKA_LOG
from metering.logs import RepeatFilter


def test_repeated_lines_pass_once_per_window_and_say_how_many_were_held_back() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=30, clock=lambda: now[0])

    def record(text: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("metering.kafka", logging.WARNING, __file__, 1, text, args, None)

    # confluent-kafka logs "%s [%s] %s" with the facility, client and message as arguments
    shown = [r for i in range(100) if f.filter(r := record(
        "%s [%s] %s", "FAIL", f"rdkafka#producer-{i % 3}", f"127.0.0.1:{19092 + i % 2}/1: Connect failed"))]
    assert len(shown) == 1
    other = record("%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", "Timed out")
    assert f.filter(other)  # another kind of line is not held back
    now[0] = 31.0
    again = record("%s [%s] %s", "FAIL", "rdkafka#producer-1", "127.0.0.1:19092/1: Connect failed")
    assert f.filter(again)
    assert again.getMessage().endswith("(and 99 more like it held back)")
    assert any(isinstance(x, RepeatFilter) for x in KAFKA_LOG.filters)  # installed on librdkafka's logger
