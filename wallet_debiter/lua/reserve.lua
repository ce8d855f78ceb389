-- Dialer reads and reservation holds of one account (SPEC "Dialer authorization").
-- KEYS: w:{A} (wallet hash), u:{A} (allowance used), h:{A} (holds: reservation_id -> JSON)
-- ARGV[1]   mode: 'peek' (read only, one round trip per authorize) | 'reserve' | 'release'
-- ARGV[2]   now_ms (the API's clock; a hold is active while now_ms < expires_at_ms)
-- ARGV[3-5] today's UTC year, month, day (for the billing period of the account's anchor day)
-- ARGV[6]   reserve: msgpack {reservation_id, hold_json, amount_micros, package_id|'',
--           period, limit_s (-1: none), billable_s, held_s, life_ms (the hold's
--           expires_at_ms - now_ms)}; peek: '' or a reservation_id (see Replies);
--           release: the reservation_id
-- ARGV[7..] candidate package ids (packages that could cover the destination)
--
-- State = {wallet {balance, billing, blocked, credit_limit, plan, home_country,
--          period_anchor_day}, held_money, period, used_s {per candidate}, held_s {per candidate}}
-- Replies: peek -> state | {'unknown'} | {'exists', hold_json} (only with a reservation_id:
--                   a live hold with that id, checked in the same atomic step as the state)
--                   | {'closed', hold_json} (that id's hold was settled or released)
--          reserve -> {'ok'} | {'exists', hold_json} | {'closed', hold_json} | {'unknown'}
--                     | {'stale', state}
--          release -> {'released'} | {'closed', hold_json} | {'none'} | {'unknown'}
-- A closed hold ("closed": "settled" by its CDR in apply.lua, or "released" here) keeps its
-- entry with no money and no seconds until it would have expired: its id stays taken, so a
-- late retry of the POST gets a conflict instead of holding money for a call already over.
-- A live hold with the reservation_id always wins over the money checks: a retry of a hold
-- returns it, whatever the balance (the state would count the hold against itself).
-- 'stale': the hold the caller sized is no longer right for the live state (money short,
-- allowance moved, period rolled, wallet blocked); nothing was written and the fresh state
-- comes back so the caller re-decides without another read.
-- A hold JSON carries at least amount, seconds, field ("package|period" or ""), expires_at_ms.
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local w = redis.call('HMGET', KEYS[1], 'balance', 'billing', 'blocked', 'credit_limit', 'plan',
                     'home_country', 'period_anchor_day')
if not w[1] then return cmsgpack.pack({'unknown'}) end

-- Billing period start, as rating.periods.period_start: monthly from the anchor day, UTC.
local year, month, day = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local anchor = tonumber(w[7]) or 1
if day < anchor then
  month = month - 1
  if month == 0 then month = 12; year = year - 1 end
end
local period = string.format('%04d-%02d-%02d', year, month, anchor)

-- Active holds; expired (or unreadable) ones are ignored, and deleted when reserving.
local raw = redis.call('HGETALL', KEYS[3])
local held_money = 0
local held_by_field = {}
local active = {}
local closed = {}  -- settled or released, remembered until the hold would have expired
local expired = {}
for i = 1, #raw, 2 do
  local ok, h = pcall(cjson.decode, raw[i + 1])
  local exp = nil
  if ok and type(h) == 'table' then exp = tonumber(h.expires_at_ms) end
  if exp and exp > now and type(h.closed) == 'string' then
    closed[raw[i]] = raw[i + 1]
  elseif exp and exp > now then
    held_money = held_money + (tonumber(h.amount) or 0)
    local f = h.field
    if type(f) == 'string' and f ~= '' then
      held_by_field[f] = (held_by_field[f] or 0) + (tonumber(h.seconds) or 0)
    end
    active[raw[i]] = raw[i + 1]
  else
    expired[#expired + 1] = raw[i]
  end
end

if mode == 'release' then
  local rid = ARGV[6]
  if active[rid] then
    local h = cjson.decode(active[rid])
    h.amount, h.seconds, h.field, h.closed = 0, 0, '', 'released'
    redis.call('HSET', KEYS[3], rid, cjson.encode(h))
    return cmsgpack.pack({'released'})
  end
  if closed[rid] then return cmsgpack.pack({'closed', closed[rid]}) end
  redis.call('HDEL', KEYS[3], rid)  -- expired or unreadable: it held nothing any more
  return cmsgpack.pack({'none'})
end

local used, held = {}, {}
local ncand = #ARGV - 6
if ncand > 0 then
  local fields = {}
  for i = 1, ncand do fields[i] = ARGV[6 + i] .. '|' .. period end
  local u = redis.call('HMGET', KEYS[2], unpack(fields))
  for i = 1, ncand do
    used[i] = tonumber(u[i]) or 0
    held[i] = held_by_field[fields[i]] or 0
  end
end
local state = {w, held_money, period, used, held}
if mode == 'peek' then
  if ARGV[6] ~= '' and active[ARGV[6]] then return cmsgpack.pack({'exists', active[ARGV[6]]}) end
  if ARGV[6] ~= '' and closed[ARGV[6]] then return cmsgpack.pack({'closed', closed[ARGV[6]]}) end
  return cmsgpack.pack(state)
end

-- reserve
local r = cmsgpack.unpack(ARGV[6])
local rid, hold_json, amount, pkg, hperiod = r[1], r[2], r[3], r[4], r[5]
local limit, billable, seconds, life = r[6], r[7], r[8], r[9]
for s = 1, #expired, 1000 do
  redis.call('HDEL', KEYS[3], unpack(expired, s, math.min(s + 999, #expired)))
end
if active[rid] then return cmsgpack.pack({'exists', active[rid]}) end
if closed[rid] then return cmsgpack.pack({'closed', closed[rid]}) end
local stale = cmsgpack.pack({'stale', state})
if w[3] == '1' then return stale end
if pkg ~= '' then
  if hperiod ~= period then return stale end
  if limit >= 0 then
    -- The caller covered min(billable, remaining) seconds and priced the rest; that is only
    -- right if the package still leaves exactly that coverage.
    local field = pkg .. '|' .. period
    local u = tonumber(redis.call('HGET', KEYS[2], field)) or 0
    local remaining = limit - u - (held_by_field[field] or 0)
    if remaining < 0 then remaining = 0 end
    if math.min(billable, remaining) ~= seconds then return stale end
  end
end
if amount > 0 then
  local balance = tonumber(w[1])
  local avail = nil
  if w[2] == 'postpaid' then
    local lim = tonumber(w[4])  -- '' -> nil: no credit limit, no money limit
    if lim then avail = lim + balance - held_money end
  else
    avail = balance - held_money
  end
  if avail and amount > avail then return stale end
end
redis.call('HSET', KEYS[3], rid, hold_json)
-- The whole hash outlives its longest-lived hold, so abandoned holds never leak.
if redis.call('PTTL', KEYS[3]) < life then redis.call('PEXPIRE', KEYS[3], life) end
return cmsgpack.pack({'ok'})
