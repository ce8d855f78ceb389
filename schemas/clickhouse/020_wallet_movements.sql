-- wallet_movements: every balance change (SPEC "Wallets"): debit | credit | topup | adjustment,
-- amount signed (debits negative), with the balance after it. Redis stays the source of truth
-- for live balances; this is the analysts' copy.
--
-- seq numbers each wallet's balance changes 1, 2, 3... in the order Redis applied them
-- (debits and credits alike): ordered by seq, each balance_after is the previous one plus its
-- amount, although `at` (a debit's CDR time) can be earlier for a late record. 0 on rows
-- written before seq existed (the ALTER below adds it to such tables).
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
    reference     String,                    -- event_id for debits; operator reference otherwise
    seq           UInt64 DEFAULT 0           -- the wallet's balance-change number (see above)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (account_id, movement_id);

ALTER TABLE {database}.wallet_movements ADD COLUMN IF NOT EXISTS seq UInt64 DEFAULT 0;
