-- sweep
-- Drop listing-index entries of transactions whose keys have expired.
-- KEYS[1] = due index (zset) of the partition
-- KEYS[2] = listing index (zset) of the partition
-- KEYS[3] = expiry index (zset): member = listing member, score = ms when keys expire
-- ARGV[1] = transaction key prefix of the partition
-- ARGV[2] = at most this many entries
-- returns the number of entries removed

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = 0
local members = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(members) do
  local gid = string.sub(member, 15)
  local current = redis.call('HGET', ARGV[1] .. gid, 'created_member')
  if not current then
    redis.call('ZREM', KEYS[2], member)
    redis.call('ZREM', KEYS[1], gid)
    removed = removed + 1
  elseif current ~= member then
    -- The gid was reused after the old record expired: drop only the old entry.
    redis.call('ZREM', KEYS[2], member)
    removed = removed + 1
  end
  redis.call('ZREM', KEYS[3], member)
end
return removed
