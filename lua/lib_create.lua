-- lib_create (a library, not a script: other scripts include it with "--!include")
-- Defines create_transaction(K, A), with K and A laid out as KEYS and ARGV of create.lua.
-- Shared so that a participant's script (the flash sale's buy) creates a transaction in
-- exactly the coordinator's format, atomically with its own change. Needs lib_band.

local function create_transaction(K, A)
  -- EXISTS first: for the usual new gid its integer reply costs Lua less than the
  -- array HMGET answers.
  if redis.call('EXISTS', K[1]) == 1 then
    -- A field of its own wins over the spec's value: a submit after a prepare writes
    -- its fingerprint so, and layout 4 kept every value so.
    local existing = redis.call('HMGET', K[1], 'status', 'spec', 'fingerprint', 'trans_type')
    if existing[1] then
      -- The stored content's fingerprint lets the caller tell a repeated request from a
      -- gid reused for other content; its type, a submit of another type from one that
      -- may move a prepared transaction on.
      local fingerprint, trans_type = existing[3], existing[4]
      if existing[2] and not (fingerprint and trans_type) then
        -- A spec damaged by hand says nothing; the answer is still EXISTS.
        local ok, spec = pcall(cjson.decode, existing[2])
        if ok and type(spec) == 'table' then
          fingerprint = fingerprint or spec['fingerprint']
          trans_type = trans_type or spec['trans_type']
        end
      end
      return {'EXISTS', existing[1], fingerprint or '', trans_type or ''}
    end
  end

  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local snow = string.format('%d', now)

  -- The listing bucket is the one of the server's minute; the caller named the two
  -- around its own estimate of it (a key must be named to be touched on a cluster).
  local minute = math.floor(now / 60000)
  local bucket, label
  local first = tonumber(A[7])
  if minute == first then
    bucket, label = K[3], A[8]
  elseif minute == first + 1 then
    bucket, label = K[4], A[9]
  else
    return {'SKEW', snow}
  end

  -- Scores go to ZADD as text: a Lua number would cost Redis a "%.17g" of it.
  local next_due = string.format('%d', now + tonumber(A[4]))
  -- The listing orders by creation time, then gid; members are unique per gid. The due
  -- index uses the same member, so that one entry of it can find the other.
  local member = string.format('%013d', now) .. ':' .. A[1]

  -- The further fields (the transaction as sent, in "spec") arrive as field/value
  -- pairs: one unpack copies them in C into a table made at its full size (appending
  -- past a table's size rehashes it). update_time is left out until something changes:
  -- it reads as create_time. Every field costs the argument's conversion, the hash
  -- entry and its AOF text, so a transaction is written in as few as its reads allow.
  local last = 10 + 2 * tonumber(A[3])
  local score = next_due
  local hset
  if A[5] ~= '' then
    -- The creating instance processes the transaction itself; while its lease holds the
    -- due entry points at the lease's end, so a crash hands the work to another worker.
    score = string.format('%d', now + tonumber(A[6]))
    hset = {'gid', A[1], 'status', A[2], 'create_time', snow, 'next_cron_time', next_due,
            'created_member', member, 'owner', A[5], 'lease_until', score,
            unpack(A, 11, last)}
  else
    hset = {'gid', A[1], 'status', A[2], 'create_time', snow, 'next_cron_time', next_due,
            'created_member', member, unpack(A, 11, last)}
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
    redis.call('ZADD', K[2], 'NX', string.format('%d', FINISHED_BAND + now + tonumber(A[10])),
               label)
    registered = '1'
  end
  return {'OK', snow, registered}
end
