-- Compare-and-set of Kafka positions (the next offset per partition whose effects Redis holds),
-- for batches without debits and for Redis Cluster, where apply.lua cannot write them itself.
-- KEYS[1]: pos:{topic} (or one master's copy); ARGV[1]: msgpack {{partition, expected (-1: none), new}...}
-- If any held position differs from the expected one, nothing is written and
-- {"lost", {partition, held (-1: none)}...} comes back; else {"ok"}.
local positions = cmsgpack.unpack(ARGV[1])
local lost = {}
for _, e in ipairs(positions) do
  if e[2] >= 0 then
    local held = tonumber(redis.call('HGET', KEYS[1], e[1]) or '-1')
    if held ~= e[2] then table.insert(lost, {e[1], held}) end
  end
end
if #lost > 0 then return cmsgpack.pack({'lost', lost}) end
local fields = {}
for _, e in ipairs(positions) do table.insert(fields, e[1]); table.insert(fields, e[3]) end
redis.call('HSET', KEYS[1], unpack(fields))
return cmsgpack.pack({'ok'})
