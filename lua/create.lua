-- create
-- Store a new global transaction with its branches, unless the gid is taken.
-- KEYS[1] = transaction hash        <prefix>:trans:{pN}:<gid> (branches are its fields)
-- KEYS[2] = due index (zset)        <prefix>:due:{pN}, member = the listing member
-- KEYS[3] = listing index (zset)    <prefix>:created:{pN}
-- ARGV[1] = gid
-- ARGV[2] = status to create with (prepared | submitted)
-- ARGV[3] = number n of further string fields for the transaction hash
-- ARGV[4] = number m of branches
-- ARGV[5] = ms from now until the transaction is first due
-- ARGV[6] = lease owner token, or "" to create it unowned
-- ARGV[7] = lease length in ms (when ARGV[6] is set)
-- ARGV[8 .. 7 + 2n] = the further fields: name, value, name, value, ...
-- ARGV[8 + 2n .. 7 + 2n + 2m] = the branches in layout order, two entries each: the field
--           name "branch:<branch_id>:<op>", then its JSON record (with "seq") cut off right
--           after '"create_time":"', which the script completes with the time it reads
--           (create_time and update_time)
-- returns {"OK", now_ms} or {"EXISTS", current_status, stored fingerprint or "", trans_type}

--!include lib_create.lua

return create_transaction(KEYS, ARGV)
