-- rated_usage: one row per *rated* usage event (status "rated" only; rejected events live in
-- rejected_events, and a duplicate delivery is not usage).
--
-- Why ReplacingMergeTree and FINAL (replays must never double count):
-- The pipeline delivers to ClickHouse at least once: after a crash it re-inserts whatever it had
-- written but not yet committed in Kafka, and operators may replay a topic. So the same
-- (account_id, event_id) can arrive several times. The table is a ReplacingMergeTree keyed on
-- ORDER BY (account_id, event_id): rows with the same key collapse to one, the one with the
-- highest rated_at (the version column); on equal rated_at the last inserted wins. A corrected
-- row (a re-rate) therefore replaces the old one.
--
-- Collapsing happens only in background merges, at an unknown time, possibly never. Query
-- results must not depend on that: every analyst view reads `FROM rated_usage FINAL`, which
-- collapses duplicates at read time. Analysts querying the table directly must do the same
-- (`SELECT ... FROM metering.rated_usage FINAL`) or aggregate with argMax / `LIMIT 1 BY
-- account_id, event_id`. A row's period_start is derived from the event's own timestamp, so all
-- versions of one event land in the same partition; FINAL also merges across partitions unless
-- a profile sets do_not_merge_across_partitions_select_final = 1 (do not set it here).
--
-- Why not insert deduplication tokens: non-replicated MergeTree (a single server, chDB) does not
-- deduplicate inserts by default (non_replicated_deduplication_window = 0), and block dedup on
-- replicated tables only catches byte-identical retries inside a window. Worse, a reused
-- insert_deduplication_token silently drops a *different* batch that happens to get the same
-- token (e.g. after re-batching on replay), losing rows with no error. Correctness therefore
-- rests on the table key plus FINAL, never on insert dedup.
--
-- Money: Decimal(18, 6) = exact micros of the account currency (the engine's integer micros
-- divided by 10^6; never a float). Timestamps: DateTime64(3, 'UTC').
CREATE TABLE IF NOT EXISTS {database}.rated_usage
(
    event_id          String,
    account_id        String,
    kind              LowCardinality(String),              -- call | sms | meter
    direction         LowCardinality(Nullable(String)),    -- outbound | inbound; NULL for meters
    `from`            Nullable(String),                    -- E.164; NULL for meters
    `to`              Nullable(String),                    -- E.164; NULL for meters
    meter             LowCardinality(Nullable(String)),    -- meter name; NULL for calls and sms
    quantity          Nullable(Decimal(18, 6)),            -- sms: segments; meter: quantity; NULL for calls
    country           LowCardinality(Nullable(String)),    -- destination country; NULL for meters
    dest_class        LowCardinality(Nullable(String)),    -- fixed | mobile | premium | tollfree ...
    billable_s        UInt32,
    covered_s         UInt32,                              -- seconds taken from a package allowance
    charged_s         UInt32,                              -- billable_s = covered_s + charged_s
    package_id        LowCardinality(Nullable(String)),    -- NULL when no package applied
    fair_use_exceeded Bool,
    charge            Decimal(18, 6),
    balance_after     Nullable(Decimal(18, 6)),            -- NULL when no wallet balance was applied
    started_at        DateTime64(3, 'UTC'),                -- call started_at / sms sent_at / meter at
    period_start      Date,                                -- first day of the account's billing period
    plan_id           LowCardinality(String),
    catalog_version   LowCardinality(String),
    rated_at          DateTime64(3, 'UTC'),                -- when the sink wrote it; the version column
    source_topic      LowCardinality(String),              -- lineage: the Kafka message rated
    source_partition  UInt32,
    source_offset     UInt64
)
ENGINE = ReplacingMergeTree(rated_at)
PARTITION BY toYYYYMM(period_start)
ORDER BY (account_id, event_id);
