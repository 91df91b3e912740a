-- migrate_due
-- Layout 2 to 3, one partition at a time: due-index entries named by the bare gid get
-- the transaction's listing member instead (same score), and entries of layout 2's
-- expiry index move into the due index's finished band. Safe to run again and from
-- several instances at once: a converted entry names no transaction hash and is skipped.
-- KEYS[1] = due index (zset) of the partition
-- KEYS[2] = layout 2's expiry index of the partition (member = listing member, score =
--           ms when the transaction's keys expire)
-- KEYS[2+k] (k = 1..N) = transaction hash of the gid ARGV[k]
-- ARGV[k] = a due-index member to convert (a gid)
-- returns {converted, moved from the expiry index, expiry entries left}

--!include lib_band.lua

local converted = 0
for k, gid in ipairs(ARGV) do
  local member = redis.call('HGET', KEYS[2 + k], 'created_member')
  if member and member ~= gid then
    local score = redis.call('ZSCORE', KEYS[1], gid)
    if score then
      redis.call('ZREM', KEYS[1], gid)
      redis.call('ZADD', KEYS[1], score, member)
      converted = converted + 1
    end
  end
end

-- A bounded step per call, so that one call never blocks Redis for long.
local entries = redis.call('ZRANGE', KEYS[2], 0, 499, 'WITHSCORES')
for i = 1, #entries, 2 do
  local score = string.format('%d', FINISHED_BAND + tonumber(entries[i + 1]))
  redis.call('ZADD', KEYS[1], score, entries[i])
  redis.call('ZREM', KEYS[2], entries[i])
end
return {converted, #entries / 2, redis.call('ZCARD', KEYS[2])}
