-- topic
-- Subscribe a URL to a message topic, or unsubscribe it.
-- KEYS[1] = topics hash, field = topic name, value = JSON {"v": "<subscribers JSON>", "version": n}
-- ARGV[1] = "subscribe" or "unsubscribe"
-- ARGV[2] = topic name
-- ARGV[3] = subscriber URL
-- ARGV[4] = remark (subscribe only)
-- returns {"OK", version}, {"EXISTS"} (URL already subscribed), {"NOT_FOUND"} (no such
-- topic or URL)

local raw = redis.call('HGET', KEYS[1], ARGV[2])
local subs = {}
local version = 0
if raw then
  local rec = cjson.decode(raw)
  subs = cjson.decode(rec['v'])
  version = tonumber(rec['version'])
end

local kept = {}
local found = false
for _, s in ipairs(subs) do
  if s['url'] == ARGV[3] then
    found = true
  else
    kept[#kept + 1] = s
  end
end

if ARGV[1] == 'subscribe' then
  if found then
    return {'EXISTS'}
  end
  kept[#kept + 1] = {url = ARGV[3], remark = ARGV[4]}
elseif not found then
  return {'NOT_FOUND'}
end

-- cjson writes an empty table as {}, but the subscriber list must stay a JSON list.
local encoded = '[]'
if #kept > 0 then
  encoded = cjson.encode(kept)
end
version = version + 1
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode({v = encoded, version = version}))
return {'OK', version}
