-- Credit, top-up or adjustment of one wallet, idempotent on its reference.
-- KEYS: w:{A}, c:{A} (credits applied: reference -> "balance|bits|at_ms|amount|type|seq")
-- ARGV: amount_micros (signed), type, reference, settles_topup (0/1), at_ms, max_abs_balance
--       (micros: a balance beyond it is refused, nothing applied), once_prefix (optional: a
--       credit recorded under any reference starting with it counts as this one, e.g. one fee
--       per period whatever the plan's name in its reference)
-- Returns {balance, bits, replayed(0/1)}; bits: 2 = unblocked, 1 = blocked, and for a negative
-- adjustment (a fee) on a prepaid wallet, as for a usage debit: 4 = topup_requested (balance
-- from >= threshold to < threshold, none outstanding), 8 = low_balance (from >= alert to < alert).
-- seq: the wallet's next balance-change number (field `seq`, shared with apply.lua).
local done_ref = ARGV[3]
local done = redis.call('HGET', KEYS[2], ARGV[3])
if not done and ARGV[7] and ARGV[7] ~= '' then
  local prefix = ARGV[7]
  for _, ref in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(ref, 1, #prefix) == prefix then
      done_ref = ref
      done = redis.call('HGET', KEYS[2], ref)
      break
    end
  end
end
if done then
  local b, bits = string.match(done, '^(-?%d+)|(%d+)')
  return {tonumber(b), tonumber(bits), 1, done_ref}
end
local v = redis.call('HMGET', KEYS[1], 'balance', 'billing', 'blocked', 'credit_limit',
                     'topup_threshold', 'topup_pending', 'low_balance_alert')
if not v[1] then return redis.error_reply('unknown account') end
local before = tonumber(v[1])
local balance = before + tonumber(ARGV[1])
if ARGV[6] and math.abs(balance) > tonumber(ARGV[6]) then
  return redis.error_reply('balance out of range')
end
local limit = v[4] and tonumber(v[4]) or nil
local blocked = v[3] == '1'
local should
if v[2] == 'prepaid' then should = balance <= 0 else should = limit ~= nil and -balance > limit end
local bits = 0
if blocked and not should then blocked = false; bits = 2
elseif not blocked and should then blocked = true; bits = 1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1
local fields = {'balance', string.format('%d', balance), 'blocked', blocked and '1' or '0',
                'seq', string.format('%d', seq)}
if ARGV[4] == '1' then
  table.insert(fields, 'topup_pending'); table.insert(fields, '0')
elseif v[2] == 'prepaid' and balance < before then
  local threshold = v[5] and v[5] ~= '' and tonumber(v[5]) or nil
  if threshold and v[6] ~= '1' and before >= threshold and threshold > balance then
    bits = bits + 4
    table.insert(fields, 'topup_pending'); table.insert(fields, '1')
  end
  local alert = v[7] and v[7] ~= '' and tonumber(v[7]) or nil
  if alert and before >= alert and alert > balance then bits = bits + 8 end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[2], ARGV[3], string.format('%d|%d|%s|%s|%s|%d', balance, bits, ARGV[5], ARGV[1], ARGV[2], seq))
return {balance, bits, 0, ARGV[3]}
