-- migrate_listing
-- Layout 3 to 4, one bounded chunk of one partition per call: move entries of layout 3's
-- single listing index into the listing buckets of their minutes, registering each
-- bucket as create.lua does, and drop the due entry a finished transaction kept in
-- layout 3 (above FINISHED_BAND, named by the same member): layout 4 keeps none. Safe to
-- run again and from several instances at once.
-- KEYS[1] = due index (zset) of the partition
-- KEYS[2] = layout 3's listing index (zset) <prefix>:created:{pN}
-- KEYS[3] = index of buckets (zset) <prefix>:minutes:{pN}
-- KEYS[3+k] (k = 1..N) = the listing bucket of member k
-- ARGV[1] = the finished TTL in ms: the sweep first looks at a bucket this long after
--           its minute has ended
-- ARGV[2k], ARGV[2k+1] = member k ("<13-digit create ms>:<gid>") and its bucket's label
-- returns the number of entries moved

--!include lib_band.lua

local first_look = tonumber(ARGV[1])
local moved = 0
for k = 1, (#ARGV - 1) / 2 do
  local member, label = ARGV[2 * k], ARGV[2 * k + 1]
  if redis.call('ZSCORE', KEYS[2], member) then
    local minute = math.floor(tonumber(string.sub(member, 1, 13)) / 60000)
    redis.call('ZADD', KEYS[3 + k], '0', member)
    redis.call('ZADD', KEYS[3], minute, label)
    redis.call('ZADD', KEYS[1], 'NX',
               string.format('%d', FINISHED_BAND + (minute + 1) * 60000 + first_look), label)
    local score = redis.call('ZSCORE', KEYS[1], member)
    if score and tonumber(score) >= FINISHED_BAND then
      redis.call('ZREM', KEYS[1], member)
    end
    redis.call('ZREM', KEYS[2], member)
    moved = moved + 1
  end
end
return moved
