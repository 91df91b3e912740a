-- migrate_layout
-- Move one transaction's branch records from its layout-1 branch hash into its
-- transaction hash, as fields "branch:<branch_id>:<op>" (layout 2), and drop the old key.
-- The transaction hash keeps its TTL (HSET does not change it), so a finished
-- transaction still expires when it would have; a record the new layout already holds
-- is newer than the old one and is kept.
-- KEYS[1] = layout-1 branch hash     <prefix>:branches:{pN}:<gid>
-- KEYS[2] = transaction hash         <prefix>:trans:{pN}:<gid> (same slot)
-- returns 1 if records were moved, 0 if there was nothing to move (the old key is
--         deleted either way: without its transaction it has nothing to belong to)

local old = redis.call('HGETALL', KEYS[1])
if #old == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
local names = {}
for i = 1, #old, 2 do
  names[#names + 1] = 'branch:' .. old[i]
end
local present = redis.call('HMGET', KEYS[2], unpack(names))
local hset = {}
for i, name in ipairs(names) do
  if not present[i] then
    hset[#hset + 1] = name
    hset[#hset + 1] = old[2 * i]
  end
end
if #hset > 0 then
  redis.call('HSET', KEYS[2], unpack(hset))
end
redis.call('DEL', KEYS[1])
return 1
