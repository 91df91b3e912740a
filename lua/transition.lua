-- transition
-- Compare-and-set a transaction: check its status (and lease owner), then apply branch
-- results, field changes and an optional new status, and reschedule or finish it.
-- KEYS[1] = transaction hash (its "branch:<branch_id>:<op>" fields are the branches)
-- KEYS[2] = due index (zset): member = the listing member ("created_member"), score =
--           ms when next due; a finished transaction leaves it
-- ARGV[1] = gid
-- ARGV[2] = expected statuses, comma separated
-- ARGV[3] = owner token the caller must hold, or "" (API calls hold no lease)
-- ARGV[4] = new status, or "" to keep the current one
-- ARGV[5] = number f of string fields to set on the transaction (pairs from ARGV[11])
-- ARGV[6] = number b of branch results (triples after the fields)
-- ARGV[7] = ms from now until the transaction is next due, or "" to leave the index
-- ARGV[8] = lease mode: "renew" (caller keeps working), "release" (caller is done),
--           "acquire:<token>" (take the lease if nobody holds it), or "" (no lease)
-- ARGV[9] = lease length in ms
-- ARGV[10] = seconds a finished transaction is kept
-- ARGV[11 .. 10 + 2f] = the fields: name, value, name, value, ...
-- then b triples, one per branch result: the field "branch:<branch_id>:<op>", the
--           branch's new status, and, for a branch stored in a record of its own (one
--           registered at run time, or written by layout 4), its whole new JSON record
--           cut off right after '"update_time":"' (the script completes it with the time
--           it reads, and finish_time unless the status is "prepared"), else "". What is
--           stored decides: a branch of the spec gets a state record (status and times);
--           a record of its own gets the caller's, or, for "", the stored one changed
--           (decode, encode), so that a caller's wrong guess costs time, never data
-- returns {"OK", status, now_ms, acquired ("1"/"0")}, {"NOT_FOUND"},
--         {"CONFLICT", current_status} or {"LEASE_LOST", current_owner}

--!include lib_expect.lua

-- A field set to '' counts as absent: lease fields are emptied in the one HSET of a
-- write instead of deleted by a second command.
local function present(v)
  if v and v ~= '' then
    return v
  end
  return nil
end

-- One read of the fields this script decides on and of the branch records it changes,
-- and one HSET at the end: every redis.call costs more than the command itself.
local first_branch = 11 + 2 * tonumber(ARGV[5])
local branch_count = tonumber(ARGV[6])
-- A finishing write reads neither the lease's end nor the poke (a finished transaction
-- has no use for them): each field HMGET answers costs Lua a table element, so it asks
-- for the first 3 only.
local read = 5
if ARGV[4] == 'succeed' or ARGV[4] == 'failed' then
  read = 3
end
-- The nils make room (a table constructor sizes the table for every item it lists):
-- appending past a table's size rehashes it, here and for hset below.
local fields = {'status', 'owner', 'created_member', 'lease_until', 'poke', nil, nil, nil}
for i = 1, branch_count do
  fields[read + i] = ARGV[first_branch + 3 * i - 3]
end
local cur = redis.call('HMGET', KEYS[1], unpack(fields, 1, read + branch_count))
local status = cur[1]
if not status then
  -- Its index entries, if any, name it by a member this script cannot know; the claim
  -- and the sweep drop them once they come round.
  return {'NOT_FOUND'}
end
local member = cur[3] or ARGV[1]

if not status_in(ARGV[2], status) then
  return {'CONFLICT', status}
end

local owner = present(cur[2]) or ''
if ARGV[3] ~= '' and owner ~= ARGV[3] then
  return {'LEASE_LOST', owner}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = string.format('%d', now)

local new = status
if ARGV[4] ~= '' then
  new = ARGV[4]
end
local hset = {'status', new, 'update_time', snow, nil, nil, nil, nil, nil, nil, nil, nil,
              nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}

