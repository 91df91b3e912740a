-- create
-- Store a new global transaction with its branches, unless the gid is taken.
-- KEYS[1] = transaction hash        <prefix>:trans:{pN}:<gid> (branches are its fields)
-- KEYS[2] = due index (zset)        <prefix>:due:{pN}, member = the listing member
-- KEYS[3] = listing index (zset)    <prefix>:created:{pN}
-- ARGV[1] = gid
-- ARGV[2] = status to create with (prepared | submitted)
-- ARGV[3] = number n of further string fields for the transaction hash, given as
--           field/value pairs in ARGV[8 .. 7 + 2n]
-- ARGV[4] = the branches in layout order, two lines each: the field name
--           "branch:<branch_id>:<op>", then its JSON record (with "seq") cut off right after
--           '"create_time":"', which the script completes with the time it reads
--           (create_time and update_time)
-- ARGV[5] = ms from now until the transaction is first due
-- ARGV[6] = lease owner token, or "" to create it unowned
-- ARGV[7] = lease length in ms (when ARGV[6] is set)
-- ARGV[8 .. 7 + 2n] = the further fields of ARGV[3]: field, value, field, value, ...
-- returns {"OK", now_ms} or {"EXISTS", current_status, stored fingerprint or "", trans_type}

--!include lib_create.lua

return create_transaction(KEYS, ARGV)
