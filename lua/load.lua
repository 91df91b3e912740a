-- load
-- Read a transaction and its branches as one consistent snapshot.
-- KEYS[1] = transaction hash
-- KEYS[2] = branches hash
-- returns {{trans field, value, ...}, {branch key, json, ...}} (empty lists if absent)

return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
