-- reset_due
-- Bring forward transactions of one partition that would otherwise wait longer than a
-- given time, so they are retried now (after an outage of a participant, say).
-- KEYS[1] = due index (zset) of the partition; its band (scores from FINISHED_BAND,
--           keys.py) holds the sweep's schedule and is left alone
-- ARGV[1] = wait threshold in ms: entries due later than now + this are reset
-- ARGV[2] = at most this many entries
-- returns {reset_count, remaining ("1" if more entries beyond the limit qualify)}

--!include lib_band.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local members = redis.call('ZRANGEBYSCORE', KEYS[1],
  '(' .. string.format('%d', now + tonumber(ARGV[1])), '(' .. string.format('%d', FINISHED_BAND),
  'LIMIT', 0, limit + 1)
local count = 0
for i, member in ipairs(members) do
  if i <= limit then
    redis.call('ZADD', KEYS[1], now, member)
    count = count + 1
  end
end
local remaining = '0'
if #members > limit then
  remaining = '1'
end
return {count, remaining}
