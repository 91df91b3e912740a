-- due
-- Which partitions hold work that is due: one call instead of one ZRANGEBYSCORE per
-- partition. Only on a single Redis: on a cluster a script may not span slots, and the
-- store asks each partition in a pipeline per node instead.
-- KEYS[k] = due index (zset) of partition k - 1
-- ARGV[1] = now in ms by the caller's clock (a hint only: the claim script checks each
--           entry again by the server's clock)
-- returns the partition numbers (0-based) that have an entry scored <= ARGV[1]

local out = {}
for k, key in ipairs(KEYS) do
  if #redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'LIMIT', 0, 1) > 0 then
    out[#out + 1] = k - 1
  end
end
return out
