-- sweep
-- Walk one listing bucket, a bounded chunk of its members per call: drop the entries of
-- transactions that are gone (expired, deleted by hand, or whose gid now names a newer
-- transaction), and plan the bucket's next look for when the finished ones left will
-- have expired. The chunk comes from a ZRANGEBYLEX of the bucket before the call (so
-- that every key touched is named in KEYS); each member is checked here.
-- KEYS[1] = due index (zset) of the partition; above FINISHED_BAND (lib_band.lua) the
--           bucket's entry in the sweep's schedule, named by its label
-- KEYS[2] = index of buckets (zset) of the partition, member = label
-- KEYS[3] = the bucket (zset)       <prefix>:created:{pN}:<label>
-- KEYS[3+k] (k = 1..N) = transaction hash of member k
-- ARGV[1] = the bucket's label (YYYYMMDDHHMM)
-- ARGV[2] = the bucket's minute (ms // 60000)
-- ARGV[3] = "take" on the first call of a walk: go on only if the bucket is due for a
--           look by the server's clock, and keep other sweepers off it for ARGV[4] ms;
--           "" on the later calls of the walk
-- ARGV[4] = ms a walk may take before another sweeper may start it over
-- ARGV[5] = the least ms until a bucket that holds only unfinished transactions (or ones
--           kept for good) is looked at again; older buckets wait a quarter of their
--           age, up to a day
-- ARGV[6] = "1" if this call ends the walk (its chunk is the rest of the bucket)
-- ARGV[7] = the latest expiry (ms) of a finished transaction the walk's earlier calls
--           kept, or ""
-- ARGV[7+k] = member k ("<13-digit create ms>:<gid>")
-- returns {"BUSY"} (not due, or another sweeper's walk holds it) or
--         {"OK", entries removed, latest expiry kept so far (ms) or ""}

--!include lib_band.lua

-- An empty bucket stays registered this long after its minute: a create that the
-- server's clock, stepped back, still puts in that minute must find it registered.
local GRACE_MS = 120000
local DAY_MS = 86400000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local label = ARGV[1]
if ARGV[3] == 'take' then
  local score = redis.call('ZSCORE', KEYS[1], label)
  if (not score) or tonumber(score) - FINISHED_BAND > now then
    return {'BUSY'}
  end
  redis.call('ZADD', KEYS[1], string.format('%d', FINISHED_BAND + now + tonumber(ARGV[4])),
             label)
end

local removed = 0
local latest = tonumber(ARGV[7])  -- nil for ""
for k = 8, #ARGV do
  local member = ARGV[k]
  local tkey = KEYS[k - 4]
  if redis.call('HGET', tkey, 'created_member') ~= member then
    removed = removed + redis.call('ZREM', KEYS[3], member)
  else
    -- Still there: a finished one is gone when its TTL runs out; an unfinished one (or
    -- one whose TTL was taken off by hand) has no end yet.
    local pttl = redis.call('PTTL', tkey)
    if pttl > 0 and ((not latest) or now + pttl > latest) then
      latest = now + pttl
    end
  end
end

if ARGV[6] == '1' then
  local minute_end = (tonumber(ARGV[2]) + 1) * 60000
  local next_look
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if now >= minute_end + GRACE_MS then
      redis.call('ZREM', KEYS[2], label)
      redis.call('ZREM', KEYS[1], label)
    else
      next_look = minute_end + GRACE_MS
    end
  elseif latest then
    -- Once every finished one kept has expired.
    next_look = latest
  else
    -- Only unfinished ones left: they may have finished by the next look.
    local wait = math.floor((now - minute_end) / 4)
    wait = math.max(tonumber(ARGV[5]), math.min(wait, DAY_MS))
    next_look = now + wait
  end
  if next_look then
    redis.call('ZADD', KEYS[1], string.format('%d', FINISHED_BAND + next_look), label)
  end
end
local kept = ''
if latest then
  kept = string.format('%d', latest)
end
return {'OK', removed, kept}
