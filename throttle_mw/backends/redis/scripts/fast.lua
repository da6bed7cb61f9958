-- fast.lua: the fast path of batch.lua (Lua only: scheduler README, "Only in Lua").
--
-- A call of one operation that nobody waiting could be affected by: an acquire admitted
-- at once while nobody waits for the budget, or a release while nobody waits. It takes
-- the same decisions and leaves the same state as the full call (it runs core.lua's
-- rules: tenant, fits_at_once, admit_now, release), but reads only the fields it needs,
-- writes back only what changed (store.lua's save; call.save_acquire after an acquire,
-- without the full call's tables) and skips the steps that cannot
-- change anything then: the queues, the dispatch, the next tick (none is due while
-- nobody waits), the heartbeat registration (only a caller with waiters needs it).
--
-- It gives up, before writing anything, whenever the full call could do more: someone
-- waits, a budget or tenant seen for the first time, a tenant in line, a retry, a lapsed
-- lease, an idle-tenant sweep, a TTL refresh or a fair-rate window roll due, a state
-- without its epoch or in its reclaim grace. Those cost
-- the reads twice, at most once per period each (a second, a quarter of a TTL), or are
-- the calls where the budget is contended anyway. Returns the reply line, or nil.

-- batch.lua's own helpers, made here once (in the entry script, a function is made anew on
-- every call: an allocation, and its share of garbage collection).

