-- sweep
-- Drop listing-index entries of transactions whose keys have expired. The candidates
-- come from a ZRANGEBYSCORE of the expiry index before the call (so that every key
-- touched is named in KEYS); each is checked again here by the server's clock.
-- KEYS[1] = due index (zset) of the partition
-- KEYS[2] = listing index (zset) of the partition
-- KEYS[3] = expiry index (zset): member = listing member, score = ms when keys expire
-- KEYS[3+k] (k = 1..N) = transaction hash of candidate k
-- ARGV[k] = listing member of candidate k ("<13-digit create ms>:<gid>")
-- returns the number of entries removed

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = 0
for k, member in ipairs(ARGV) do
  local score = redis.call('ZSCORE', KEYS[3], member)
  if score and tonumber(score) <= now then
    local gid = string.sub(member, 15)
    local current = redis.call('HGET', KEYS[3 + k], 'created_member')
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
end
return removed
