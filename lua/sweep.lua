-- sweep
-- Drop the index entries of finished transactions whose hash has expired. The
-- candidates come from a ZRANGEBYSCORE of the due index's finished band before the call
-- (so that every key touched is named in KEYS); each is checked again here by the
-- server's clock.
-- KEYS[1] = due index (zset) of the partition: a finished transaction's entry is scored
--           FINISHED_BAND (keys.py) + ms when its hash expires
-- KEYS[2] = listing index (zset) of the partition
-- KEYS[2+k] (k = 1..N) = transaction hash of candidate k
-- ARGV[k] = member of candidate k ("<13-digit create ms>:<gid>", in both indexes)
-- returns the number of transactions whose entries were removed

--!include lib_band.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = 0
for k, member in ipairs(ARGV) do
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) >= FINISHED_BAND and tonumber(score) - FINISHED_BAND <= now then
    if redis.call('HGET', KEYS[2 + k], 'created_member') ~= member then
      -- Gone, or its gid reused by a newer transaction (another member): both entries go.
      redis.call('ZREM', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
      removed = removed + 1
    else
      -- Still there: its TTL was changed by hand. Look again when it runs out; with none
      -- left, the listing entry stays with the hash and the due entry has no use.
      local pttl = redis.call('PTTL', KEYS[2 + k])
      if pttl > 0 then
        redis.call('ZADD', KEYS[1], string.format('%d', FINISHED_BAND + now + pttl), member)
      else
        redis.call('ZREM', KEYS[1], member)
      end
    end
  end
end
return removed
