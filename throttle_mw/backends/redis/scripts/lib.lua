-- lib.lua: the scheduler's rules in Lua, shared by every throttle_mw script.
--
-- The loader prepends this file to each entry script. It mirrors
-- throttle_mw/scheduler/core.py step by step (same names: tenant, priority,
-- cost, lease, credit, reserve); that module and its README are the reference.
-- Time is Redis' own clock (TIME) in seconds, one clock for the whole fleet,
-- unless a test passes an explicit `now`.
--
-- Keys, all under the budget's hash tag P (e.g. "{throttle}"), so one budget
-- lives in one Redis Cluster slot:
--   P:s          hash   budget state: tokens, ts, inflight, v, win_at, win_v0, win_cost,
--                       v_rate, thr, meas_at, waiting, qcost, wsum, seq, tk_at, tk_by,
--                       n0..n3 (waiting requests by priority rank), xp (next TTL
--                       refresh), fi (next idle-tenant sweep)
--   P:cfg        hash   live limits set by the CLI; override the callers' values
--   P:w          hash   live tenant weights by digest, set by the CLI
--   P:t:<h>      hash   tenant h: f (finish tag), w, cap, cap_at, n, c0..c3 (queued
--                       cost by priority rank), st (0 idle, 1 active, 2 capped),
--                       am (its member in P:active), xp (next TTL refresh), name
--   P:q:<h>      zset   tenant h's waiting requests, score rank*1e13 + seq
--   P:r          hash   waiting request id -> "h|cost|rank|proc|deadline|enqueued"
--   P:active     zset   tenants with waiting requests that may go, by finish tag; the
--                       member is "<activation seq>|<h>", so ties go in activation order
--   P:capped     zset   tenants held by their own rate cap, by the time they may go
--   P:qlen       zset   tenants by (waiting requests, latest push): score n * 2^32 + seq
--                       mod 2^32, so the longest queue comes first and ties go to the
--                       tenant that queued last (longest-queue drop)
--   P:dl         zset   waiting request id -> deadline
--   P:tenants    zset   tenant h -> last seen (idle expiry, max tenants)
--   P:leases     zset   lease (request id) -> expiry;  P:lc hash lease -> "cost|proc"
--   P:g:<proc>   list   grants and evictions for the process that queued them
--   P:rc:<proc>  list   the process's latest lease-less admissions (idempotent retries)
--   P:procs      zset   process -> heartbeat expiry (renew.lua; batch calls add it if absent)
-- <h> is a digest of the tenant id: raw tenant text never reaches a key.

local EPS = 1e-6
local WINDOW = 1.0
local RANK_SPAN = 1e13
local NRANK = 4
local PUSH_SPAN = 4294967296

local function num(x)
  return string.format('%.17g', x)
end

local function opt(x)
  if x == nil or x == false or x == '' then return nil end
  return tonumber(x)
end

local S = {}        -- budget state
local L = {}        -- limits in force
local POL = {}      -- policy
local K = {}        -- key names
local T = {}        -- tenants loaded this call, by digest
local now = 0
local proc = ''
local out_events = {}  -- per process: list of messages

-- --- loading and saving -----------------------------------------------------------

local STATE_FIELDS = {'tokens', 'ts', 'inflight', 'v', 'win_at', 'win_v0', 'win_cost',
  'v_rate', 'thr', 'meas_at', 'waiting', 'qcost', 'wsum', 'seq', 'tk_at', 'tk_by',
  'n0', 'n1', 'n2', 'n3', 'xp', 'fi'}
local S0 = {}       -- the state as loaded: save() writes only what changed
local recent = {}   -- per process: lease-less admissions of this call (remember)
local fresh = false -- a tenant was created this call (forget_idle must check the bound)