-- Branch results. A branch of the spec (create's) keeps only its state in its field:
-- status and times, text made here. A record of its own holds every part of the branch
-- ("branch_id" among them): the caller sends it whole but for the times, since
-- completing that text costs far less than decoding and encoding the stored one, which
-- is left for a record the caller does not hold.
local done_tail = '","finish_time":"' .. snow .. '"}'
for i = 1, branch_count do
  local raw = cur[read + i]
  local at = first_branch + 3 * i - 3
  local branch_status, head = ARGV[at + 1], ARGV[at + 2]
  local tail = '"}'
  if branch_status ~= 'prepared' then
    tail = done_tail
  end
  local record
  if not (raw and string.find(raw, '"branch_id"', 1, true)) then
    record = '{"status":"' .. branch_status .. '","update_time":"' .. snow .. tail
  elseif head ~= '' then
    record = head .. snow .. tail
  else
    local b = cjson.decode(raw)
    b['status'] = branch_status
    b['update_time'] = snow
    if branch_status ~= 'prepared' then
      b['finish_time'] = snow
    end
    record = cjson.encode(b)
  end
  hset[#hset + 1] = fields[read + i]
  hset[#hset + 1] = record
end

for i = 11, first_branch - 1 do
  hset[#hset + 1] = ARGV[i]
end

if new == 'succeed' or new == 'failed' then
  hset[#hset + 1] = (new == 'succeed') and 'finish_time' or 'rollback_time'
  hset[#hset + 1] = snow
  -- The owner is emptied (a finished transaction is held by nobody); lease_until,
  -- next_cron_time and poke are left as they were: nothing reads them once it is
  -- finished, and each emptied field costs this write an argument and its AOF text.
  local n = #hset
  hset[n + 1], hset[n + 2] = 'owner', ''
  redis.call('HSET', KEYS[1], unpack(hset))
  -- The transaction is one key, so all of it expires at the same moment. Nothing is due
  -- for it any more; its listing entry stays with its minute's bucket, which the sweep
  -- empties once the transactions in it have expired.
  redis.call('EXPIRE', KEYS[1], ARGV[10])
  redis.call('ZREM', KEYS[2], member)
  return {'OK', new, snow, '0'}
end

local lease_ms = tonumber(ARGV[9])
local mode = ARGV[8]
local acquired = '0'
local lease_until = tonumber(present(cur[4]) or '0')
local next_due = nil
if ARGV[7] ~= '' then
  next_due = now + tonumber(ARGV[7])
end

-- Scores go to ZADD as text: a Lua number would cost Redis a "%.17g" of it.
if mode == 'renew' then
  local until_ms = string.format('%d', now + lease_ms)
  hset[#hset + 1] = 'lease_until'
  hset[#hset + 1] = until_ms
  redis.call('ZADD', KEYS[2], until_ms, member)
elseif mode == 'release' then
  -- A reschedule asked for while we held the lease (resetNextCronTime) wins over ours.
  if present(cur[5]) then
    next_due = now
  end
  -- Emptied, not deleted: the one HSET below is the script's only write to the hash.
  for _, name in ipairs({'owner', 'lease_until', 'poke'}) do
    hset[#hset + 1] = name
    hset[#hset + 1] = ''
  end
  next_due = next_due or now
  redis.call('ZADD', KEYS[2], string.format('%d', next_due), member)
elseif string.sub(mode, 1, 8) == 'acquire:' then
  if owner == '' or lease_until <= now then
    local until_ms = string.format('%d', now + lease_ms)
    hset[#hset + 1] = 'owner'
    hset[#hset + 1] = string.sub(mode, 9)
    hset[#hset + 1] = 'lease_until'
    hset[#hset + 1] = until_ms
    redis.call('ZADD', KEYS[2], until_ms, member)
    acquired = '1'
  else
    -- The holder works from the old status; its release must bring this one forward.
    hset[#hset + 1] = 'poke'
    hset[#hset + 1] = '1'
  end
elseif next_due then
  -- An API call with no lease: reschedule, unless a live lease already owns the entry;
  -- then leave a note that the owner's release honours.
  if owner == '' or lease_until <= now then
    redis.call('ZADD', KEYS[2], string.format('%d', next_due), member)
  else
    hset[#hset + 1] = 'poke'
    hset[#hset + 1] = '1'
  end
end
if next_due then
  hset[#hset + 1] = 'next_cron_time'
  hset[#hset + 1] = string.format('%d', next_due)
end
redis.call('HSET', KEYS[1], unpack(hset))
return {'OK', new, snow, acquired}
