-- claim
-- Lease up to N due transactions of one partition to a worker and return their records.
-- KEYS[1] = due index (zset) of the partition, score = ms when due
-- ARGV[1] = transaction key prefix of the partition (the gid is appended)
-- ARGV[2] = branches key prefix of the partition
-- ARGV[3] = at most this many transactions
-- ARGV[4] = owner token prefix; each claim gets "<prefix>:<n>" (n = 1..N in this call)
-- ARGV[5] = lease length in ms
-- returns {now_ms, {gid, token, {trans field, value, ...}, {branch key, json, ...},
--          previous owner ('' unless a lease that ran out was taken over)}, ...}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {string.format('%d', now)}
local lease_ms = tonumber(ARGV[5])
local gids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for i, gid in ipairs(gids) do
  local tkey = ARGV[1] .. gid
  local rec = redis.call('HMGET', tkey, 'status', 'owner', 'lease_until')
  local status = rec[1]
  if (not status) or status == 'succeed' or status == 'failed' then
    -- Finished or expired: the entry must not outlive the transaction.
    redis.call('ZREM', KEYS[1], gid)
  elseif rec[2] and rec[2] ~= '' and tonumber(rec[3] or '0') > now then
    -- Someone holds a live lease: look again when it runs out.
    redis.call('ZADD', KEYS[1], tonumber(rec[3]), gid)
  else
    local token = ARGV[4] .. ':' .. i
    local until_ms = now + lease_ms
    redis.call('HSET', tkey, 'owner', token, 'lease_until', string.format('%d', until_ms))
    redis.call('ZADD', KEYS[1], until_ms, gid)
    out[#out + 1] = {gid, token, redis.call('HGETALL', tkey),
      redis.call('HGETALL', ARGV[2] .. gid), rec[2] or ''}
  end
end
return out
