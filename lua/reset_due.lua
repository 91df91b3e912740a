-- reset_due
-- Bring forward transactions of one partition that would otherwise wait longer than a
-- given time, so they are retried now (after an outage of a participant, say).
-- KEYS[1] = due index (zset) of the partition
-- ARGV[1] = wait threshold in ms: entries due later than now + this are reset
-- ARGV[2] = at most this many entries
-- returns {reset_count, remaining ("1" if more entries beyond the limit qualify)}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local gids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now + tonumber(ARGV[1])), '+inf',
  'LIMIT', 0, limit + 1)
local count = 0
for i, gid in ipairs(gids) do
  if i <= limit then
    redis.call('ZADD', KEYS[1], now, gid)
    count = count + 1
  end
end
local remaining = '0'
if #gids > limit then
  remaining = '1'
end
return {count, remaining}
