-- Ready-made analyst views (SPEC "ClickHouse"). Plain SQL views: nothing is materialized, each
-- query reads the tables.
--
-- Every view reads the ReplacingMergeTree tables with FINAL (or aggregates with argMax), so a
-- replayed row is counted once whether or not background merges have run yet; see
-- 010_rated_usage.sql. Views are created with CREATE OR REPLACE so that applying this file again
-- is idempotent *and* picks up a changed definition after an upgrade (IF NOT EXISTS would keep
-- the old definition forever). Views hold no data, so replacing them loses nothing.
--
-- Minutes are seconds / 60 as Float64 (per-second billing makes fractional minutes); the exact
-- integer seconds are published beside them. Money columns are exact Decimal sums.


-- Usage per account and billing period by category:
--   calls      rated call records:   quantity = number of calls, billable_s/_minutes = billed time
--   sms        rated sms records:    quantity = segments
--   meters     rated meter records, one row per meter (column `meter`: llm_tokens, stt_seconds...):
--              quantity = that meter's total, in its own unit (units are never added together)
--   recurring  monthly fees:         wallet_movements of type 'adjustment' whose reference starts
--              with 'fee:' (convention: fee:<period_start YYYY-MM-DD>[:...], see
--              020_wallet_movements.sql); quantity = number of fee movements, charge = -sum(amount)
--              (fees are negative movements). period_start is the date in the reference, else
--              toDate(at).
-- charge is what the account was charged (positive), events the number of rows behind it.
-- `meter` is NULL on every other category.
CREATE OR REPLACE VIEW {database}.v_usage_by_category AS
SELECT
    account_id,
    period_start,
    multiIf(kind = 'call', 'calls', kind = 'sms', 'sms', kind = 'meter', 'meters', kind) AS category,
    CAST(meter_name AS Nullable(String)) AS meter,
    n_events AS events,
    if(kind = 'call', toDecimal128(n_events, 6), sum_quantity) AS quantity,
    sum_billable_s AS billable_s,
    sum_billable_s / 60 AS billable_minutes,
    sum_charge AS charge
FROM
(
    -- inner aliases differ from column names on purpose: `sum(charge) AS charge` is ambiguous
    -- for ClickHouse's pre-24.3 query analyzer
    SELECT
        account_id,
        period_start,
        kind,
        meter AS meter_name,
        count() AS n_events,
        toDecimal128(ifNull(sum(quantity), 0), 6) AS sum_quantity,
        toUInt64(sum(billable_s)) AS sum_billable_s,
        toDecimal128(sum(charge), 6) AS sum_charge
    FROM {database}.rated_usage FINAL
    GROUP BY account_id, period_start, kind, meter
)
UNION ALL
SELECT
    account_id,
    fee_period AS period_start,
    'recurring' AS category,
    CAST(NULL AS Nullable(String)) AS meter,
    n_events AS events,
    toDecimal128(n_events, 6) AS quantity,
    toUInt64(0) AS billable_s,
    toFloat64(0) AS billable_minutes,
    fee_charge AS charge
FROM
(
    SELECT
        account_id,
        ifNull(toDateOrNull(substring(reference, 5, 10)), toDate(at)) AS fee_period,
        count() AS n_events,
        toDecimal128(-sum(amount), 6) AS fee_charge
    FROM {database}.wallet_movements FINAL
    WHERE type = 'adjustment' AND startsWith(reference, 'fee:')
    GROUP BY account_id, fee_period
);


-- Package allowance per account, period and package: minutes used (covered by the package) and
-- remaining. The package size comes from package_allowances (the row loaded last per package).
--   used_s / used_minutes        covered seconds taken from the package this period
--   overage_s                    seconds of those calls charged at the rate (allowance or fair
--                                use exhausted)
--   allowance_minutes            package size; NULL for unlimited (or a package not loaded)
--   remaining_minutes            allowance_minutes - used_minutes, not below 0; NULL for unlimited
--                                packages and packages missing from package_allowances
--   fair_use_remaining_minutes   for unlimited packages: fair_use_minutes - used_minutes, not
--                                below 0; NULL otherwise
-- Only (account, period, package) combinations with at least one call appear.
CREATE OR REPLACE VIEW {database}.v_package_usage AS
SELECT
    u.account_id AS account_id,
    u.period_start AS period_start,
    u.pkg AS package_id,
    u.calls AS calls,
    u.used_s AS used_s,
    u.used_s / 60 AS used_minutes,
    u.overage_s AS overage_s,
    u.any_fair_use_exceeded AS fair_use_exceeded,
    toUInt8(ifNull(a.known, 0) = 1 AND a.minutes IS NULL) AS unlimited,
    if(ifNull(a.known, 0) = 1, a.minutes, NULL) AS allowance_minutes,
    if(ifNull(a.known, 0) = 1, a.fair_use_minutes, NULL) AS fair_use_minutes,
    if(ifNull(a.known, 0) = 1 AND a.minutes IS NOT NULL,
       greatest(toInt64(assumeNotNull(a.minutes)) * 60 - toInt64(u.used_s), 0) / 60,
       NULL) AS remaining_minutes,
    if(ifNull(a.known, 0) = 1 AND a.minutes IS NULL AND a.fair_use_minutes IS NOT NULL,
       greatest(toInt64(assumeNotNull(a.fair_use_minutes)) * 60 - toInt64(u.used_s), 0) / 60,
       NULL) AS fair_use_remaining_minutes,
    if(ifNull(a.known, 0) = 1, a.catalog_version, NULL) AS catalog_version
FROM
(
    SELECT
        account_id,
        period_start,
        ifNull(package_id, '') AS pkg,
        count() AS calls,
        toUInt64(sum(covered_s)) AS used_s,
        toUInt64(sum(charged_s)) AS overage_s,
        toUInt8(max(fair_use_exceeded)) AS any_fair_use_exceeded
    FROM {database}.rated_usage FINAL
    WHERE package_id IS NOT NULL
    GROUP BY account_id, period_start, pkg
) AS u
LEFT JOIN
(
    SELECT
        package_id AS allowance_package_id,
        toUInt8(1) AS known,
        tupleElement(cur, 1) AS minutes,
        tupleElement(cur, 2) AS fair_use_minutes,
        toNullable(tupleElement(cur, 3)) AS catalog_version
    FROM
    (
        -- argMax over a tuple: a plain argMax(minutes, ...) would skip NULL (= unlimited) rows
        SELECT package_id, argMax(tuple(minutes, fair_use_minutes, catalog_version), loaded_at) AS cur
        FROM {database}.package_allowances
        GROUP BY package_id
    )
) AS a ON u.pkg = a.allowance_package_id;


-- Top destinations over all rated outbound calls: calls, billed minutes and revenue per
-- destination country and class. Add ORDER BY revenue DESC LIMIT n when querying (a view's
-- ORDER BY is not guaranteed to survive).
CREATE OR REPLACE VIEW {database}.v_top_destinations AS
SELECT
    country,
    dest_class,
    count() AS calls,
    toUInt64(sum(billable_s)) AS total_billable_s,
    sum(billable_s) / 60 AS minutes,
    toDecimal128(sum(charge), 6) AS revenue
FROM {database}.rated_usage FINAL
WHERE kind = 'call' AND direction = 'outbound' AND country IS NOT NULL
GROUP BY country, dest_class;
