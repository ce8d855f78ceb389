-- wallet_movements: every balance change (SPEC "Wallets"): debit | credit | topup | adjustment,
-- amount signed (debits negative), with the balance after it. Redis stays the source of truth
-- for live balances; this is the analysts' copy.
--
-- Same replay rule as rated_usage: ReplacingMergeTree keyed on (account_id, movement_id), read
-- with FINAL (see 010_rated_usage.sql for why insert dedup tokens are not used).
--
-- Convention for recurring charges (used by v_usage_by_category): a monthly plan fee is a
-- movement of type 'adjustment' whose reference starts with 'fee:', written as
--     fee:<period_start YYYY-MM-DD>[:<anything, e.g. plan id>]      e.g. fee:2026-11-01:starter
-- with a negative amount for the fee (a positive one refunds it). The view takes the billing
-- period from the date in the reference, else from toDate(at).
CREATE TABLE IF NOT EXISTS {database}.wallet_movements
(
    movement_id   String,
    account_id    String,
    at            DateTime64(3, 'UTC'),
    type          LowCardinality(String),    -- debit | credit | topup | adjustment
    amount        Decimal(18, 6),            -- signed: debits negative
    balance_after Decimal(18, 6),
    reference     String                     -- event_id for debits; operator reference otherwise
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (account_id, movement_id);
