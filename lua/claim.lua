-- claim
-- Lease due transactions of one partition to a worker and return their records. The
-- candidates come from a ZRANGEBYSCORE before the call (so that every key touched is
-- named in KEYS); each is checked again here by the server's clock, since another worker
-- may have claimed it in between.
-- KEYS[1] = due index (zset) of the partition: member = listing member
--           "<13-digit create ms>:<gid>", score = ms when due (see transition.lua)
-- KEYS[1+k] (k = 1..N) = transaction hash of candidate k (its branches are fields of it)
-- ARGV[1] = owner token prefix; each claim gets "<prefix>:<k>"
-- ARGV[2] = lease length in ms
-- ARGV[2+k] = due-index member of candidate k
-- returns {now_ms, {gid, token, {field, value, ...} (transaction and "branch:" fields),
--          previous owner ('' unless a lease that ran out was taken over)}, ...}
-- An owner or lease_until of '' counts as absent (an ended lease leaves them empty).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {string.format('%d', now)}
local lease_ms = tonumber(ARGV[2])
for i = 3, #ARGV do
  local member = ARGV[i]
  local k = i - 2
  local tkey = KEYS[1 + k]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= now then
    local rec = redis.call('HMGET', tkey, 'status', 'owner', 'lease_until', 'created_member')
    local status = rec[1]
    local held_until = tonumber(rec[3] or '')  -- nil for '': no lease
    if (not status) or rec[4] ~= member then
      -- Gone (deleted by hand), or its gid now names a newer transaction: no due entry
      -- may outlive its transaction (its listing entry goes with its bucket's sweep).
      redis.call('ZREM', KEYS[1], member)
    elseif status == 'succeed' or status == 'failed' then
      -- Finished, yet due (never written so today): nothing is left to do for it.
      redis.call('ZREM', KEYS[1], member)
    elseif rec[2] and rec[2] ~= '' and held_until and held_until > now then
      -- Someone holds a live lease: look again when it runs out.
      redis.call('ZADD', KEYS[1], held_until, member)
    else
      local token = ARGV[1] .. ':' .. k
      local until_ms = now + lease_ms
      redis.call('HSET', tkey, 'owner', token, 'lease_until', string.format('%d', until_ms))
      redis.call('ZADD', KEYS[1], until_ms, member)
      out[#out + 1] = {string.sub(member, 15), token, redis.call('HGETALL', tkey),
        rec[2] or ''}
    end
  end
end
return out
