-- rejected_events: input that could not be rated (SPEC "Input events"), with the original
-- message bytes. One row per Kafka message: the key is its position (topic, partition, offset),
-- so a replay of the same message replaces rather than duplicates. Read with FINAL.
-- Not partitioned: `at` is the rejection time, which differs between replays of one message.
CREATE TABLE IF NOT EXISTS {database}.rejected_events
(
    raw         String,                    -- original message bytes, unmodified (may be invalid UTF-8)
    reason      LowCardinality(String),    -- invalid_json | invalid_field | unknown_kind | ...
    detail      Nullable(String),          -- names the field or value concerned
    topic       LowCardinality(String),
    `partition` UInt32,
    `offset`    UInt64,
    at          DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, `partition`, `offset`);
