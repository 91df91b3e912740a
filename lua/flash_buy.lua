-- flash_buy
-- A flash-sale purchase in one atomic step: check and deduct the stock, record the
-- two-phase message's barrier, and create the message as submitted, so that the
-- coordinator creates the order. A sold-out request costs this one call and nothing else.
-- KEYS[1 .. 5] = as create.lua (transaction hash, due index, the two listing buckets,
--           the index of buckets)
-- KEYS[6] = stock counter           e.g. flash:stock:{pN}:<item>, same slot as KEYS[1]
-- KEYS[7] = barrier of the message  flash:barrier:{pN}:<gid>-00-msg-01
-- ARGV[1 .. 10 + 2n] = as create.lua (gid, "submitted", n fields, due ms, owner, lease
--           ms, the listing buckets' minute and labels, the finished TTL in ms, then the
--           fields' pairs)
-- ARGV[11 + 2n] = units to buy
-- ARGV[12 + 2n] = seconds to keep the barrier record
-- returns {"OK", now_ms, "1" if it registered the listing bucket else "", stock_left},
--         {"SOLD_OUT", stock_left},
--         {"EXISTS", status, fingerprint, trans_type} or {"SKEW", now_ms} (as create.lua)

--!include lib_band.lua
--!include lib_create.lua

-- This script's own arguments follow create's, whose count depends on the transaction.
local own = 11 + 2 * tonumber(ARGV[3])
local amount = tonumber(ARGV[own])
local stock = tonumber(redis.call('GET', KEYS[6]) or '0')
if stock < amount then
  return {'SOLD_OUT', stock}
end
local created = create_transaction(KEYS, ARGV)
if created[1] ~= 'OK' then
  return created
end
redis.call('DECRBY', KEYS[6], amount)
-- The local transaction (the deduction) is committed together with the message, so a
-- back-check, should one ever be needed, finds the barrier and answers success.
redis.call('SET', KEYS[7], 'committed', 'EX', tonumber(ARGV[own + 1]))
return {'OK', created[2], created[3], stock - amount}
