-- register
-- Add branches to a prepared transaction (tcc, xa and workflow register them at run time).
-- KEYS[1] = transaction hash; a branch registered here is its field
--           "branch:<branch_id>:<op>" (a whole record); those of the spec count as there
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

local cur = redis.call('HMGET', KEYS[1], 'status', 'spec')
local status = cur[1]
if not status then
  return {'NOT_FOUND'}
end
if not status_in(ARGV[2], status) then
  return {'CONFLICT', status}
end

-- The branches there are, and how many (the next seq): those of the spec (a saga's or
-- a msg's, created with it; only such a spec has the key "branches"), then the fields
-- of the others. One HKEYS answers for every field, where a check per branch costs a
-- call each; a spec branch whose state has a field is counted once.
local known = {}
local seq = 0
if cur[2] and string.find(cur[2], '"branches":', 1, true) then
  local ok, spec = pcall(cjson.decode, cur[2])
  if not ok then
    return redis.error_reply('the spec of ' .. ARGV[1] .. ' cannot be read')
  end
  for _, b in ipairs(spec['branches'] or {}) do
    known['branch:' .. b['branch_id'] .. ':' .. b['op']] = true
    seq = seq + 1
  end
end
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(name, 1, 7) == 'branch:' and not known[name] then
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
