-- Read dedupe priors and allowance used for one batch (one round trip).
-- KEYS: per account i: KEYS[2i-1] = d:{A} (dedupe hash), KEYS[2i] = u:{A} (allowance hash)
-- ARGV[1]: msgpack { {event_id...}, {allowance_field...} } per account, same order as KEYS
-- Returns msgpack { {prior_or_false...}, {used_or_false...} } per account.
local groups = cmsgpack.unpack(ARGV[1])
local out = {}
for i, g in ipairs(groups) do
  local priors, used = {}, {}
  if #g[1] > 0 then priors = redis.call('HMGET', KEYS[2 * i - 1], unpack(g[1])) end
  if #g[2] > 0 then used = redis.call('HMGET', KEYS[2 * i], unpack(g[2])) end
  out[i] = {priors, used}
end
return cmsgpack.pack(out)
