-- accounts import, per wallet (KEYS: w:{A} of each wallet of the call, all in one slot)
-- ARGV[1] msgpack list in KEYS order: {config {field, value, ...}, opening balance,
--         opening blocked '0'/'1', billing, credit_limit micros or ''}
-- Replies msgpack list: {new 1/0, bits (1 blocked, 2 unblocked: an existing wallet's block
-- state changed), balance, opening balance, opened at (ms, Redis clock)}. The opening pair is
-- written once, when the wallet is created (false for wallets created before it was kept), so
-- every import can re-send the same opening movement. Block rule as
-- rating.wallet.WalletState.should_block / credit.lua.
local rows = cmsgpack.unpack(ARGV[1])
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = {}
for i, r in ipairs(rows) do
  local key = KEYS[i]
  local v = redis.call('HMGET', key, 'balance', 'blocked', 'opening_balance', 'opened_at_ms')
  if not v[1] then
    redis.call('HSET', key, 'balance', r[2], 'blocked', r[3], 'topup_pending', '0',
               'opening_balance', r[2], 'opened_at_ms', now, unpack(r[1]))
    out[i] = {1, 0, r[2], r[2], now}
  else
    local balance = tonumber(v[1])
    local limit = tonumber(r[5])  -- '' -> nil: no credit limit
    local should
    if r[4] == 'prepaid' then should = balance <= 0 else should = limit ~= nil and -balance > limit end
    local was = v[2] == '1'
    local bits = 0
    if was and not should then bits = 2 elseif should and not was then bits = 1 end
    redis.call('HSET', key, 'blocked', should and '1' or '0', unpack(r[1]))
    out[i] = {0, bits, v[1], v[3] or false, v[4] or false}
  end
end
return cmsgpack.pack(out)
