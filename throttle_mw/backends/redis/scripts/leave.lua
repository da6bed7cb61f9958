-- leave.lua: a process shuts down and leaves nothing of its own behind.
--
-- The process has already cancelled its waiters and released its leases through
-- batch.lua; this removes its grant list, its recent-admissions list, its heartbeat and
-- its entries in P:pl and P:pn: it holds no pool any more, nobody tells it that someone
-- waits.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  P.  ARGV[2] process id.
-- Returns 1.

init(ARGV[1], '', ARGV[2])
redis.call('DEL', K.prefix .. KEY.grants .. proc, K.prefix .. KEY.recent .. proc)
redis.call('ZREM', K.procs, proc)
redis.call('ZREM', K.pools, proc)
redis.call('ZREM', K.pools_names, proc)
if K.beats ~= nil then K.beats[proc] = nil end  -- (store.lua's call.heartbeat asks again)
return 1
