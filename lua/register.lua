-- register
-- Add branches to a prepared transaction (tcc, xa and workflow register them at run time).
-- KEYS[1] = transaction hash; each branch is its field "branch:<branch_id>:<op>"
-- ARGV[1] = gid
-- ARGV[2] = expected statuses, comma separated (normally "prepared")
-- ARGV[3] = JSON list of branch objects (branch_id, op, url, status, data)
-- ARGV[4] = "insert" (a branch already there is left as it is: a retried registration)
--           or "unique" (a workflow step: a (branch_id, op) already recorded refuses the
--           whole call and keeps the first record, as every dtm store does, so that two
--           runs of one workflow cannot rewrite a recorded result)
-- returns {"OK", now_ms, added}, {"NOT_FOUND"}, {"CONFLICT", current_status}
--         or {"DUPLICATE", "branch_id:op"}

--!include lib_expect.lua

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'NOT_FOUND'}
end
if not status_in(ARGV[2], status) then
  return {'CONFLICT', status}
end

-- One read of the field names answers both which branches exist and how many there are
-- (the next seq); HKEYS costs one call where a check per branch costs one each.
local known = {}
local seq = 0
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(name, 1, 7) == 'branch:' then
    known[name] = true
    seq = seq + 1
  end
end

local branches = cjson.decode(ARGV[3])
if ARGV[4] == 'unique' then
  for _, b in ipairs(branches) do
    local field = b['branch_id'] .. ':' .. b['op']
    if known['branch:' .. field] then
      return {'DUPLICATE', field}
    end
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = string.format('%d', now)
local added = 0
local hset = {'update_time', snow}
for _, b in ipairs(branches) do
  local field = 'branch:' .. b['branch_id'] .. ':' .. b['op']
  if not known[field] then
    known[field] = true  -- a branch named twice in one call is added once
    seq = seq + 1
    added = added + 1
    b['seq'] = seq
    b['create_time'] = snow
    b['update_time'] = snow
    if b['status'] ~= 'prepared' then
      b['finish_time'] = snow
    end
    hset[#hset + 1] = field
    hset[#hset + 1] = cjson.encode(b)
  end
end
redis.call('HSET', KEYS[1], unpack(hset))
return {'OK', snow, added}
