-- Apply one batch of debits atomically (all or nothing), aggregated per wallet.
-- KEYS: per account i: w:{A} (wallet hash), u:{A} (allowance used), d:{A} (dedupe), h:{A} (holds)
-- ARGV[1]: msgpack {debits, expected[, positions]}
--   debit:    {acct, event_id, amount, allowance_field|"", covered, fingerprint, source, outcome, reservation|""}
--   expected: {acct, allowance_field, used_seconds_seen_by_lookup, held_seconds_seen_by_lookup,
--             limit_s (-1: not given)}
--             (held: the seconds the dialer's live holds keep of that allowance)
--   positions (optional; then the last KEY is pos:{topic}): {partition, expected (-1: none), new}
-- Positions first: if Redis holds another position than the one this worker wrote last (it lost
-- writes: a restart losing the AOF's last second, a failover), nothing is written and
-- {"lost", {partition, held (-1: none)}...} comes back: the caller replays from there. Else
-- the new positions are written with the debits, in one atomic step.
-- Optimistic check first: if another writer changed a dedupe entry or an allowance since the
-- lookup (a stale partition owner after a rebalance), nothing is written and {"stale", why}
-- comes back; the caller looks up again. Otherwise returns {"ok", {balance, bits, seq}...}:
-- seq numbers the wallet's balance changes (field `seq`, shared with credit.lua), 0 for a
-- debit that moved no money.
local batch = cmsgpack.unpack(ARGV[1])
local debits, expected, positions = batch[1], batch[2], batch[3]
local function k(i, n) return KEYS[4 * (i - 1) + n] end
local nacc = #KEYS / 4
if positions then
  nacc = (#KEYS - 1) / 4
  local pkey = KEYS[#KEYS]
  local lost = {}
  for _, e in ipairs(positions) do
    if e[2] >= 0 then
      local held = tonumber(redis.call('HGET', pkey, e[1]) or '-1')
      if held ~= e[2] then table.insert(lost, {e[1], held}) end
    end
  end
  if #lost > 0 then return cmsgpack.pack({'lost', lost}) end
end

local now = nil
local function now_ms()  -- Redis's clock, read once per call
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
-- Seconds of `field` the live holds keep: all of them, and those of calls not in this batch
-- (`mine`: the batch's reservation ids of that wallet, or nil; their holds are closed below).
local function held_seconds(key, field, mine)
  local total, others = 0, 0
  local raw = redis.call('HGETALL', key)
  for j = 1, #raw, 2 do
    local ok, h = pcall(cjson.decode, raw[j + 1])
    if ok and type(h) == 'table' and h.field == field and (tonumber(h.expires_at_ms) or 0) > now_ms() then
      local s = math.max(tonumber(h.seconds) or 0, 0)
      total = total + s
      if not (mine and mine[raw[j]]) then others = others + s end
    end
  end
  return total, others
end
-- Per wallet: the batch's reservation ids, and the seconds it covers per field. Built only
-- when holds changed since the lookup (rare): not a second pass over every batch.
local mine, covering = nil, nil
local function index_batch()
  mine, covering = {}, {}
  for _, d in ipairs(debits) do
    if d[9] ~= '' then mine[d[1]] = mine[d[1]] or {}; mine[d[1]][d[9]] = true end
    if d[4] ~= '' and d[5] > 0 then
      covering[d[1]] = covering[d[1]] or {}
      covering[d[1]][d[4]] = (covering[d[1]][d[4]] or 0) + d[5]
    end
  end
end
for _, e in ipairs(expected) do
  local used = tonumber(redis.call('HGET', k(e[1], 2), e[2]) or '0')
  if used ~= e[3] then return cmsgpack.pack({'stale', 'allowance ' .. e[2]}) end
  -- Holds taken, released or expired since the lookup. The batch covered at most what the
  -- holds it saw left, so released ones only mean it was priced as of its lookup; what matters
  -- is that every other call's hold still fits beside what the batch takes now (else that
  -- call would find its seconds gone and be charged beyond the money held). A busy dialer
  -- changes holds all the time: requiring them unchanged would send batches round forever.
  local total = held_seconds(k(e[1], 4), e[2], nil)
  if total ~= (e[4] or 0) then
    if not mine then index_batch() end
    local _, others = held_seconds(k(e[1], 4), e[2], mine[e[1]])
    local limit = e[5] or -1
    local takes = (covering[e[1]] or {})[e[2]] or 0
    if limit < 0 or (takes > 0 and used + takes + others > limit) then
      return cmsgpack.pack({'stale', 'holds ' .. e[2]})
    end
  end
end
for _, d in ipairs(debits) do
  if redis.call('HEXISTS', k(d[1], 3), d[2]) == 1 then return cmsgpack.pack({'stale', 'dedupe ' .. d[2]}) end
end

local function num(v) if v then return tonumber(v) end return nil end
local W = {}
for i = 1, nacc do
  local v = redis.call('HMGET', k(i, 1), 'balance', 'billing', 'blocked', 'topup_pending',
                       'topup_threshold', 'low_balance_alert', 'credit_limit', 'seq')
  if not v[1] then return cmsgpack.pack({'error', 'no wallet at ' .. k(i, 1)}) end
  W[i] = {balance = tonumber(v[1]), billing = v[2], blocked = v[3] == '1', pending = v[4] == '1',
          threshold = num(v[5]), alert = num(v[6]), limit = num(v[7]), seq = num(v[8]) or 0,
          used = {}, dedupe = {}, holds = {}, touched = false}
end

local function should_block(w)
  if w.billing == 'prepaid' then return w.balance <= 0 end
  return w.limit ~= nil and -w.balance > w.limit
end

local results = {}
for n, d in ipairs(debits) do
  local w = W[d[1]]
  local amount = d[3]
  local bits = 0
  local seq = 0
  if amount > 0 then
    local before = w.balance
    local after = before - amount
    w.balance = after
    w.touched = true
    w.seq = w.seq + 1
    seq = w.seq
    if not w.blocked and should_block(w) then w.blocked = true; bits = bits + 1 end
    if w.billing == 'prepaid' then
      if w.threshold and not w.pending and before >= w.threshold and w.threshold > after then
        w.pending = true; bits = bits + 4
      end
      if w.alert and before >= w.alert and w.alert > after then bits = bits + 8 end
    end
  end
  if d[4] ~= '' and d[5] > 0 then w.used[d[4]] = (w.used[d[4]] or 0) + d[5] end
  local prior = string.format('%s|%s|%d|%d|%s|%d', d[6], d[7], w.balance, bits, d[8], seq)
  table.insert(w.dedupe, d[2]); table.insert(w.dedupe, prior)
  if d[9] ~= '' then table.insert(w.holds, d[9]) end
  results[n] = {w.balance, bits, seq}
end

local function chunked(cmd, key, items)
  for s = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, s, math.min(s + 999, #items)))
  end
end
-- A settled hold stays as a closed marker (no money, no seconds) until the hold would have
-- expired, so a dialer retrying the reservation's POST after its call was rated gets a
-- conflict instead of a fresh hold (reserve.lua). Holds already expired are deleted.
local function close_holds(key, rids)
  for s = 1, #rids, 1000 do
    local part = {unpack(rids, s, math.min(s + 999, #rids))}
    local docs = redis.call('HMGET', key, unpack(part))
    for j, rid in ipairs(part) do
      if docs[j] then
        local ok, h = pcall(cjson.decode, docs[j])
        if not (ok and type(h) == 'table') then
          redis.call('HDEL', key, rid)  -- unreadable: it holds nothing
        elseif type(h.closed) == 'string' then
          -- closed already (released by the dialer): kept as it is
        elseif (tonumber(h.expires_at_ms) or 0) > now_ms() then
          h.amount, h.seconds, h.field, h.closed = 0, 0, '', 'settled'
          redis.call('HSET', key, rid, cjson.encode(h))
        else
          redis.call('HDEL', key, rid)  -- expired: held nothing any more
        end
      end
    end
  end
end
for i = 1, nacc do
  local w = W[i]
  if w.touched then
    redis.call('HSET', k(i, 1), 'balance', string.format('%d', w.balance),
               'blocked', w.blocked and '1' or '0', 'topup_pending', w.pending and '1' or '0',
               'seq', string.format('%d', w.seq))
  end
  for field, secs in pairs(w.used) do redis.call('HINCRBY', k(i, 2), field, secs) end
  if #w.dedupe > 0 then chunked('HSET', k(i, 3), w.dedupe) end
  if #w.holds > 0 then close_holds(k(i, 4), w.holds) end
end
if positions then
  local fields = {}
  for _, e in ipairs(positions) do table.insert(fields, e[1]); table.insert(fields, e[3]) end
  redis.call('HSET', KEYS[#KEYS], unpack(fields))
end
return cmsgpack.pack({'ok', results})
