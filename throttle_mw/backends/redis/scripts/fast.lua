-- fast.lua: the fast path of batch.lua (Lua only: scheduler README, "Only in Lua").
--
-- A call of one operation that nobody waiting could be affected by: an acquire admitted
-- at once while nobody waits for the budget, or a release while nobody waits. It takes
-- the same decisions and leaves the same state as the full call (it runs core.lua's
-- rules: tenant, fits_at_once, admit_now, release), but reads only the fields it needs,
-- writes back only what changed (store.lua's save) and skips the steps that cannot
-- change anything then: the queues, the dispatch, the next tick (none is due while
-- nobody waits), the heartbeat registration (only a caller with waiters needs it).
--
-- It gives up, before writing anything, whenever the full call could do more: someone
-- waits, a budget or tenant seen for the first time, a tenant in line, a retry, a lapsed
-- lease, an idle-tenant sweep, a TTL refresh or a fair-rate window roll due, a state
-- without its epoch or in its reclaim grace. Those cost
-- the reads twice, at most once per period each (a second, a quarter of a TTL), or are
-- the calls where the budget is contended anyway. Returns the reply line, or nil.

-- The fields of P:t:<h> it reads (TENANT_FIELDS has them all; absent, w is 1 and st IDLE).
local FAST_TENANT = {'f', 'w', 'cap', 'cap_at', 'st', 'xp'}

-- Loads the state into S (store.lua's load_hot_state) and the limits (load_limits_stamped,
-- from `limits`: batch.lua's ARGV[4]); false if the full call must run instead.
local function fast_state(limits)
  if not load_hot_state() then return false end  -- a new budget
  load_limits_stamped(limits, false)
  S.la = S.la or 0; S.lk = S.lk or 0  -- as load_state
  -- (An epoch to make, or a reclaim grace running: hold_back and the epoch are the full
  -- call's, store.lua's "A state made anew".)
  return S.waiting == 0 and now < (S.xp or 0) and now < (S.fi or 0)
    and now - S.win_at < WINDOW and S.ep ~= '' and now >= (S.rc or 0)
end

-- A lease past its expiry (its process crashed): expire_leases must run first.
local function lapsed_lease()
  if S.inflight <= 0 then return false end
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  return #first > 0 and tonumber(first[2]) <= now
end

-- Tenant h as load_tenant would load it, from the fields the fast path needs; nil if it
-- is new, in line, or due for its TTL refresh.
local function fast_tenant(h, weight)
  local key = K.prefix .. KEY.tenant .. h
  local v = redis.call('HMGET', key, unpack(FAST_TENANT))
  if v[1] == false then return nil end
  local l = {f = tonum(v[1]), w = tonum(v[2]) or 1, cap = tonum(v[3]), cap_at = tonum(v[4]),
    st = tonum(v[5]) or IDLE, xp = tonum(v[6]) or 0, n = 0}
  if l.st ~= IDLE or now >= l.xp then return nil end  -- (IDLE: nothing waits, n = 0)
  local t = {h = h, key = key, dirty = false, loaded = l, c = {}, f = l.f, w = l.w,
    cap = l.cap, cap_at = l.cap_at, st = l.st, xp = l.xp, n = 0}
  if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  T[h] = t
  return t
end

local function give_up()
  S, S0, T = {}, {}, {}
  return nil
end

-- One acquire (batch.lua's do_acquire), if it is admitted at once with nobody waiting.
local function fast_acquire(op, limits)
  local _, id, h, _, weight, _, cost, flags = string.match(op, ACQUIRE_PATTERN)
  if has_flag(tonum(flags), FLAG.retry) then return nil end
  if not fast_state(limits) or lapsed_lease() then return give_up() end
  if S.tokens ~= nil and S.tokens > L.burst then S.tokens = L.burst end  -- as load_state
  local t = fast_tenant(h, live_weight(h, tonum(weight)))
  if t == nil then return give_up() end
  refill()
  cost = clamp(tonum(cost))
  if not fits_at_once(t, cost) then return give_up() end
  touch(t)  -- (tenant() would: the tenant is not new)
  admit_now(t, id, cost)
  local lease = '0'
  if L.concurrency ~= nil then lease = '1' end
  return REPLY.admitted .. SEP .. lease .. SEP .. '0'
end

-- One release with nobody waiting: the lease's concurrency back, nothing to dispatch.
-- (The full call would also refill the bucket to now: refilling later comes to the same.)
local function fast_release(id, limits)
  if not fast_state(limits) then return give_up() end
  release(id)
  return REPLY.released
end
