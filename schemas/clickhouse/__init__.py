"""ClickHouse DDL (applied in file-name order by metering.storage.clickhouse_sink.ClickHouseSink).

A package only so that the *.sql files ship with the wheel (pyproject package-data) and can be
found with importlib.resources.
"""
