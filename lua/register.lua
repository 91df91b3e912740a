-- register
-- Add branches to a prepared transaction (tcc, xa and workflow register them at run time).
-- KEYS[1] = transaction hash
-- KEYS[2] = branches hash
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

local branches = cjson.decode(ARGV[3])
if ARGV[4] == 'unique' then
  for _, b in ipairs(branches) do
    local field = b['branch_id'] .. ':' .. b['op']
    if redis.call('HEXISTS', KEYS[2], field) == 1 then
      return {'DUPLICATE', field}
    end
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = string.format('%d', now)
local seq = redis.call('HLEN', KEYS[2])
local added = 0
for _, b in ipairs(branches) do
  local field = b['branch_id'] .. ':' .. b['op']
  if redis.call('HEXISTS', KEYS[2], field) == 0 then
    seq = seq + 1
    added = added + 1
    b['seq'] = seq
    b['create_time'] = snow
    b['update_time'] = snow
    if b['status'] ~= 'prepared' then
      b['finish_time'] = snow
    end
    redis.call('HSET', KEYS[2], field, cjson.encode(b))
  end
end
redis.call('HSET', KEYS[1], 'update_time', snow)
return {'OK', snow, added}