local function init(prefix, now_override, process, a)
  -- a: table of caller limits/policy (strings) by name
  K.s = prefix .. ':s'
  K.cfg = prefix .. ':cfg'
  K.r = prefix .. ':r'
  K.active = prefix .. ':active'
  K.capped = prefix .. ':capped'
  K.qlen = prefix .. ':qlen'
  K.dl = prefix .. ':dl'
  K.tenants = prefix .. ':tenants'
  K.leases = prefix .. ':leases'
  K.lc = prefix .. ':lc'
  K.procs = prefix .. ':procs'
  K.prefix = prefix
  proc = process
  if now_override ~= nil and now_override ~= '' then
    now = tonumber(now_override)
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  end
  local cfg = redis.call('HMGET', K.cfg, 'rate', 'burst', 'concurrency', 'tenant_rate',
    'tenant_burst')
  local function pick(live, given)
    if live ~= false and live ~= nil then
      if live == 'none' then return nil end
      return tonumber(live)
    end
    return opt(given)
  end
  L.rate = pick(cfg[1], a.rate)
  L.burst = pick(cfg[2], a.burst) or 1
  L.concurrency = pick(cfg[3], a.concurrency)
  L.tenant_rate = pick(cfg[4], a.tenant_rate)
  L.tenant_burst = pick(cfg[5], a.tenant_burst) or 1
  if L.burst >= 2 then L.reserve = math.floor(L.burst / 2) else L.reserve = 0 end
  POL.credit = opt(a.credit) or 2
  POL.queue_limit = opt(a.queue_limit) or 1000
  POL.tenant_queue_limit = opt(a.tenant_queue_limit) or 100
  POL.idle = opt(a.idle) or 60
  POL.max_tenants = opt(a.max_tenants) or 10000
  POL.lease_ttl = opt(a.lease_ttl) or 30
  POL.ttl = opt(a.ttl) or 3700

  local vals = redis.call('HMGET', K.s, unpack(STATE_FIELDS))
  for i, name in ipairs(STATE_FIELDS) do
    if name == 'tk_by' then S[name] = vals[i] or '' else S[name] = tonumber(vals[i]) end
    S0[name] = S[name]
  end
  if S.ts == nil then
    S.tokens = L.burst; S.ts = now; S.inflight = 0; S.v = 0
    S.win_at = now; S.win_v0 = 0; S.win_cost = 0; S.v_rate = 0; S.thr = 0
    S.meas_at = -1e18; S.waiting = 0; S.qcost = 0; S.wsum = 0; S.seq = 0; S.tk_at = 0
  end
  for rank = 0, NRANK - 1 do S['n' .. rank] = S['n' .. rank] or 0 end
  S.xp = S.xp or 0
  S.fi = S.fi or 0
  if S.tokens > L.burst then S.tokens = L.burst end
end

