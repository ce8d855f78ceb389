-- wallet_events: blocked | unblocked | topup_requested | low_balance | usage_threshold
-- (SPEC "Wallets"), as published on Kafka wallet.events.
--
-- Deterministic key: (account_id, type, event_id, package_id, percent, at). `at` must be the
-- time of the cause (the usage event or movement that produced it), not the time of insertion,
-- so that a replayed message has the same key and replaces itself. event_id is NULL for events
-- caused by operator actions (e.g. unblocked after a credit); `at` keeps two of those apart.
-- Nullable columns enter the key through ifNull (nullable sorting keys need a non-default
-- setting). Read with FINAL.
CREATE TABLE IF NOT EXISTS {database}.wallet_events
(
    type       LowCardinality(String),
    account_id String,
    event_id   Nullable(String),                  -- the usage event that caused it
    balance    Decimal(18, 6),                    -- balance after the change that caused it
    package_id LowCardinality(Nullable(String)),  -- usage_threshold only
    percent    Nullable(UInt8),                   -- usage_threshold only: 50 | 80 | 100
    at         DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (account_id, type, ifNull(event_id, ''), ifNull(package_id, ''), ifNull(percent, 0), at);
