-- flash_buy
-- A flash-sale purchase in one atomic step: check and deduct the stock, record the
-- two-phase message's barrier, and create the message as submitted, so that the
-- coordinator creates the order. A sold-out request costs this one call and nothing else.
-- KEYS[1] = transaction hash        (as create.lua)
-- KEYS[2] = due index               (as create.lua)
-- KEYS[3] = listing index           (as create.lua)
-- KEYS[4] = stock counter           e.g. flash:stock:{pN}:<item>, same slot as KEYS[1]
-- KEYS[5] = barrier of the message  flash:barrier:{pN}:<gid>-00-msg-01
-- ARGV[1 .. 7 + 2n + 2m] = as create.lua (gid, "submitted", n fields, m branches, due ms,
--           owner, lease ms, then the fields' and the branches' pairs)
-- ARGV[8 + 2n + 2m] = units to buy
-- ARGV[9 + 2n + 2m] = seconds to keep the barrier record
-- returns {"OK", now_ms, stock_left}, {"SOLD_OUT", stock_left} or {"EXISTS", status, fingerprint, trans_type}

--!include lib_create.lua

-- This script's own arguments follow create's, whose count depends on the transaction.
local own = 8 + 2 * (tonumber(ARGV[3]) + tonumber(ARGV[4]))
local amount = tonumber(ARGV[own])
local stock = tonumber(redis.call('GET', KEYS[4]) or '0')
if stock < amount then
  return {'SOLD_OUT', stock}
end
local created = create_transaction(KEYS, ARGV)
if created[1] ~= 'OK' then
  return created
end
redis.call('DECRBY', KEYS[4], amount)
-- The local transaction (the deduction) is committed together with the message, so a
-- back-check, should one ever be needed, finds the barrier and answers success.
redis.call('SET', KEYS[5], 'committed', 'EX', tonumber(ARGV[own + 1]))
return {'OK', created[2], stock - amount}
