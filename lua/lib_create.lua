-- lib_create (a library, not a script: other scripts include it with "--!include")
-- Defines create_transaction(K, A), with K and A laid out as KEYS and ARGV of create.lua.
-- Shared so that a participant's script (the flash sale's buy) creates a transaction in
-- exactly the coordinator's format, atomically with its own change. Needs lib_band.

local function create_transaction(K, A)
  -- EXISTS first: for the usual new gid its integer reply costs Lua less than the
  -- array HMGET answers.
  if redis.call('EXISTS', K[1]) == 1 then
    local existing = redis.call('HMGET', K[1], 'status', 'fingerprint', 'trans_type')
    if existing[1] then
      -- The stored content's fingerprint lets the caller tell a repeated request from a
      -- gid reused for other content; its type, a submit of another type from one that
      -- may move a prepared transaction on.
      return {'EXISTS', existing[1], existing[2] or '', existing[3] or ''}
    end
  end

  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local snow = string.format('%d', now)

  -- The listing bucket is the one of the server's minute; the caller named the two
  -- around its own estimate of it (a key must be named to be touched on a cluster).
  local minute = math.floor(now / 60000)
  local bucket, label
  local first = tonumber(A[8])
  if minute == first then
    bucket, label = K[3], A[9]
  elseif minute == first + 1 then
    bucket, label = K[4], A[10]
  else
    return {'SKEW', snow}
  end

  -- Scores go to ZADD as text: a Lua number would cost Redis a "%.17g" of it.
  local next_due = string.format('%d', now + tonumber(A[5]))
  -- The listing orders by creation time, then gid; members are unique per gid. The due
  -- index uses the same member, so that one entry of it can find the other.
  local member = string.format('%013d', now) .. ':' .. A[1]

  -- The further fields and the branches arrive as field/value pairs, one after the
  -- other: one unpack copies them all in C (decoding a JSON object of them cost more
  -- than the HSET), into a table made at its full size (appending past a table's size
  -- rehashes it). The branches are fields of the same hash, so one write stores
  -- everything: each redis.call has a fixed cost of its own.
  local last = 11 + 2 * (tonumber(A[3]) + tonumber(A[4]))
  local score = next_due
  local hset
  if A[6] ~= '' then
    -- The creating instance processes the transaction itself; while its lease holds the
    -- due entry points at the lease's end, so a crash hands the work to another worker.
    score = string.format('%d', now + tonumber(A[7]))
    hset = {'gid', A[1], 'status', A[2], 'create_time', snow, 'update_time', snow,
            'next_cron_time', next_due, 'created_member', member, 'owner', A[6],
            'lease_until', score, unpack(A, 12, last)}
  else
    hset = {'gid', A[1], 'status', A[2], 'create_time', snow, 'update_time', snow,
            'next_cron_time', next_due, 'created_member', member, unpack(A, 12, last)}
  end

  -- Each record arrives as JSON cut off where the creation time goes (see the header):
  -- completing the text costs far less than decoding and encoding every record.
  local ends = snow .. '","update_time":"' .. snow .. '"}'
  local n = #hset
  for i = n - 2 * tonumber(A[4]) + 2, n, 2 do
    hset[i] = hset[i] .. ends
  end
  redis.call('HSET', K[1], unpack(hset))

  redis.call('ZADD', K[2], score, member)
  redis.call('ZADD', bucket, '0', member)
  local registered = ''
  if label ~= '' then
    -- The caller has not seen this bucket registered lately: enter it in the index of
    -- buckets, and in the sweep's schedule for when the first of its transactions may
    -- have expired (NX: a later registration must not put off a look planned earlier).
    redis.call('ZADD', K[5], minute, label)
    redis.call('ZADD', K[2], 'NX', string.format('%d', FINISHED_BAND + now + tonumber(A[11])),
               label)
    registered = '1'
  end
  return {'OK', snow, registered}
end
