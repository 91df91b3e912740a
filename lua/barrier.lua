-- barrier
-- The sub-transaction barrier for a participant whose data is an integer in Redis (stock,
-- a balance): the barrier check and the amount change happen in one atomic step.
-- KEYS[1] = the business key, an integer amount
-- KEYS[2] = this call's barrier key, "<prefix><gid>-<branch_id>-<op>-<barrier_id>"
-- KEYS[3] = the origin op's barrier key (cancel -> try, compensate/rollback -> action);
--           pass KEYS[2] again when ARGV[2] is empty
-- ARGV[1] = amount to add (negative to deduct)
-- ARGV[2] = the origin op, or "" when the current op is not a compensation
-- ARGV[3] = seconds the barrier keys live
-- ARGV[4] = the current op, stored as the barrier keys' value (the SQL "reason")
-- returns "DUPLICATE"          this call's key exists: a repeat, or a forward op arriving
--                              after its compensation (hanging); nothing changes
--         "NULL_COMPENSATION"  a compensation whose forward op never ran; both keys are
--                              written so a late forward op is refused; amount untouched
--         "FAILURE"            the business key is missing or the amount would go below
--                              0; nothing written (the business says no)
--         "BAD_VALUE"          the business key does not hold an integer; nothing written
--         "APPLIED"            the amount was changed and this call's key written
-- Every check runs before the first write: Redis does not undo a script's writes when a
-- later command in it fails.

if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'DUPLICATE'
end
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' and redis.call('SET', KEYS[3], ARGV[4], 'NX', 'EX', ttl) then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ttl)
  return 'NULL_COMPENSATION'
end
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 'FAILURE'
end
local value = tonumber(raw)
if value == nil or value ~= math.floor(value) then
  return 'BAD_VALUE'
end
local amount = tonumber(ARGV[1])
if value + amount < 0 then
  return 'FAILURE'
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ttl)
redis.call('INCRBY', KEYS[1], amount)
return 'APPLIED'
