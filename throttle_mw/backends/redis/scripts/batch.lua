-- batch.lua: apply a batch of acquire / release / cancel / tick operations atomically.
--
-- One call carries every operation a process has ready, so concurrent requests
-- share one round trip. Operations run in order, exactly as the in-memory
-- scheduler would run them one by one; grants and evictions for requests waiting
-- in other processes go onto those processes' lists (P:g:<proc>). Every call makes
-- sure the caller has a heartbeat: a waiter's process was alive when it queued, and a
-- waiter whose process has stopped beating since is dropped rather than granted.
--
-- KEYS[1]  P:s, the budget's state hash (routes the call in Redis Cluster; every
--          other key shares its hash tag and is derived from ARGV[2]).
-- ARGV[1]  now, in seconds: "" in production (Redis TIME is used); tests only.
-- ARGV[2]  P, the key prefix including its hash tag, e.g. "{throttle}".
-- ARGV[3]  this process's id.
-- ARGV[4..8]   rate, burst, concurrency, tenant_rate, tenant_burst ("" = unset);
--              live limits in P:cfg override them.
-- ARGV[9..15]  credit_s, queue_limit, tenant_queue_limit, tenant_idle_s,
--              max_tenants, lease_ttl_s, key_ttl_s.
-- ARGV[16] number of operations; ARGV[17] the operations, one per line, each with its
-- fields joined with "|" (one argument in, one string out: the client's packing and
-- parsing cost per call, not per operation):
--   A|id|tenant_digest|tenant_name|weight|rank|cost|flags|max_wait_s
--       flags: 1 sheddable, 2 degradable, 4 retry (answer from what exists)
--   R|id          release a lease (idempotent)
--   C|id          cancel a waiting request
--   T             tick (refill, expire, dispatch)
-- (Tenant ids, digests and request ids never contain "|" or a line break.)
-- Returns one string, its lines: one per operation, then the delay until the next
-- tick is due (seconds, or "" if only an arrival or a release can change anything),
-- then the number of live processes:
--   A|lease|degraded    admitted (lease 1: release it when done)
--   Q|deadline|wait_s   queued; a grant or eviction will reach P:g:<proc>
--   J|reason|retry_s    rejected
--   R                   released (or nothing to release)
--   X|reason|retry_s    cancelled: it left the queue (reason for a timeout answer)
--   G|lease             cancel too late: it was already admitted
--   N                   cancel: not known here (already gone)
--   T                   ticked

