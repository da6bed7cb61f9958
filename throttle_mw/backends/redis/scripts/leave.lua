-- leave.lua: a process shuts down and leaves nothing of its own behind.
--
-- The process has already cancelled its waiters and released its leases through
-- batch.lua; this removes its grant list, its recent-admissions list and its
-- heartbeat.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  P.  ARGV[2] process id.
-- Returns 1.

local prefix, p = ARGV[1], ARGV[2]
redis.call('DEL', prefix .. ':g:' .. p, prefix .. ':rc:' .. p)
redis.call('ZREM', prefix .. ':procs', p)
return 1
