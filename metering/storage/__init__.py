"""Storage sinks: where rated usage, wallet movements and rejects are written for analysts."""

from metering.storage.clickhouse_sink import ClickHouseSink, PackageAllowance

__all__ = ["ClickHouseSink", "PackageAllowance"]
