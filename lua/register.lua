-- register
-- Add branches to a prepared transaction (tcc, xa and workflow register them at run time).
-- KEYS[1] = transaction hash
-- KEYS[2] = branches hash
-- ARGV[1] = gid
-- ARGV[2] = expected statuses, comma separated (normally "prepared")
-- ARGV[3] = JSON list of branch objects (branch_id, op, url, status, data)
-- ARGV[4] = "insert" (a branch already there is left as it is: a retried registration)
--           or "upsert" (a workflow step's newer result replaces the older one)
-- returns {"OK", now_ms, added}, {"NOT_FOUND"} or {"CONFLICT", current_status}

--!include lib_expect.lua

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'NOT_FOUND'}
end
if not status_in(ARGV[2], status) then
  return {'CONFLICT', status}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = string.format('%d', now)
local seq = redis.call('HLEN', KEYS[2])
local added = 0
for _, b in ipairs(cjson.decode(ARGV[3])) do
  local field = b['branch_id'] .. ':' .. b['op']
  local raw = redis.call('HGET', KEYS[2], field)
  if not raw then
    seq = seq + 1
    added = added + 1
    b['seq'] = seq
    b['create_time'] = snow
    b['update_time'] = snow
    if b['status'] ~= 'prepared' then
      b['finish_time'] = snow
    end
    redis.call('HSET', KEYS[2], field, cjson.encode(b))
  elseif ARGV[4] == 'upsert' then
    local old = cjson.decode(raw)
    old['status'] = b['status']
    old['data'] = b['data']
    old['update_time'] = snow
    if b['status'] ~= 'prepared' then
      old['finish_time'] = snow
    end
    redis.call('HSET', KEYS[2], field, cjson.encode(old))
  end
end
redis.call('HSET', KEYS[1], 'update_time', snow)
return {'OK', snow, added}
