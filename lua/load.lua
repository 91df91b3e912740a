-- load
-- Read a transaction with its branches (fields of the same hash) in one snapshot.
-- KEYS[1] = transaction hash
-- returns {field, value, ...}: transaction and "branch:<branch_id>:<op>" fields (empty
--         if absent)

return redis.call('HGETALL', KEYS[1])
