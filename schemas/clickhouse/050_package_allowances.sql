-- package_allowances: package sizes from the tariff catalog, so that v_package_usage can show
-- the minutes remaining. The pipeline writes every package of each catalog it loads
-- (ClickHouseSink.replace_package_allowances). History is kept: the row loaded last for a
-- package_id is the current one (the view picks it with argMax over loaded_at), so a package
-- removed from the catalog keeps its last known size for past usage.
-- minutes NULL = unlimited (then fair_use_minutes caps it); both are whole minutes.
CREATE TABLE IF NOT EXISTS {database}.package_allowances
(
    package_id       String,
    minutes          Nullable(UInt32),
    fair_use_minutes Nullable(UInt32),
    catalog_version  String,
    loaded_at        DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (package_id, catalog_version);