local function save()
  -- Only what changed, and key TTLs only when due: this runs on every call.
  local args = {}
  if now >= S.xp then S.xp = now + POL.ttl / 4 end
  for _, name in ipairs(STATE_FIELDS) do
    local value = S[name]
    if value ~= S0[name] then
      args[#args + 1] = name
      if type(value) == 'number' then args[#args + 1] = num(value) else args[#args + 1] = value end
    end
  end
  if #args > 0 then redis.call('HSET', K.s, unpack(args)) end
  if S.xp ~= S0.xp then redis.call('PEXPIRE', K.s, math.floor(POL.ttl * 1000)) end
  for h, t in pairs(T) do
    if t.dirty and not t.deleted then
      local fields = {}
      local function put(name, value)
        if value ~= t.loaded[name] then
          fields[#fields + 1] = name
          if type(value) == 'number' then fields[#fields + 1] = num(value) else fields[#fields + 1] = value end
        end
      end
      put('f', t.f); put('w', t.w); put('cap', t.cap); put('cap_at', t.cap_at); put('n', t.n)
      put('c0', t.c[1]); put('c1', t.c[2]); put('c2', t.c[3]); put('c3', t.c[4])
      put('st', t.st); put('am', t.am)
      if now >= t.xp then
        t.xp = now + POL.idle / 4
        put('xp', t.xp)
        redis.call('PEXPIRE', t.key, math.floor((POL.idle + POL.ttl) * 1000))
      end
      if #fields > 0 then redis.call('HSET', t.key, unpack(fields)) end
    end
  end
  for p, ids in pairs(recent) do
    local key = K.prefix .. ':rc:' .. p
    redis.call('LPUSH', key, unpack(ids))
    redis.call('LTRIM', key, 0, 255)
    redis.call('PEXPIRE', key, 60000)
  end
  for p, msgs in pairs(out_events) do
    local key = K.prefix .. ':g:' .. p
    redis.call('RPUSH', key, unpack(msgs))
    redis.call('PEXPIRE', key, 60000)
  end
end

local function emit(p, msg)
  local list = out_events[p]
  if list == nil then list = {}; out_events[p] = list end
  list[#list + 1] = msg
end

-- --- budget ---------------------------------------------------------------------------

local function refill()
  local elapsed = now - S.ts
  if elapsed > 0 then
    if L.rate ~= nil then S.tokens = math.min(L.burst, S.tokens + elapsed * L.rate) end
    S.ts = now
  end
  local window = now - S.win_at
  if window >= WINDOW then
    if window <= 3 * WINDOW then
      S.v_rate = (S.v - S.win_v0) / window
      S.thr = S.win_cost / window
      S.meas_at = now
    end
    S.win_at = now; S.win_v0 = S.v; S.win_cost = 0
  end
end

local function clamp(cost)
  local limit = cost
  if L.rate ~= nil then limit = math.min(limit, math.floor(L.burst)) end
  if L.concurrency ~= nil then limit = math.min(limit, L.concurrency) end
  return math.max(1, limit)
end

local function need(cost, reserve)
  if not reserve then return cost end
  return math.min(cost + L.reserve, L.burst)
end

local function fits(cost, reserve)
  if L.rate ~= nil and S.tokens + EPS < need(cost, reserve) then return false end
  return L.concurrency == nil or S.inflight + cost <= L.concurrency
end

local function refill_cap(t)
  if L.tenant_rate ~= nil and now > t.cap_at then
    t.cap = math.min(L.tenant_burst, t.cap + (now - t.cap_at) * L.tenant_rate)
    t.dirty = true
  end
  if now > t.cap_at then t.cap_at = now end
end

local function cap_ok(t, cost)
  if L.tenant_rate == nil then return true end
  refill_cap(t)
  return t.cap + EPS >= cost
end

-- --- tenants ------------------------------------------------------------------------------

local function reweigh(t, weight)
  -- A new weight (a live change, or replicas configured differently): the weight of the
  -- tenants in line must follow, or the fair rate per unit weight drifts.
  if t.st == 1 then S.wsum = S.wsum - t.w + weight end
  t.w = weight
  t.dirty = true
end

local function tenant(h, weight)
  local t = T[h]
  if t ~= nil then
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
    return t
  end
  local key = K.prefix .. ':t:' .. h
  local v = redis.call('HMGET', key, 'f', 'w', 'cap', 'cap_at', 'n', 'c0', 'c1', 'c2', 'c3', 'st',
    'am', 'xp')
  t = {h = h, key = key, dirty = false, loaded = {}}
  if v[1] == false then
    local w = weight or 1
    t.w = w; t.f = S.v + 1 / w; t.cap = L.tenant_burst; t.cap_at = now; t.n = 0
    t.c = {0, 0, 0, 0}; t.st = 0; t.am = ''; t.xp = 0; t.dirty = true; t.new = true
    fresh = true
  else
    t.f = tonumber(v[1]); t.w = tonumber(v[2]); t.cap = tonumber(v[3])
    t.cap_at = tonumber(v[4]); t.n = tonumber(v[5])
    t.c = {tonumber(v[6]), tonumber(v[7]), tonumber(v[8]), tonumber(v[9])}
    t.st = tonumber(v[10])
    t.am = v[11] or ''
    t.xp = tonumber(v[12]) or 0
    local l = t.loaded
    l.f = t.f; l.w = t.w; l.cap = t.cap; l.cap_at = t.cap_at; l.n = t.n
    l.c0 = t.c[1]; l.c1 = t.c[2]; l.c2 = t.c[3]; l.c3 = t.c[4]; l.st = t.st; l.am = t.am
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  end
  T[h] = t
  return t
end

local function touch(t)
  if not t.touched then  -- once per call is enough: `now` does not move within it
    redis.call('ZADD', K.tenants, num(now), t.h)
    t.touched = true
  end
  t.dirty = true
end

local function forget_idle()
  -- Drop idle tenants past the idle time, and the least recent beyond max_tenants: all of
  -- those (one call adds at most a batch of 256 tenants), so the excess never builds up.
  -- Only calls that created a tenant can exceed the bound; idle ones are swept each second,
  -- or on every call while a backlog of them is left (32 at a time keeps each call short).
  if not fresh and now < S.fi then return end
  local stale = redis.call('ZRANGEBYSCORE', K.tenants, '-inf', num(now - POL.idle), 'LIMIT', 0, 32)
  if #stale < 32 then S.fi = now + 1.0 end
  local excess = redis.call('ZCARD', K.tenants) - POL.max_tenants
  if excess > 0 then
    local oldest = redis.call('ZRANGE', K.tenants, 0, math.min(excess, 1024) - 1)
    for _, h in ipairs(oldest) do stale[#stale + 1] = h end
  end
  for _, h in ipairs(stale) do
    local t = T[h]
    local busy
    if t ~= nil then busy = t.n > 0 else
      busy = tonumber(redis.call('HGET', K.prefix .. ':t:' .. h, 'n') or '0') > 0
    end
    if not busy then
      redis.call('DEL', K.prefix .. ':t:' .. h, K.prefix .. ':q:' .. h)
      redis.call('ZREM', K.tenants, h)
      if t ~= nil then t.deleted = true; T[h] = nil end
    end
  end
end

-- --- fairness -------------------------------------------------------------------------------

local function fair_rate(extra_weight)
  if S.v_rate > 0 and now - S.meas_at <= 3 * WINDOW then return S.v_rate end
  local capacity = L.rate
  if capacity == nil and now - S.meas_at <= 3 * WINDOW then capacity = S.thr end
  local weight = S.wsum + (extra_weight or 0)
  if capacity == nil or capacity == 0 then return 0 end
  if weight <= 0 then weight = 1 end
  return capacity / weight
end

local function credit()
  return POL.credit * fair_rate(0)
end

local function add_lease(id, cost, p)
  S.inflight = S.inflight + cost
  redis.call('ZADD', K.leases, num(now + POL.lease_ttl), id)
  redis.call('HSET', K.lc, id, cost .. '|' .. p)
end

local function remember(p, id)
  -- Lease-less admissions: kept briefly so a retried acquire is answered, not redone.
  -- Collected here and written once per call by save().
  local ids = recent[p]
  if ids == nil then ids = {}; recent[p] = ids end
  ids[#ids + 1] = id
end

local function take(t, id, cost, p)
  if L.rate ~= nil then S.tokens = S.tokens - cost end
  if L.tenant_rate ~= nil then t.cap = t.cap - cost end
  if L.concurrency ~= nil then add_lease(id, cost, p) else remember(p, id) end
  local start = t.f
  if start < S.v then  -- behind the clock: its banked credit is bounded
    start = math.max(start, S.v - credit())
  else
    S.v = start
  end
  t.f = start + cost / t.w
  S.win_cost = S.win_cost + cost
  t.dirty = true
end

-- --- queues -----------------------------------------------------------------------------------

local function qkey(h) return K.prefix .. ':q:' .. h end

local function parse_req(id)
  local raw = redis.call('HGET', K.r, id)
  if not raw then return nil end
  local h, cost, rank, p, deadline, enq = string.match(raw,
    '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return {id = id, h = h, cost = tonumber(cost), rank = tonumber(rank), proc = p,
    deadline = tonumber(deadline), enq = tonumber(enq)}
end

local function activate(t)
  t.st = 1; t.dirty = true
  S.wsum = S.wsum + t.w
  S.seq = S.seq + 1
  t.am = string.format('%016d', S.seq) .. '|' .. t.h
  redis.call('ZADD', K.active, num(t.f), t.am)
end

local function tenant_of_member(member)
  return tenant(string.sub(member, 18))
end

local function deactivate(t)
  if t.st == 1 then
    S.wsum = S.wsum - t.w
    redis.call('ZREM', K.active, t.am)
  elseif t.st == 2 then
    redis.call('ZREM', K.capped, t.h)
  end
  t.st = 0; t.dirty = true
  if S.waiting == 0 then S.wsum = 0 end
end

local function push(t, id, cost, rank, p, deadline)
  S.seq = S.seq + 1
  redis.call('ZADD', qkey(t.h), num(rank * RANK_SPAN + S.seq), id)
  redis.call('HSET', K.r, id, t.h .. '|' .. cost .. '|' .. rank .. '|' .. p .. '|' ..
    num(deadline) .. '|' .. num(now))
  redis.call('ZADD', K.dl, num(deadline), id)
  t.c[rank + 1] = t.c[rank + 1] + cost
  t.n = t.n + 1
  redis.call('ZADD', K.qlen, num(t.n * PUSH_SPAN + S.seq % PUSH_SPAN), t.h)
  S.waiting = S.waiting + 1
  S['n' .. rank] = S['n' .. rank] + 1
  S.qcost = S.qcost + cost
  t.dirty = true
  if t.st == 0 then activate(t) end
end

local function unlink(t, r)
  redis.call('ZREM', qkey(t.h), r.id)
  redis.call('HDEL', K.r, r.id)
  redis.call('ZREM', K.dl, r.id)
  t.c[r.rank + 1] = t.c[r.rank + 1] - r.cost
  t.n = t.n - 1
  if t.n <= 0 then
    redis.call('ZREM', K.qlen, t.h)
  else
    redis.call('ZINCRBY', K.qlen, -PUSH_SPAN, t.h)
  end
  S.waiting = S.waiting - 1
  S['n' .. r.rank] = S['n' .. r.rank] - 1
  S.qcost = S.qcost - r.cost
  t.dirty = true
end

local function remove(t, r)
  unlink(t, r)
  if t.n <= 0 then deactivate(t) end
end

local function estimate(t, rank, r)
  -- Expected wait of a request at `rank` in t's queue, and who is to blame.
  local ahead = 0
  for i = 1, rank + 1 do ahead = ahead + t.c[i] end
  local cost = 1
  if r ~= nil then ahead = ahead - r.cost; cost = r.cost end
  local extra = 0
  if t.st == 0 then extra = t.w end
  local fr = fair_rate(extra)
  local wait, reason = 0, 'overloaded'
  if fr > 0 then
    local start = math.max(t.f, S.v - credit()) + ahead / t.w
    wait = math.max(0, start - S.v) / fr
    if wait > 0 then reason = 'tenant_over_share' end
  end
  if L.rate ~= nil then
    -- Without credit it must also leave the reserve in the bucket.
    local bound = (ahead + need(cost, t.f >= S.v) - S.tokens) / L.rate
    if bound > wait then
      wait = bound
      if ahead > 0 then reason = 'tenant_over_share' else reason = 'overloaded' end
    end
  end
  if L.tenant_rate ~= nil then
    refill_cap(t)
    local bound = (ahead + cost - t.cap) / L.tenant_rate
    if bound >= 0.5 * wait and bound > 0 then
      wait = math.max(wait, bound); reason = 'tenant_rate_cap'
    end
  end
  return wait, reason
end

local function expiry(t, r)
  local wait, reason = estimate(t, r.rank, r)
  if reason == 'overloaded' then reason = 'expired' end
  return reason, wait
end

local function drain_time()
  local rate = L.rate
  if rate == nil then
    if now - S.meas_at <= 3 * WINDOW then rate = S.thr else rate = 0 end
  end
  if rate == nil or rate <= 0 then return 1 end
  return S.qcost / rate
end

-- --- dispatch -----------------------------------------------------------------------------------

local function release_capped()
  local ready = redis.call('ZRANGEBYSCORE', K.capped, '-inf', num(now + EPS))
  for _, h in ipairs(ready) do
    redis.call('ZREM', K.capped, h)
    local t = tenant(h)
    if t.st == 2 then t.st = 0; activate(t) end
  end
end

local function head_of(t)
  local ids = redis.call('ZRANGE', qkey(t.h), 0, 0)
  if #ids == 0 then return nil end
  return parse_req(ids[1])
end

-- A waiter of a process whose heartbeat has lapsed (it crashed) is dropped, not granted:
-- a grant would only hold capacity until its lease expired. A heartbeat lapses when the
-- leases renewed with it expire (renew.lua), so capacity a crashed process frees never
-- goes to its own waiters. Every batch call registers its caller, so a process that
-- queued a request was alive when it did.
local function orphaned(r)
  if r.proc == proc then return false end
  local beat = redis.call('ZSCORE', K.procs, r.proc)
  return (not beat) or tonumber(beat) <= now
end

-- Admit waiters while the budget allows, lowest virtual tag first. Returns true if
-- `watch` was admitted (the caller reports it directly rather than as a grant).
local function dispatch(watch)
  release_capped()
  local watched = false
  local guard = 0
  while guard < 10000 do
    guard = guard + 1
    local top = redis.call('ZRANGE', K.active, 0, 0)
    if #top == 0 then break end
    local t = tenant_of_member(top[1])
    local r = head_of(t)
    if r == nil then
      -- inconsistent (e.g. keys lost): drop the tenant from the active set
      redis.call('ZREM', K.active, top[1]); S.wsum = S.wsum - t.w; t.st = 0; t.n = 0
      t.c = {0, 0, 0, 0}; t.dirty = true
    elseif orphaned(r) then
      remove(t, r)
    elseif not cap_ok(t, r.cost) then
      redis.call('ZREM', K.active, t.am)
      S.wsum = S.wsum - t.w
      t.st = 2; t.dirty = true
      local ready = now + (r.cost - t.cap) / L.tenant_rate
      redis.call('ZADD', K.capped, num(ready), t.h)
    elseif not fits(r.cost, t.f >= S.v) then
      break
    else
      redis.call('ZREM', K.active, t.am)
      S.wsum = S.wsum - t.w
      t.st = 0
      unlink(t, r)
      take(t, r.id, r.cost, r.proc)
      if t.n > 0 then activate(t) end
      if S.waiting == 0 then S.wsum = 0 end
      if r.id == watch then
        watched = true
      else
        local lease = 0
        if L.concurrency ~= nil then lease = 1 end
        emit(r.proc, 'g|' .. r.id .. '|' .. num(now - r.enq) .. '|' .. lease)
      end
    end
  end
  return watched
end

local function expire_leases()
  local dead = redis.call('ZRANGEBYSCORE', K.leases, '-inf', num(now), 'LIMIT', 0, 256)
  for _, id in ipairs(dead) do
    local raw = redis.call('HGET', K.lc, id)
    if raw then
      local cost = tonumber(string.match(raw, '^([^|]*)'))
      S.inflight = math.max(0, S.inflight - cost)
      redis.call('HDEL', K.lc, id)
    end
    redis.call('ZREM', K.leases, id)
  end
end

local function expire_waiters(grace)
  -- Entries of processes that died with requests queued: past deadline + grace.
  local dead = redis.call('ZRANGEBYSCORE', K.dl, '-inf', num(now - grace), 'LIMIT', 0, 256)
  for _, id in ipairs(dead) do
    local r = parse_req(id)
    if r ~= nil then
      local t = tenant(r.h)
      local reason, wait = expiry(t, r)
      remove(t, r)
      emit(r.proc, 'r|' .. id .. '|' .. reason .. '|' .. num(wait))
    else
      redis.call('ZREM', K.dl, id)
    end
  end
end

local function release(id)
  local raw = redis.call('HGET', K.lc, id)
  if not raw then return false end
  local cost = tonumber(string.match(raw, '^([^|]*)'))
  S.inflight = math.max(0, S.inflight - cost)
  redis.call('HDEL', K.lc, id)
  redis.call('ZREM', K.leases, id)
  return true
end

-- When a tick can next change something (seconds), or nil; claims the tick for
-- this process unless another live one already has it, so the fleet ticks once.
local function next_due()
  local due = nil
  local top = redis.call('ZRANGE', K.active, 0, 0)
  if #top > 0 then
    local t = tenant_of_member(top[1])
    local r = head_of(t)
    if r ~= nil and L.concurrency ~= nil and S.inflight + r.cost > L.concurrency then
      -- Held up by slots: the earliest lease expiry (a crashed process's) frees one.
      local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
      if #first > 0 then due = tonumber(first[2]) end
    elseif r ~= nil and L.rate ~= nil then
      local needed = need(r.cost, t.f >= S.v)
      if S.tokens + EPS < needed then
        due = now + (needed - S.tokens) / L.rate
      end
    end
  end
  local capped = redis.call('ZRANGE', K.capped, 0, 0, 'WITHSCORES')
  if #capped > 0 then
    local at = tonumber(capped[2])
    if due == nil or at < due then due = at end
  end
  local dl = redis.call('ZRANGE', K.dl, 0, 0, 'WITHSCORES')
  if #dl > 0 then
    local at = tonumber(dl[2]) + 1.0
    if due == nil or at < due then due = at end
  end
  if due == nil then return nil end
  -- One process ticks for the fleet; others keep a later fallback in case it dies.
  if S.tk_by ~= proc and S.tk_by ~= '' and S.tk_at >= now - 0.05 and S.tk_at <= due + EPS then
    return math.max(due, S.tk_at) + 0.05
  end
  S.tk_at = due; S.tk_by = proc
  return due
end
