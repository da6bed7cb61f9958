-- release.lua: one lease given back, alone in its call (batch.lua's most common call: a
-- request done, nothing else ready in its process), with fewer arguments and, most
-- often, a one-line reply.
--
-- fast.lua's lean_release takes the lease out when nobody waits and the state is of the
-- epoch the caller knew: then the reply is REPLY.released alone, without batch.lua's
-- trailer (no tick is due while nobody waits; the caller knows the epoch; the live
-- processes and the limits in force reach it with its next acquire's reply). Wherever
-- lean_release gives up, batch.lua runs the same release in the same call, on the same
-- clock, from what lean_release read (ARGV.lean_read): the same decisions and state as a
-- batch.lua call of that one operation, and its reply (the line, then the trailer).
--
-- KEYS[1]  P:s (as batch.lua).
-- ARGV[1]  now, in seconds: "" in production (Redis TIME is used); tests only.
-- ARGV[2]  P, the key prefix including its hash tag.
-- ARGV[3]  this process's id; ARGV[4] the limits and the policy (batch.lua's ARGV[4]);
--          ARGV[5] the epoch the caller knew ("" if none): batch.lua's ARGV[3..5], which
--          only its full call reads.
-- ARGV[6]  the request id whose lease is given back (idempotent).
-- Returns REPLY.released, or batch.lua's reply to OP.release (protocol.split_reply).

start(ARGV[2], ARGV[1])
local id = ARGV[6]
local read = nil  -- (batch.lua's ARGV.lean_read: nil, not tried)
if not call.left_waiting(ARGV[2]) then
  local done, vals = lean_release(id, nil, ARGV[5])
  if done then return REPLY.released end
  read = vals or false
end
return call.entry.batch(KEYS, {now, ARGV[2], ARGV[3], ARGV[4], ARGV[5], '1',
  OP.release .. SEP .. id, lean_read = read})
