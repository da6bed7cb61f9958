-- renew.lua: a process's heartbeat; extends its leases so long requests keep them.
--
-- A crashed process stops renewing: its leases expire and their concurrency comes back
-- (expire_leases in every batch), and its heartbeat lapses.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  now override ("" in production).  ARGV[2] P.  ARGV[3] process id.
-- ARGV[4]  lease_ttl_s.  ARGV[5] heartbeat_ttl_s.  ARGV[6] key_ttl_s (T, keys.py).
-- ARGV[7]  1: the process may keep concurrency slots (THROTTLE_KEEP_SLOTS) until this
--          heartbeat lapses: it is in P:pl (its name in P:pn) until then, told when
--          someone starts waiting (store.lua's call.signal_waiting), and told at once if
--          someone waits as it is registered anew; 0: not.
-- ARGV[8..] lease ids held.
-- Returns {the number of live processes (heartbeats not yet expired), the epoch of the
-- budget's state ("" if it has none: it expired unused, or Redis lost it), one character
-- per lease id: 1 if Redis had that lease, else 0; then 1 if a lease lapsed, to be
-- expired by a tick from the caller, else 0}.
--
-- A live process keeps P:procs from expiring, and while it holds leases, the keys they are
-- counted in: a request may run longer than T without a batch call in between.

init(ARGV[2], ARGV[1], ARGV[3])
local expiry = num(now + tonumber(ARGV[4]))
local ttl = math.floor(tonumber(ARGV[6]) * MS_PER_S)
local renewed = {}  -- per lease: '1' if Redis had it (the process's `_reclaim` trusts it)
-- (A lease is its member in P:leases: store.lua's put_lease. In chunks: TUNING.UNPACK_MAX.)
for first = 8, #ARGV, TUNING.UNPACK_MAX do
  local ids, pairs_ = {}, {}
  for i = first, math.min(#ARGV, first + TUNING.UNPACK_MAX - 1) do
    ids[#ids + 1] = ARGV[i]
    pairs_[#pairs_ + 1] = expiry; pairs_[#pairs_ + 1] = ARGV[i]
  end
  local had = redis.call('ZMSCORE', K.leases, unpack(ids))
  for i = 1, #ids do
    if had[i] then renewed[#renewed + 1] = '1' else renewed[#renewed + 1] = '0' end
  end
  redis.call('ZADD', K.leases, 'XX', unpack(pairs_))
end
if #ARGV >= 8 then
  redis.call('PEXPIRE', K.leases, ttl)
  redis.call('PEXPIRE', K.lease_costs, ttl)
  redis.call('PEXPIRE', K.state, ttl)
end
redis.call('ZREMRANGEBYSCORE', K.procs, '-inf', num(now))
local beat = now + tonumber(ARGV[5])
redis.call('ZADD', K.procs, num(beat), proc)
redis.call('PEXPIRE', K.procs, ttl)
-- Registrations in P:pl that lapsed (a process gone without leave.lua: killed, or cut off)
-- are dropped with their names in P:pn, TUNING.SIGNAL_BATCH a heartbeat at most: a crashed
-- fleet's names do not pile up in keys the live processes keep alive, and a process that
-- registers again after its own lapsed is registered anew (told below if someone waits).
-- (P:pl's anchor, score 0, is not among them.) Its own registration lapsed counts as none
-- (below), dropped here or not: with more lapsed than the batch, its own may be left.
local lapsed = redis.call('ZRANGEBYSCORE', K.pools, '(0', '(' .. num(now), 'LIMIT', 0,
  TUNING.SIGNAL_BATCH)
if #lapsed > 0 then
  redis.call('ZREM', K.pools, unpack(lapsed))
  redis.call('ZREM', K.pools_names, unpack(lapsed))
end
if ARGV[7] == '1' then
  -- Registered anew (its first heartbeat, or one after its registration lapsed) while
  -- someone waits: the signal of that opening (store.lua's call.signal_waiting) may have
  -- gone out before this process was in P:pl, with a slot it kept meanwhile: told now.
  -- Its name in P:pn with its first registration (store.lua's call.signal_next walks it).
  local mine = tonumber(redis.call('ZSCORE', K.pools, proc))
  redis.call('ZADD', K.pools, 'GT', num(beat), proc)
  if mine == nil or mine < now then
    redis.call('ZADD', K.pools_names, 0, proc)
    if (tonumber(redis.call('HGET', K.state, 'waiting')) or 0) > 0 then
      local grants = K.prefix .. KEY.grants .. proc
      redis.call('RPUSH', grants, MESSAGE.waiting)
      redis.call('PEXPIRE', grants, ttl)
    end
  end
  redis.call('PEXPIRE', K.pools, ttl)
  redis.call('PEXPIRE', K.pools_names, ttl)
end
local live = redis.call('ZCARD', K.procs)
local state = redis.call('HMGET', K.state, 'ep', 'inflight')
local ep = state[1] or ''
-- A lease that lapsed (its process died, SIGKILL: no leave): a tick expires it and
-- dispatches. Nothing else may: the fleet's tick chain may have died with that process (it
-- claimed the tick, and a survivor without a request queued of its own was told of none:
-- no call of its own since), and with nobody waiting no tick is due at all (the budget
-- would show the slot held until the next arrival). So each heartbeat asks. (P:leases'
-- anchor, score +inf, is never first while a lease is there.)
local tick = '0'
if (tonumber(state[2]) or 0) > 0 then
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  if #first > 0 and first[1] ~= TUNING.LEASE_ANCHOR and tonumber(first[2]) <= now then
    tick = '1'
  end
end
call.beat_seen(proc, beat, ep)  -- (batch.lua need not ask for it: store.lua's call.heartbeat)
return {live, ep, table.concat(renewed), tick}
