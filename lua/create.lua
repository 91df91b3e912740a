-- create
-- Store a new global transaction with its branches, unless the gid is taken.
-- KEYS[1] = transaction hash        <prefix>:trans:{pN}:<gid>
-- KEYS[2] = branches hash           <prefix>:branches:{pN}:<gid>
-- KEYS[3] = due index (zset)        <prefix>:due:{pN}
-- KEYS[4] = listing index (zset)    <prefix>:created:{pN}
-- ARGV[1] = gid
-- ARGV[2] = status to create with (prepared | submitted)
-- ARGV[3] = JSON object of further string fields for the transaction hash
-- ARGV[4] = JSON list of branch objects (each with branch_id and op), in layout order
-- ARGV[5] = ms from now until the transaction is first due
-- ARGV[6] = lease owner token, or "" to create it unowned
-- ARGV[7] = lease length in ms (when ARGV[6] is set)
-- returns {"OK", now_ms} or {"EXISTS", current_status}

local existing = redis.call('HGET', KEYS[1], 'status')
if existing then
  return {'EXISTS', existing}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = string.format('%d', now)

local fields = cjson.decode(ARGV[3])
local hset = {'gid', ARGV[1], 'status', ARGV[2], 'create_time', snow, 'update_time', snow}
for k, v in pairs(fields) do
  hset[#hset + 1] = k
  hset[#hset + 1] = v
end

local next_due = now + tonumber(ARGV[5])
hset[#hset + 1] = 'next_cron_time'
hset[#hset + 1] = string.format('%d', next_due)
local score = next_due
if ARGV[6] ~= '' then
  -- The creating instance processes the transaction itself; while its lease holds the
  -- due entry points at the lease's end, so a crash hands the work to another worker.
  score = now + tonumber(ARGV[7])
  hset[#hset + 1] = 'owner'
  hset[#hset + 1] = ARGV[6]
  hset[#hset + 1] = 'lease_until'
  hset[#hset + 1] = string.format('%d', score)
end

-- The listing index orders by creation time, then gid; members are unique per gid.
local member = string.format('%013d', now) .. ':' .. ARGV[1]
hset[#hset + 1] = 'created_member'
hset[#hset + 1] = member
redis.call('HSET', KEYS[1], unpack(hset))

local branches = cjson.decode(ARGV[4])
for i, b in ipairs(branches) do
  b['seq'] = i
  b['create_time'] = snow
  b['update_time'] = snow
  redis.call('HSET', KEYS[2], b['branch_id'] .. ':' .. b['op'], cjson.encode(b))
end

redis.call('ZADD', KEYS[3], score, ARGV[1])
redis.call('ZADD', KEYS[4], 0, member)
return {'OK', snow}
