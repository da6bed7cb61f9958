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
-- A release goes by lean_release first (below): most need not even what fast_release does.

-- The fields of P:t:<h> it reads (TENANT_FIELDS has them all).
local FAST_TENANT = {'f', 'w', 'cap', 'cap_at', 'st', 'xp'}

-- Loads the state into S (store.lua's load_hot_state) and the limits (load_limits_stamped,
-- from `limits`: batch.lua's ARGV[4]); false if the full call must run instead.
local function fast_state(limits, vals)
  if not load_hot_state(vals) then return false end  -- a new budget
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
  local l = {f = tonum(v[1]), w = tonum(v[2]), cap = tonum(v[3]), cap_at = tonum(v[4]),
    st = tonum(v[5]), xp = tonum(v[6]) or 0, n = 0}
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
-- `vals`: P:s's HOT_FIELDS as lean_release read them.
local function fast_release(id, limits, vals)
  if not fast_state(limits, vals) then return give_up() end
  release(id)
  return REPLY.released
end

-- One release with nobody waiting, in the fewest steps that leave what fast_release
-- leaves (most releases): P:s's hot fields read (one HMGET, as load_hot_state), the packed
-- numbers it needs taken from their state_memo entry as they are (no S made, nothing
-- parsed unless another writer came in between), then the lease out (ZREM) and in flight
-- written back if it was there (drop_lease for a lease of cost 1 that is not the last
-- over the anchor); nothing else read or written, so no save() and no TTL to set (a
-- release makes no key). It stops before writing anything wherever fast_release would do
-- more: fast_state's conditions (false, nil: the full call), or (false, vals: fast_release,
-- with the fields read) a lease of another cost in flight (S.lk: its cost is in P:lc), the
-- anchor to take out (unanchor_leases), the live processes to count again (batch.lua's
-- live_processes) or the live limits to stamp (load_limits_stamped). true: done; S.np and
-- S.ep are set, and the limits, for batch.lua's reply.
local function lean_release(id, limits)
  local vals = redis.call('HMGET', K.state, unpack(HOT_FIELDS))
  local packed = unpack_state(vals[1])
  if packed == nil then return false, nil end  -- a new budget
  local p, at = packed.vals, call.AT
  local inflight, ep, lv = tonum(vals[2]), vals[4] or '', vals[5] or ''
  local win_at = p[at.win_at]
  if inflight == nil or tonum(vals[3]) ~= 0 or now >= (p[at.xp] or 0) or now >= (p[at.fi] or 0)
    or win_at == nil or now - win_at >= WINDOW or ep == '' or now < (p[at.rc] or 0) then
    return false, nil  -- (as fast_state)
  end
  local np, pc = p[at.np], p[at.pc]
  if (p[at.lk] or 0) > 0 or (p[at.la] == 1 and inflight <= 1) or lv == '' or np == nil
    or pc == nil or now >= pc or now < pc - TUNING.PROCS_RECOUNT then
    return false, vals
  end
  S.lv = lv
  load_limits_stamped(limits, false)  -- (the reply's limits; stamped already: no write)
  if redis.call('ZREM', K.leases, id) == 1 then
    redis.call('HSET', K.state, 'inflight', num(math.max(0, inflight - 1)))
  end
  S.np = np; S.ep = ep
  return true
end
