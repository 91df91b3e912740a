-- due
-- Peek at what is due in one sorted set of a partition, by the server's clock, without
-- changing anything: the first step of claim and sweep, which then name every key they
-- touch in KEYS (a cluster node may refuse keys a script did not declare).
-- KEYS[1] = a partition's sorted set scored by ms (due index or expiry index)
-- ARGV[1] = at most this many members
-- returns {member, ...} with score <= now, lowest score first

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
