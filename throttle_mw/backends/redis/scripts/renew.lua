-- renew.lua: a process's heartbeat; extends its leases so long requests keep them.
--
-- A crashed process stops renewing: its leases expire and their concurrency comes back
-- (expire_leases in every batch), and its heartbeat lapses.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  now override ("" in production).  ARGV[2] P.  ARGV[3] process id.
-- ARGV[4]  lease_ttl_s.  ARGV[5] heartbeat_ttl_s.  ARGV[6] key_ttl_s (T, keys.py).
-- ARGV[7..] lease ids held.
-- Returns the number of live processes (heartbeats not yet expired).
--
-- A live process keeps P:procs from expiring, and while it holds leases, the keys they are
-- counted in: a request may run longer than T without a batch call in between.

init(ARGV[2], ARGV[1], ARGV[3])
local expiry = num(now + tonumber(ARGV[4]))
local ttl = math.floor(tonumber(ARGV[6]) * MS_PER_S)
for i = 7, #ARGV do
  redis.call('ZADD', K.leases, 'XX', expiry, ARGV[i])
end
if #ARGV >= 7 then
  redis.call('PEXPIRE', K.leases, ttl)
  redis.call('PEXPIRE', K.lease_costs, ttl)
  redis.call('PEXPIRE', K.state, ttl)
end
redis.call('ZREMRANGEBYSCORE', K.procs, '-inf', num(now))
redis.call('ZADD', K.procs, num(now + tonumber(ARGV[5])), proc)
redis.call('PEXPIRE', K.procs, ttl)
return redis.call('ZCARD', K.procs)
