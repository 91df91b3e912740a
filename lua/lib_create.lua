-- lib_create (a library, not a script: other scripts include it with "--!include")
-- Defines create_transaction(K, A), with K and A laid out as KEYS and ARGV of create.lua.
-- Shared so that a participant's script (the flash sale's buy) creates a transaction in
-- exactly the coordinator's format, atomically with its own change.

local function create_transaction(K, A)
  local existing = redis.call('HMGET', K[1], 'status', 'fingerprint', 'trans_type')
  if existing[1] then
    -- The stored content's fingerprint lets the caller tell a repeated request from a
    -- gid reused for other content; its type, a submit of another type from one that
    -- may move a prepared transaction on.
    return {'EXISTS', existing[1], existing[2] or '', existing[3] or ''}
  end

  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local snow = string.format('%d', now)

  -- The further fields arrive as field/value pairs: unpack copies them in C, where
  -- decoding a JSON object of them cost more than the HSET.
  local first_branch = 8 + 2 * tonumber(A[3])
  local hset = {'gid', A[1], 'status', A[2], 'create_time', snow, 'update_time', snow,
                unpack(A, 8, first_branch - 1)}

  -- Scores go to ZADD as text: a Lua number would cost Redis a "%.17g" of it.
  local score = string.format('%d', now + tonumber(A[5]))
  local n = #hset
  hset[n + 1] = 'next_cron_time'
  hset[n + 2] = score
  if A[6] ~= '' then
    -- The creating instance processes the transaction itself; while its lease holds the
    -- due entry points at the lease's end, so a crash hands the work to another worker.
    score = string.format('%d', now + tonumber(A[7]))
    hset[n + 3] = 'owner'
    hset[n + 4] = A[6]
    hset[n + 5] = 'lease_until'
    hset[n + 6] = score
  end

  -- The listing index orders by creation time, then gid; members are unique per gid.
  -- The due index uses the same member, so that one entry of it can find the other.
  local member = string.format('%013d', now) .. ':' .. A[1]
  hset[#hset + 1] = 'created_member'
  hset[#hset + 1] = member

  -- Each record arrives as JSON cut off where the creation time goes (see the header):
  -- completing the text costs far less than decoding and encoding every record. The
  -- branches are fields of the same hash, so one write stores everything: each
  -- redis.call has a fixed cost of its own.
  local ends = snow .. '","update_time":"' .. snow .. '"}'
  n = #hset
  for i = first_branch, first_branch + 2 * tonumber(A[4]) - 2, 2 do
    hset[n + 1] = A[i]
    hset[n + 2] = A[i + 1] .. ends
    n = n + 2
  end
  redis.call('HSET', K[1], unpack(hset))

  redis.call('ZADD', K[2], score, member)
  redis.call('ZADD', K[3], '0', member)
  return {'OK', snow}
end