-- The operations first: a malformed call changes nothing.
local ops = {}
for op in string.gmatch(ARGV[17] or '', '[^\n]+') do ops[#ops + 1] = op end
if #ops ~= tonumber(ARGV[16]) then
  return redis.error_reply('throttle_mw: operation count mismatch')
end

local a = {rate = ARGV[4], burst = ARGV[5], concurrency = ARGV[6], tenant_rate = ARGV[7],
  tenant_burst = ARGV[8], credit = ARGV[9], queue_limit = ARGV[10],
  tenant_queue_limit = ARGV[11], idle = ARGV[12], max_tenants = ARGV[13],
  lease_ttl = ARGV[14], ttl = ARGV[15]}
init(ARGV[2], ARGV[1], ARGV[3], a)
-- The caller is alive. NX: only renew.lua extends a heartbeat, together with the
-- process's leases, so a crashed process's heartbeat lapses no later than its leases.
redis.call('ZADD', K.procs, 'NX', num(now + POL.lease_ttl), proc)
refill()
expire_leases()
expire_waiters(1.0)

local function lease_flag()
  if L.concurrency ~= nil then return 1 end
  return 0
end

local function last_of(t)
  local ids = redis.call('ZRANGE', qkey(t.h), -1, -1)
  if #ids == 0 then return nil end
  return parse_req(ids[1])
end

local function evict(r, reason)
  local t = tenant(r.h)
  local wait = estimate(t, r.rank, r)
  remove(t, r)
  emit(r.proc, 'r|' .. r.id .. '|' .. reason .. '|' .. num(wait))
end

-- Queue limits: a more urgent arrival displaces the lowest-priority newest entry;
-- a full fleet-wide queue drops from the tenant with the longest queue.
local function make_room(t, rank)
  if t.n >= POL.tenant_queue_limit then
    local victim = last_of(t)
    if victim == nil or victim.rank <= rank then
      local wait = estimate(t, rank, nil)
      return 'J|tenant_queue_full|' .. num(wait)
    end
    evict(victim, 'tenant_queue_full')
  end
  if S.waiting >= POL.queue_limit then
    local top = redis.call('ZREVRANGE', K.qlen, 0, 0)
    if #top == 0 then return 'J|queue_full|' .. num(drain_time()) end
    local heavy = tenant(top[1])
    local victim = last_of(heavy)
    local own = heavy.h == t.h
    if victim == nil or (own and victim.rank <= rank) or ((not own) and heavy.n <= t.n + 1) then
      if own then return 'J|tenant_queue_full|' .. num(drain_time()) end
      return 'J|queue_full|' .. num(drain_time())
    end
    evict(victim, 'tenant_queue_full')
  end
  return nil
end

local function acquire(id, h, name, weight, rank, cost, flags, max_wait)
  local sheddable = flags % 2 == 1
  local degradable = math.floor(flags / 2) % 2 == 1
  local retry = math.floor(flags / 4) % 2 == 1
  if retry then
    local r = parse_req(id)
    if r ~= nil then
      return 'Q|' .. num(r.deadline) .. '|' .. num(math.max(0, r.deadline - now))
    end
    if redis.call('HEXISTS', K.lc, id) == 1 then return 'A|1|0' end
    if redis.call('LPOS', K.prefix .. ':rc:' .. proc, id) then return 'A|0|0' end
  end
  if T[h] == nil then  -- a live weight (set with the CLI) wins; read once per call
    local live = redis.call('HGET', K.prefix .. ':w', h)
    if live then weight = tonumber(live) end
  else
    weight = nil  -- already loaded this call, with its weight
  end
  if S.waiting > 0 then dispatch(nil) end  -- nothing waits: nothing to dispatch
  local t = tenant(h, weight)
  if t.new then
    redis.call('HSET', t.key, 'name', name)
    t.new = false
  end
  touch(t)
  cost = clamp(cost)
  local budget_waiting = S.waiting > 0 and redis.call('ZCARD', K.active) > 0

  if sheddable then
    if not cap_ok(t, cost) then
      if degradable then return 'A|0|1' end
      return 'J|tenant_rate_cap|' .. num((cost - t.cap) / L.tenant_rate)
    end
    if (not budget_waiting) and t.st == 0 and fits(cost, false) then
      take(t, id, cost, proc)
      return 'A|' .. lease_flag() .. '|0'
    end
    if degradable then return 'A|0|1' end
    return 'J|shed|' .. num(drain_time())
  end

  if (not budget_waiting) and t.st == 0 and cap_ok(t, cost) and fits(cost, false) then
    take(t, id, cost, proc)
    return 'A|' .. lease_flag() .. '|0'
  end

  local rejected = make_room(t, rank)
  if rejected ~= nil then return rejected end
  local deadline = now + max_wait
  push(t, id, cost, rank, proc, deadline)
  if dispatch(id) then return 'A|' .. lease_flag() .. '|0' end
  local r = {id = id, h = h, cost = cost, rank = rank, proc = proc, deadline = deadline, enq = now}
  local wait, reason = estimate(t, rank, r)
  if wait > max_wait + EPS or max_wait <= 0 then
    remove(t, r)
    dispatch(nil)
    return 'J|' .. reason .. '|' .. num(wait - max_wait)
  end
  return 'Q|' .. num(deadline) .. '|' .. num(wait)
end

local function cancel(id)
  local r = parse_req(id)
  if r ~= nil then
    local t = tenant(r.h)
    local reason, wait = expiry(t, r)
    remove(t, r)
    dispatch(nil)
    return 'X|' .. reason .. '|' .. num(wait)
  end
  if redis.call('HEXISTS', K.lc, id) == 1 then return 'G|1' end
  if redis.call('LPOS', K.prefix .. ':rc:' .. proc, id) then return 'G|0' end
  return 'N'
end

local results = {}
for _, op in ipairs(ops) do
  local kind = string.sub(op, 1, 1)
  if kind == 'A' then
    local id, h, name, weight, rank, cost, flags, max_wait = string.match(op,
      '^A|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    results[#results + 1] = acquire(id, h, name, tonumber(weight), tonumber(rank),
      tonumber(cost), tonumber(flags), tonumber(max_wait))
  elseif kind == 'R' then
    if release(string.sub(op, 3)) and S.waiting > 0 then dispatch(nil) end
    results[#results + 1] = 'R'
  elseif kind == 'C' then
    results[#results + 1] = cancel(string.sub(op, 3))
  elseif kind == 'T' then
    dispatch(nil)
    results[#results + 1] = 'T'
  else
    return redis.error_reply('throttle_mw: unknown operation')
  end
end

forget_idle()
local due = next_due()
save()
if due == nil then results[#results + 1] = '' else results[#results + 1] = num(due - now) end
results[#results + 1] = tostring(redis.call('ZCOUNT', K.procs, num(now), '+inf'))
return table.concat(results, '\n')