-- The live processes (heartbeats in P:procs not past), as the trailer reports them: kept
-- in the state (S.np) and counted again at most every TUNING.PROCS_RECOUNT (S.pc), or at once when
-- this call registered its process (`joined`). A heartbeat lapses, or a process leaves,
-- in the count within TUNING.PROCS_RECOUNT (each process's own heartbeat counts them exactly).
-- Before save(): the count is saved with the state.
local function live_processes(joined)
  if joined or S.np == nil or S.pc == nil or now >= S.pc or now < S.pc - TUNING.PROCS_RECOUNT then
    S.np = redis.call('ZCOUNT', K.procs, num(now), '+inf')
    S.pc = now + TUNING.PROCS_RECOUNT
  end
  return S.np
end

-- The reply: the operations' lines (`lines`, joined; '' if none), then the trailer
-- (batch.lua's header), `procs` from live_processes. A trailer without a delay is kept
-- with the limits it states (limits_memo) for the processes and epoch it has: most calls'
-- is the last call's.
local function finish(lines, due, procs)
  local memo, trailer = limits_memo, nil
  if due == nil and memo.trailer_np == procs and memo.trailer_ep == S.ep then
    trailer = memo.trailer
  else
    local delay = ''
    if due ~= nil then delay = num(due - now) end
    trailer = delay .. LINE .. num(procs) .. LINE .. limits_line() .. LINE .. S.ep
    if due == nil then memo.trailer_np = procs; memo.trailer_ep = S.ep; memo.trailer = trailer end
  end
  if lines == '' then return trailer end
  return lines .. LINE .. trailer
end

-- The fields of P:t:<h> fast_acquire reads (TENANT_FIELDS has them all); without a tenant
-- rate, only f, w, st and xp (the cap is neither refilled nor taken then: core.lua's
-- cap_ok and take; written out there).
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

local function give_up()
  S, S0, T = {}, {}, {}
  return nil
end

-- The fields of an acquire fast_acquire uses (id, tenant digest, weight, cost, flags),
-- captured; the others only matched (a capture makes a string).
local FAST_ACQUIRE_PATTERN = '^'
do
  local used = {id = true, tenant_digest = true, weight = true, cost = true, flags = true}
  for i = 1, #ACQUIRE_FIELDS do
    if i > 1 then FAST_ACQUIRE_PATTERN = FAST_ACQUIRE_PATTERN .. SEP end
    if used[ACQUIRE_FIELDS[i]] then
      FAST_ACQUIRE_PATTERN = FAST_ACQUIRE_PATTERN .. '([^' .. SEP .. ']*)'
    else
      FAST_ACQUIRE_PATTERN = FAST_ACQUIRE_PATTERN .. '[^' .. SEP .. ']*'
    end
  end
  FAST_ACQUIRE_PATTERN = FAST_ACQUIRE_PATTERN .. '$'
end

-- The tenant of a fast acquire, with the fields load_tenant would give it that the rules
-- read here: kept from call to call (with EVAL, made per call), every field it has
-- assigned anew (store.lua's call.S_kept).
local FAST_T = {}

-- fast_acquire's reply lines, without a lease and with one (made once).
local FAST_ADMITTED = {REPLY.admitted .. SEP .. '0' .. SEP .. '0',
  REPLY.admitted .. SEP .. '1' .. SEP .. '0'}

-- One acquire (batch.lua's do_acquire), if it is admitted at once with nobody waiting:
-- the state as fast_state loads it and the tenant as load_tenant would, in tables kept
-- from call to call, written back by store.lua's call.save_acquire (save(true)'s writes).
-- It gives up on a tenant new, in line or due for its TTL refresh.
local function fast_acquire(op, limits)
  local id, h, weight, cost, flags = string.match(op, FAST_ACQUIRE_PATTERN)
  if flags == nil or flags ~= '0' and has_flag(tonum(flags), FLAG.retry) then return nil end
  if not call.load_acquire_state() then return give_up() end  -- a new budget
  load_limits_stamped(limits, false)
  if not (S.waiting == 0 and now < (S.xp or 0) and now < (S.fi or 0)
    and now - S.win_at < WINDOW and S.ep ~= '' and now >= (S.rc or 0))
    or S.inflight > 0 and lapsed_lease() then
    return give_up()  -- (as fast_state)
  end
  if S.tokens ~= nil and S.tokens > L.burst then S.tokens = L.burst end  -- as load_state
  -- (tonum's remembered numbers looked up here first: most are, and a call costs. No live
  -- weight set, known by the stamped reading: live_weight would return the caller's.)
  weight = NUMBERS[weight] or tonum(weight)
  local memo = limits_memo
  if not (memo.no_weights and memo.lv == S.lv) then weight = live_weight(h, weight) end
  local key = K.tenant_names and K.tenant_names[h] or call.tenant_key(h)
  local f0, w0, cap0, cap_at0, st, xp
  if L.tenant_rate == nil then
    local v = redis.call('HMGET', key, 'f', 'w', 'st', 'xp')  -- (FAST_UNCAPPED, without unpack)
    if v[1] == false then return give_up() end
    f0, w0 = NUMBERS[v[1]] or tonum(v[1]), NUMBERS[v[2]] or tonum(v[2])
    st, xp = NUMBERS[v[3]] or tonum(v[3]), NUMBERS[v[4]] or tonum(v[4]) or 0
  else
    local v = redis.call('HMGET', key, unpack(FAST_TENANT))
    if v[1] == false then return give_up() end
    f0, w0, cap0, cap_at0 = tonum(v[1]), tonum(v[2]), tonum(v[3]), tonum(v[4])
    st, xp = tonum(v[5]), tonum(v[6]) or 0
  end
  if st ~= IDLE or now >= xp then return give_up() end  -- (IDLE: nothing waits, n = 0)
  local t = FAST_T
  t.h = h; t.key = key; t.dirty = false; t.f = f0; t.w = w0; t.cap = cap0; t.cap_at = cap_at0
  t.st = st; t.xp = xp; t.n = 0
  if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  refill()
  cost = clamp(NUMBERS[cost] or tonum(cost))
  if not fits_at_once(t, cost) then return give_up() end
  t.dirty = true  -- (touch: its idle-list entry is call.save_acquire's)
  admit_now(t, id, cost)
  t.f0 = f0; t.w0 = w0; t.cap0 = cap0; t.cap_at0 = cap_at0  -- (call.save_acquire compares)
  if L.concurrency ~= nil then return FAST_ADMITTED[2] end
  return FAST_ADMITTED[1]
end

-- One release with nobody waiting: the lease's concurrency back, nothing to dispatch.
-- (The full call would also refill the bucket to now: refilling later comes to the same.)
local function fast_release(id, limits)
  if not fast_state(limits) then return give_up() end
  release(id)
  return REPLY.released
end
