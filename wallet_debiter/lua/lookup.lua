-- Read dedupe priors, allowance used and the dialer's live holds for one batch (one round trip).
-- KEYS: per account i: KEYS[3i-2] = d:{A} (dedupe), KEYS[3i-1] = u:{A} (allowance used),
--       KEYS[3i] = h:{A} (reservation holds: reservation_id -> JSON {seconds, field, expires_at_ms})
-- ARGV[1]: msgpack { {event_id...}, {allowance_field...} } per account, same order as KEYS
-- Returns msgpack { {prior_or_false...}, {used_or_false...}, {rid, field, seconds, ...} } per
-- account: the holds are the live ones (Redis clock) holding seconds of a field asked for.
local groups = cmsgpack.unpack(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, g in ipairs(groups) do
  local priors, used, holds = {}, {}, {}
  if #g[1] > 0 then priors = redis.call('HMGET', KEYS[3 * i - 2], unpack(g[1])) end
  if #g[2] > 0 then
    used = redis.call('HMGET', KEYS[3 * i - 1], unpack(g[2]))
    local raw = redis.call('HGETALL', KEYS[3 * i])
    if #raw > 0 then
      local wanted = {}
      for _, f in ipairs(g[2]) do wanted[f] = true end
      for j = 1, #raw, 2 do
        local ok, h = pcall(cjson.decode, raw[j + 1])
        if ok and type(h) == 'table' and wanted[h.field] and (tonumber(h.expires_at_ms) or 0) > now
            and (tonumber(h.seconds) or 0) > 0 then
          table.insert(holds, raw[j]); table.insert(holds, h.field); table.insert(holds, tonumber(h.seconds))
        end
      end
    end
  end
  out[i] = {priors, used, holds}
end
return cmsgpack.pack(out)
