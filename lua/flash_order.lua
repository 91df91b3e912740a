-- flash_order
-- The order service's branch: create the order for one purchase exactly once, behind a
-- barrier, however often the coordinator delivers the message.
-- KEYS[1] = orders hash             flash:orders:{pN}:<item>, field = gid
-- KEYS[2] = barrier of this branch  flash:barrier:{pN}:<gid>-<branch_id>-action-01
-- ARGV[1] = gid
-- ARGV[2] = the order (JSON)
-- ARGV[3] = seconds to keep the barrier record
-- returns "CREATED" or "DUPLICATE" (already created: a repeated delivery, skipped)

if redis.call('SET', KEYS[2], 'action', 'NX', 'EX', tonumber(ARGV[3])) == false then
  return 'DUPLICATE'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 'CREATED'
