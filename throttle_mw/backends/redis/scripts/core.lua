-- core.lua: twin of throttle_mw/scheduler/core.py, the scheduling rules.
--
-- The same functions with the same names, in the same order as the Python methods
-- (without their leading underscore), each with a pointer to its Python counterpart;
-- that module and the README beside it are the reference. Four Python methods have no
-- twin here (set_limits: the scripts read live limits when they change; admit_at_once and
-- release_at_once: the in-memory backend's synchronous paths; snapshot: snapshot.lua;
-- fast.lua is the scripts' own shortcut, built from these rules). The steps that exist
-- only in Lua come last, and the scheduler README lists them ("Only in Lua").
--
-- Decisions are tables: {kind = 'admit', lease, degraded}, {kind = 'queue', deadline,
-- wait, limited} or {kind = 'reject', reason, retry} (Python's Admit, Enqueue, Reject); the entry
-- scripts encode them. Requests are tables {id, h (tenant digest), cost, rank, proc,
-- deadline, enq} (Python's Waiter). State is in store.lua's tables S, L, POL, T.

local acquire, cancel, release, tick, next_due, lease_tokens
local refill, lease_room, clamp, need, fits, fits_at_once, cap_ok, refill_cap
local fair_rate, credit, take, charge_leased, admit_now, shed_or_admit, expiry, drain_time, estimate
local tenant, forget_idle, make_room, evict, push, unlink, remove, activate, deactivate
local release_capped, top_active, dispatch
local orphaned

local function reject(reason, retry)
  return {kind = 'reject', reason = reason, retry = retry}
end

-- --- public API -----------------------------------------------------------------------

-- Scheduler.acquire: decide on a new request: admit it, queue it or reject it.
-- (clamp not called for a cost of 1, its own clamp whatever the limits: a Lua call costs
-- Redis some 500 instructions. docs/performance.md, `churnlua`.)
function acquire(id, h, name, weight, rank, cost, sheddable, degradable, max_wait)
  refill()
  if S.waiting > 0 then dispatch(nil) end
  local t = tenant(h, name, weight)
  if cost ~= 1 then cost = clamp(cost) end
  if fits_at_once(t, cost) then return admit_now(t, id, cost) end
  if sheddable then return shed_or_admit(t, cost, degradable) end

  local rejected = make_room(t, rank)
  if rejected ~= nil then return rejected end
  local deadline = now + max_wait
  local r = {id = id, h = h, cost = cost, rank = rank, proc = proc, deadline = deadline,
    enq = now}
  push(t, r)
  if dispatch(id) then return {kind = 'admit', lease = L.concurrency ~= nil, degraded = false} end

  local wait, reason = estimate(t, rank, r)
  if wait > max_wait + EPS or max_wait <= 0 then
    remove(t, r)
    dispatch(nil)
    return reject(reason, wait - max_wait)
  end
  -- Queued for the concurrency limit (a learned limit's Sample.waited), not only for rate
  -- tokens, its tenant's cap or the requests ahead.
  local limited = L.concurrency ~= nil and S.inflight + cost > L.concurrency
  return {kind = 'queue', deadline = deadline, wait = wait, limited = limited}
end

-- Scheduler.cancel: take a waiting request out of the queue; the rejection to send, or
-- nil if it was not waiting.
function cancel(id)
  refill()
  local r = load_waiter(id)
  if r == nil then return nil end
  local t = load_tenant(r.h)
  local reason, wait = expiry(t, r)
  remove(t, r)
  dispatch(nil)
  return reject(reason, wait)
end

-- Scheduler.release: give back a lease's concurrency; idempotent.
function release(id)
  if drop_lease(id) and S.waiting > 0 then
    refill()
    dispatch(nil)
  end
end

-- Scheduler.tick: advance time and dispatch. (Overdue waiters and idle tenants are dealt
-- with in every call here: expire_waiters, forget_idle.)
function tick()
  refill()
  dispatch(nil)
end

-- Scheduler.next_due: when a tick can next change something, or nil. Lua also wakes at the
-- earliest lease expiry when slots hold the line up (a crashed process's lease), and at a
-- deadline only after its grace (the waiter's own process cancels it at the deadline).
function next_due()
  local due = nil
  local t, r = top_active()
  if r ~= nil and L.concurrency ~= nil and S.inflight + r.cost > L.concurrency then
    local first = redis.call('ZRANGE', K.leases, '0', '0', 'WITHSCORES')
    if #first > 0 and first[1] ~= TUNING.LEASE_ANCHOR then due = tonumber(first[2]) end
  elseif r ~= nil and L.rate ~= nil then
    local needed = need(r.cost, t.f >= S.v)
    if S.tokens + EPS < needed then due = now + (needed - S.tokens) / L.rate end
  end
  local capped = M.capped_next  -- (false: none; nil: not known this call)
  if capped == nil then capped = call.first_score(K.capped); M.capped_next = capped end
  if capped and (due == nil or capped < due) then due = capped end
  local dl = M.dl_next
  -- (Lua only: not asked when the earliest deadline is known to be no earlier than due.)
  local floor = M.dl_floor
  if dl == nil and due ~= nil and floor ~= nil and floor + TUNING.DEADLINE_GRACE >= due then
    dl = false
  end
  if dl == nil then dl = call.first_score(K.deadlines); M.dl_next = dl; M.dl_floor = nil end
  if dl then
    local at = dl + TUNING.DEADLINE_GRACE
    if due == nil or at < due then due = at end
  end
  return due
end

-- Scheduler.lease_tokens: a process's lease of rate tokens (ratelease.lua). Its last
-- lease (generation `gen`, expiry `til`, `size` tokens counted out) leaves its generation's
-- count if that still counts it; then its `returned` unspent tokens go back into the
-- bucket's room and the `kept` stay counted (only if that lease has not expired: else
-- none, they lapse in the process too). Then up to `wants` whole tokens leave the bucket,
-- only while nobody waits and the budget is a rate alone. The kept and the taken are
-- counted out in the newer generation (S.rg; S.ra tokens until S.rx; the older one S.rb
-- until S.ry) until now + lease_s. Returns taken, kept, the generation and the expiry
-- (0 and 0: no lease).
function lease_tokens(gen, til, size, returned, kept, wants, lease_s)
  refill()
  if L.rate == nil then return 0, 0, 0, 0 end
  local counted = false
  if gen > 0 and gen == S.rg and now < S.rx then
    S.ra = S.ra - size
    if S.ra < 0 then S.ra = 0 end
    counted = true
  elseif gen > 0 and S.rg ~= nil and gen == S.rg - 1 and now < S.ry then
    S.rb = S.rb - size
    if S.rb < 0 then S.rb = 0 end
    counted = true
  end
  if counted then
    if returned > size then returned = size end
    if now < til then
      if kept > size - returned then kept = size - returned end
    else
      kept = 0
    end
    if returned > 0 then
      local tokens = S.tokens + returned
      local room = lease_room() - kept
      if tokens < room then S.tokens = tokens else S.tokens = room end
    end
  else
    kept = 0
  end
  local taken = 0
  if wants > 0 and L.concurrency == nil and L.tenant_rate == nil and S.waiting <= 0 then
    taken = math.floor(S.tokens + EPS)
    if taken > wants then taken = wants end
    if taken < 0 then taken = 0 end
    S.tokens = S.tokens - taken
  end
  if kept + taken <= 0 then return 0, 0, 0, 0 end
  if not (now < (S.ry or 0) and S.rb > 0) then
    -- The older generation counts nothing any more: retired, the newer one takes its
    -- place (its number too) and a new one opens.
    S.rb = S.ra or 0; S.ry = S.rx or 0
    S.ra = 0; S.rx = 0
    S.rg = (S.rg or 0) + 1
  end
  local til_new = now + lease_s
  S.ra = S.ra + kept + taken
  if til_new > S.rx then S.rx = til_new end
  return taken, kept, S.rg, til_new
end

-- --- budget -----------------------------------------------------------------------------

-- Scheduler._refill: bring the token bucket and the fair-rate window up to now. (Lua only:
-- `bucket` true, the bucket alone, for batch.lua's call before its operations: the window
-- rolls only in the operations' own refills, as in Python, where a release while nobody
-- waits has no clock.)
function refill(bucket)
  local elapsed = now - S.ts
  if elapsed > 0 then
    if L.rate ~= nil then
      local tokens, cap
      if S.rg ~= nil then
        tokens, cap = call.leased_refill(), lease_room()
      else
        tokens, cap = S.tokens + elapsed * L.rate, L.burst
      end
      if tokens < cap then S.tokens = tokens else S.tokens = cap end
    end
    S.ts = now
  end
  if not bucket and now - S.win_at >= WINDOW then window_roll(S.v, S.waiting > 0) end
end

-- core.py's _leased_refill (a module function there: no local slot here, the library's
-- main chunk is at Lua's 200): the bucket refilled from S.ts to now (before the cap at now)
-- while leases are counted: up to each generation's expiry in between, it stops at the
-- room it had then, and only the refill after the expiry is added past it.
function call.leased_refill()
  local rate, at, tokens = L.rate, S.ts, S.tokens
  local first, second = S.rx, S.ry
  if second < first then first, second = second, first end
  if at < first and first < now then
    tokens = tokens + (first - at) * rate
    local room = call.room_at(at)
    if room < tokens then tokens = room end
    at = first
  end
  if at < second and second < now then
    tokens = tokens + (second - at) * rate
    local room = call.room_at(at)
    if room < tokens then tokens = room end
    at = second
  end
  return tokens + (now - at) * rate
end

-- Scheduler._lease_room at `t` (lease_room is at now).
function call.room_at(t)
  local room = L.burst
  if t < S.rx then room = room - S.ra end
  if t < S.ry then room = room - S.rb end
  return room
end

-- Scheduler._lease_room: the most the bucket may hold: its burst less the tokens out in
-- leases that have not expired (spent or not: the process spends them without asking).
function lease_room()
  local room = L.burst
  if now < S.rx then room = room - S.ra end
  if now < S.ry then room = room - S.rb end
  return room
end

-- Scheduler._clamp: a cost above the burst or the concurrency could never be admitted.
-- (Comparisons rather than math.min and math.max, the same values: a call of a C function
-- costs a Lua call more than its work; L.whole_burst is math.floor(L.burst).)
function clamp(cost)
  local limit = cost
  if L.rate ~= nil and L.whole_burst < limit then limit = L.whole_burst end
  if L.concurrency ~= nil and L.concurrency < limit then limit = L.concurrency end
  if limit > 1 then return limit end
  return 1
end

-- Scheduler._need: tokens that must be in the bucket to admit `cost`.
function need(cost, reserve)
  if not reserve then return cost end
  return math.min(cost + L.reserve, L.burst)
end

-- Scheduler._fits: does the budget have room for `cost` now?
-- (need called only for a reserve: without one it is `cost`. Here and in fits_at_once, a
-- step that returns at once is not called: a Lua call costs Redis some 500 instructions,
-- more than the tests; these run once per acquire. docs/performance.md, `churnlua`.)
function fits(cost, reserve)
  if L.rate ~= nil then
    local needed = cost
    if reserve then needed = need(cost, reserve) end
    if S.tokens + EPS < needed then return false end
  end
  return L.concurrency == nil or S.inflight + cost <= L.concurrency
end

-- Scheduler._fits_at_once: nobody waits for the budget, and it has room for `cost`.
-- (cap_ok called only with a tenant rate: without one it allows any cost.)
function fits_at_once(t, cost)
  return t.st == IDLE and not (S.waiting > 0 and call.anyone_in_line())
    and (L.tenant_rate == nil or cap_ok(t, cost)) and fits(cost, false)
end

-- Scheduler._cap_ok: does the tenant's own rate cap allow `cost` now?
function cap_ok(t, cost)
  if L.tenant_rate == nil then return true end
  refill_cap(t)
  return t.cap + EPS >= cost
end

-- Scheduler._refill_cap
function refill_cap(t)
  if L.tenant_rate ~= nil and now > t.cap_at then
    t.cap = math.min(L.tenant_burst, t.cap + (now - t.cap_at) * L.tenant_rate)
    t.dirty = true
  end
  if now > t.cap_at then t.cap_at = now end
end

-- --- fairness -------------------------------------------------------------------------------

-- Scheduler._fair_rate: the fair admission rate per unit of weight (0: unknown).
function fair_rate(extra_weight)
  local measured = window_fresh()
  if S.v_rate > 0 and measured then return S.v_rate end
  local capacity = L.rate
  if capacity == nil and measured then capacity = S.thr end
  local weight = S.wsum + (extra_weight or 0)
  if capacity == nil or capacity == 0 then return 0 end
  -- (Below EPS: none in line; a sum of weights added and taken away one by one drifts.)
  if weight <= EPS then weight = 1 end
  return capacity / weight
end

-- Scheduler._credit: how far behind the virtual clock a tenant's tag may lag. With no fair
-- rate (slots alone, no throughput measured fresh) the last throughput measured bounds it.
function credit()
  local rate = fair_rate(0)
  if rate <= 0 and S.thr > 0 then
    local weight = S.wsum
    if weight <= EPS then weight = 1 end
    rate = S.thr / weight
  end
  return POL.credit * rate
end

-- Scheduler._take: charge an admission to the budget, the tenant's cap and its tag.
function take(t, id, cost, p)
  if L.rate ~= nil then S.tokens = S.tokens - cost end
  if L.tenant_rate ~= nil then t.cap = t.cap - cost end
  if L.concurrency ~= nil then
    add_lease(id, cost)
  else
    -- Lease-less: kept briefly so a retried acquire is answered, not redone (store.lua's
    -- recent, written once per call by save). (In place: a Lua call cost more than this.)
    local ids = recent[p]
    if ids == nil then recent[p] = {id} else ids[#ids + 1] = id end
  end
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

-- Scheduler._charge_leased: a tenant's admissions from leases (`cost` in all, `last` the
-- cost of the last one) charged to its tag, the virtual clock and the window, as take one
-- by one would have (the tokens left with the lease; ratelease.lua). A tenant in line is
-- put back in line by its new tag.
function charge_leased(t, cost, last)
  local active = t.st == ACTIVE
  if active then deactivate(t) end
  local start = t.f
  if start < S.v then  -- behind the clock: its banked credit is bounded
    start = math.max(start, S.v - credit())
  end
  local finish = start + cost / t.w
  t.f = finish
  local last_start = finish - last / t.w
  if last_start > S.v then S.v = last_start end
  S.win_cost = S.win_cost + cost
  t.dirty = true
  if active then activate(t) end
end

-- An admission at once, with a lease or without one: a decision no one changes, made once
-- (with its reply line, batch.lua's encode) rather than a table per admission.
-- (Written out: at load, a function library may use no standard library.)
call.ADMITTED = {
  [true] = {kind = 'admit', lease = true, degraded = false,
    line = REPLY.admitted .. SEP .. '1' .. SEP .. '0'},
  [false] = {kind = 'admit', lease = false, degraded = false,
    line = REPLY.admitted .. SEP .. '0' .. SEP .. '0'},
}

-- Scheduler._admit_now (fast.lua's fast_acquire writes it out)
function admit_now(t, id, cost)
  take(t, id, cost, proc)
  return call.ADMITTED[L.concurrency ~= nil]
end

-- Scheduler._shed_or_admit: a sheddable request that cannot go at once.
function shed_or_admit(t, cost, degradable)
  if degradable then return {kind = 'admit', lease = false, degraded = true} end
  if not cap_ok(t, cost) then return reject('tenant_rate_cap', (cost - t.cap) / L.tenant_rate) end
  return reject('shed', drain_time())
end

-- Scheduler._expiry: the reason and wait of a waiter that ran out of time.
function expiry(t, r)
  local wait, reason = estimate(t, r.rank, r)
  if reason == 'overloaded' then reason = 'expired' end
  return reason, wait
end

-- Scheduler._drain_time: expected time until everything now waiting is admitted.
function drain_time()
  local rate = L.rate
  if rate == nil then
    if window_fresh() then rate = S.thr else rate = 0 end
  end
  if rate == nil or rate <= 0 then return 1 end
  return S.qcost / rate
end

-- Scheduler._estimate: expected wait of a request at `rank` in t's queue, and who is to
-- blame.
function estimate(t, rank, r)
  local ahead = 0
  for i = 1, rank + 1 do ahead = ahead + t.c[i] end
  local cost = 1
  if r ~= nil then ahead = ahead - r.cost; cost = r.cost end
  local extra = 0
  if t.st == IDLE then extra = t.w end
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
    if bound >= CAP_BLAME_SHARE * wait and bound > 0 then
      wait = math.max(wait, bound); reason = 'tenant_rate_cap'
    end
  end
  return wait, reason
end

-- --- queues -------------------------------------------------------------------------------

-- Scheduler._tenant: the tenant of an arriving request, made if new; marks it as seen.
function tenant(h, name, weight)
  local t = load_tenant(h, weight)
  if t.nm == nil then t.nm = name end  -- made anew: written with its state (save_tenant)
  touch(t)
  return t
end

-- Scheduler._forget_idle: drop idle tenants past the idle time, and the least recent
-- beyond max_tenants: all of those (one call adds at most a batch of tenants), so the
-- excess never builds up. Only calls that created a tenant can exceed the bound; idle ones
-- are swept once a period, or on every call while a backlog of them is left. Tenants with
-- waiters are not in P:tenants (Lua only: push takes them out, unlink puts them back, as
-- seen then), so however many wait, no sweep reads one: Python skips them in memory.
function forget_idle()
  call.flush_idle()
  local due = now >= S.fi
  if not (fresh or due) then return end
  -- (A capped tenant is kept until its cap has refilled: made anew, its cap would be full.)
  local idle_after = call.kept_s()
  local stale = redis.call('ZRANGEBYSCORE', K.tenants, '-inf', call.idle_score(now - idle_after), 'LIMIT', '0',
    num(TUNING.SWEEP_BATCH))
  if #stale < TUNING.SWEEP_BATCH then S.fi = now + TUNING.SWEEP_PERIOD end
  local ranked = #stale  -- (the list's first members read: the stale ones, the oldest)
  -- (Counted without the list's anchor, keys.IDLE_ANCHOR, at +inf: it is never among the
  -- oldest taken below, as the excess is at most the tenants on the list.)
  local listed = redis.call('ZCOUNT', K.tenants, '-inf', '(+inf')
  if due then call.sweep_strays(listed) end  -- (storage only: P:T's fields the list lost)
  local excess = listed - POL.max_tenants
  if excess > 0 then
    local oldest = redis.call('ZRANGE', K.tenants, '0', num(math.min(excess, TUNING.EXCESS_BATCH) - 1))
    if #oldest > ranked then ranked = #oldest end
    if #stale == 0 then  -- (most calls: the excess alone)
      stale = oldest
    else
      for i = 1, #oldest do stale[#stale + 1] = oldest[i] end
    end
  end
  if #stale > 0 then call.drop_idle_tenants(stale, ranked) end
end

-- Scheduler._make_room: enforce the queue limits before queueing at `rank` in t's queue.
-- A more urgent arrival displaces the lowest-priority newest entry; a full fleet-wide
-- queue drops from the tenant with the longest queue.
function make_room(t, rank)
  if t.n >= POL.tenant_queue_limit then
    local victim = last_of(t)
    if victim == nil or victim.rank <= rank then
      local wait = estimate(t, rank, nil)
      return reject('tenant_queue_full', wait)
    end
    evict(victim, 'tenant_queue_full')
  end
  if S.waiting >= POL.queue_limit then
    local top = redis.call('ZREVRANGE', K.qlen, '0', '0')
    if #top == 0 then return reject('queue_full', drain_time()) end
    local heavy = load_tenant(top[1])
    local victim = last_of(heavy)
    local own = heavy.h == t.h
    if victim == nil or (own and victim.rank <= rank) or ((not own) and heavy.n <= t.n + 1) then
      if own then return reject('tenant_queue_full', drain_time()) end
      return reject('queue_full', drain_time())
    end
    evict(victim, 'tenant_queue_full')
  end
  return nil
end

-- Scheduler._evict: drop a waiter to make room, telling its process why.
function evict(r, reason)
  local t = load_tenant(r.h)
  local wait = estimate(t, r.rank, r)
  remove(t, r)
  emit_evicted(r.proc, r.id, reason, wait)
end

-- Scheduler._push: queue a waiter at the back of its priority; an idle tenant gets in line.
-- The first to wait starts a fair-rate window (measured only while someone waits) and
-- drops the fair rate last measured (a drained queue's); the throughput stands.
function push(t, r)
  if S.waiting == 0 then window_roll(S.v, false); S.v_rate = 0 end
  local known, top_t, top_r = M.top_known, M.top_t, M.top_r  -- Lua only (line_after_push)
  local was_idle = t.st == IDLE
  S.seq = S.seq + 1
  enqueue(t, r)  -- (store.lua: its tenant's field or queue key)
  local deadline = num(r.deadline)
  save_waiter(r, deadline)
  redis.call('ZADD', K.deadlines, deadline, r.id)
  call.deadline_added(r.deadline, deadline)
  local c = t.c
  if c == call.ZERO_COSTS then c = call.own_costs(t) end  -- (a new tenant's: shared)
  c[r.rank + 1] = c[r.rank + 1] + r.cost
  t.n = t.n + 1
  if t.n == 1 then call.seen_idle(t.h, false) end  -- off the idle list (forget_idle)
  redis.call('ZADD', K.qlen, num(t.n * PUSH_SPAN + S.seq % PUSH_SPAN), t.h)
  S.waiting = S.waiting + 1
  S[RANK_COUNT[r.rank + 1]] = S[RANK_COUNT[r.rank + 1]] + 1
  S.qcost = S.qcost + r.cost
  t.dirty = true
  if t.st == IDLE then activate(t) end
  call.line_after_push(t, r, was_idle, known, top_t, top_r)
end

-- Scheduler._unlink: take a waiter out of every queue and count.
function unlink(t, r)
  dequeue(t, r)
  redis.call('HDEL', K.waiters, r.id)
  redis.call('ZREM', K.deadlines, r.id)
  call.deadline_left(r.deadline)
  M.top_known = false
  local c = t.c  -- (its own: a tenant whose hash was lost reads as new)
  if c == call.ZERO_COSTS then c = call.own_costs(t) end
  c[r.rank + 1] = c[r.rank + 1] - r.cost
  t.n = t.n - 1
  if t.n <= 0 then
    redis.call('ZREM', K.qlen, t.h)
    call.seen_idle(t.h, true)
    t.touched = true
  else
    redis.call('ZINCRBY', K.qlen, num(-PUSH_SPAN), t.h)
  end
  S.waiting = S.waiting - 1
  S[RANK_COUNT[r.rank + 1]] = S[RANK_COUNT[r.rank + 1]] - 1
  S.qcost = S.qcost - r.cost
  t.dirty = true
end

-- Scheduler._remove: a waiter leaves without being admitted.
function remove(t, r)
  unlink(t, r)
  if t.n <= 0 then deactivate(t) end
end

-- Scheduler._activate: put a tenant in line for the budget, by its finish tag.
function activate(t)
  t.st = ACTIVE; t.dirty = true
  S.wsum = S.wsum + t.w
  S.seq = S.seq + 1
  t.am = active_member(t)
  redis.call('ZADD', K.active, num(t.f), t.am)
  M.top_known = false
end

-- Scheduler._deactivate: take a tenant out of line (active or capped).
function deactivate(t)
  if t.st == ACTIVE then
    S.wsum = S.wsum - t.w
    redis.call('ZREM', K.active, t.am)
    M.top_known = false
  elseif t.st == CAPPED then
    redis.call('ZREM', K.capped, t.h)
    M.capped_next = nil
  end
  t.st = IDLE; t.dirty = true
  if S.waiting == 0 then S.wsum = 0 end
end

-- Scheduler._release_capped: capped tenants whose cap has refilled get back in line.
function release_capped()
  -- Lua only: once a call (`now` does not move), unless dispatch capped a tenant since.
  if M.capped_checked then return end
  M.capped_checked = true
  local first = M.capped_next  -- (known: the last call's, store.lua's recall_line)
  if first == nil then first = call.first_score(K.capped) end
  M.capped_next = first
  if not first or first > now + EPS then return end
  M.capped_next = nil
  local ready = redis.call('ZRANGEBYSCORE', K.capped, '-inf', num(now + EPS))
  for _, h in ipairs(ready) do
    redis.call('ZREM', K.capped, h)
    local t = load_tenant(h)
    if t.st == CAPPED then activate(t) end
  end
end

-- Scheduler._top_active: the tenant first in line and its head waiter, or nil.
function top_active()
  if M.top_known then return M.top_t, M.top_r end  -- Lua only: asked once a call
  while true do
    local top = redis.call('ZRANGE', K.active, '0', '0')
    if #top == 0 then
      M.top_known = true; M.top_t = nil; M.top_r = nil
      return nil
    end
    local t = tenant_of_member(top[1])
    local r = head_of(t)
    if r ~= nil then
      M.top_known = true; M.top_t = t; M.top_r = r
      return t, r
    end
    -- Inconsistent (keys lost): take the tenant out of line.
    redis.call('ZREM', K.active, top[1]); S.wsum = S.wsum - t.w; t.st = IDLE; t.n = 0
    t.q1 = nil; t.q1r = nil
    local c = call.own_costs(t)
    for rank = 1, NRANK do c[rank] = 0 end
    t.dirty = true
  end
end

-- Scheduler._dispatch: admit waiters while the budget allows, lowest virtual tag first.
-- Returns true if `watch` (a request id) was admitted: its caller reports it directly.
function dispatch(watch)
  release_capped()
  local watched = false
  for i = 1, TUNING.DISPATCH_LIMIT + 1 do
    local t, r = top_active()
    if t == nil then break end
    if i > TUNING.DISPATCH_LIMIT then more = true; break end  -- Lua only: the rest next tick
    if orphaned(r) then  -- Lua only
      remove(t, r)
    elseif not cap_ok(t, r.cost) then
      redis.call('ZREM', K.active, t.am)
      S.wsum = S.wsum - t.w
      t.st = CAPPED; t.dirty = true
      redis.call('ZADD', K.capped, num(now + (r.cost - t.cap) / L.tenant_rate), t.h)
      M.top_known = false; M.capped_checked = false; M.capped_next = nil
    elseif not fits(r.cost, t.f >= S.v) then
      break
    else
      unlink(t, r)
      deactivate(t)  -- back in line below, with its new tag, if more wait
      take(t, r.id, r.cost, r.proc)
      if t.n > 0 then activate(t) end
      M.granted = t  -- Lua only: kept for the next call (store.lua, keep_line)
      if r.id == watch then
        watched = true
      else
        emit_granted(r.proc, r.id, now - r.enq, L.concurrency ~= nil)
      end
    end
  end
  return watched
end

-- --- only in Lua (scheduler README, "Only in Lua") -------------------------------------------

-- A retried acquire (its first reply was lost): its decision from what exists, or nil if
-- nothing does (then it is decided anew).
local function retried(id)
  local r = load_waiter(id)
  if r ~= nil then
    -- (Why it queued is not kept with it: read as not for the limit, the held-back
    -- rule's conservative side; a retry is a lost reply, rare.)
    return {kind = 'queue', deadline = r.deadline, wait = math.max(0, r.deadline - now),
      limited = false}
  end
  local lease = admitted(id)
  if lease == nil then return nil end
  return {kind = 'admit', lease = lease, degraded = false}
end

-- A waiter of a process whose heartbeat has lapsed (it crashed) is dropped, not granted: a
-- grant would only hold capacity until its lease expired. A heartbeat lapses when the
-- leases renewed with it expire (renew.lua), so capacity a crashed process frees never
-- goes to its own waiters. Every batch call registers its caller, so a process that queued
-- a request was alive when it did.
function orphaned(r)
  if r.proc == proc then return false end
  if call.beat_known(r.proc) then return false end  -- Lua only: not asked (store.lua)
  local beat = redis.call('ZSCORE', K.procs, r.proc)
  if not beat then return true end
  beat = NUMBERS[beat] or tonum(beat)
  call.beat_seen(r.proc, beat, S.ep)
  return beat <= now
end

-- Leases not renewed in time (their process crashed) give their concurrency back.
local function expire_leases()
  if S.inflight - held_back <= 0 and S.la ~= 1 then return end  -- no lease to expire
  -- (None before S.le, a time no lease expires before: store.lua's put_lease, as fast.lua's
  -- lapsed_lease goes by it.)
  if S.le ~= nil and now < S.le then return end
  local dead = redis.call('ZRANGEBYSCORE', K.leases, '-inf', num(now), 'LIMIT', '0', num(TUNING.EXPIRY_BATCH))
  for _, id in ipairs(dead) do drop_lease(id) end
end

-- Waiters of processes that died with requests queued: past deadline + grace.
local function expire_waiters()
  -- The earliest deadline first: if none is past its grace (nearly always), that is all,
  -- and next_due knows it.
  local first = M.dl_next  -- (known: the last call's, store.lua's recall_line)
  local floor = M.dl_floor  -- (none is past its grace: store.lua's deadline_left)
  if first == nil and floor ~= nil and floor > now - TUNING.DEADLINE_GRACE then return end
  if first == nil then first = call.first_score(K.deadlines); M.dl_floor = nil end
  M.dl_next = first
  if not first or first > now - TUNING.DEADLINE_GRACE then return end
  M.dl_next = nil
  refill()  -- (their expiry estimates: Python's tick refills before it evicts)
  local dead = redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', num(now - TUNING.DEADLINE_GRACE),
    'LIMIT', '0', num(TUNING.EXPIRY_BATCH))
  for _, id in ipairs(dead) do
    local r = load_waiter(id)
    if r ~= nil then
      local t = load_tenant(r.h)
      local reason, wait = expiry(t, r)
      remove(t, r)
      emit_evicted(r.proc, id, reason, wait)
    else
      redis.call('ZREM', K.deadlines, id)
    end
  end
end

-- The fleet ticks once: the first process to ask claims the tick at `due`; others keep a
-- later fallback in case it dies. Returns when this process should tick.
local function claim_tick(due)
  if S.tk_by ~= proc and S.tk_by ~= '' and S.tk_at >= now - TUNING.TICK_SLACK and
      S.tk_at <= due + EPS then
    return math.max(due, S.tk_at) + TUNING.TICK_SLACK
  end
  S.tk_at = due; S.tk_by = proc
  return due
end

-- A process shuts down (batch.lua's leave): its waiters among `ids` leave their queues
-- together, unlink's and remove's steps summed by tenant, one command per key instead of
-- several per waiter; an id no longer waiting gives back the lease a grant gave it
-- meanwhile, if any. Waiters of other processes are left alone. The tenants and the idle
-- list are written before it returns. The caller dispatches once after: what they held up
-- goes to the others' waiters.
local function leave(ids)
  local rs = call.load_waiters(ids)
  local mine, queued, tenants = {}, {}, {}  -- their ids; by tenant, its ids; the tenants
  for i, r in ipairs(rs) do
    if not r then
      drop_lease(ids[i])
    elseif r.proc == proc then
      local t = load_tenant(r.h)
      local q = queued[r.h]
      if q == nil then q = {}; queued[r.h] = q; tenants[#tenants + 1] = t end
      q[#q + 1] = r.id
      mine[#mine + 1] = r.id
      local c = t.c
      if c == call.ZERO_COSTS then c = call.own_costs(t) end
      c[r.rank + 1] = c[r.rank + 1] - r.cost
      t.n = t.n - 1
      S[RANK_COUNT[r.rank + 1]] = S[RANK_COUNT[r.rank + 1]] - 1
      S.qcost = S.qcost - r.cost
    end
  end
  if #mine == 0 then return end
  redis.call('HDEL', K.waiters, unpack(mine))
  redis.call('ZREM', K.deadlines, unpack(mine))
  call.deadline_left(-math.huge)  -- (whichever left: the earliest, perhaps)
  M.top_known = false
  S.waiting = S.waiting - #mine
  for _, t in ipairs(tenants) do
    local q = queued[t.h]
    local left = #q
    for i = 1, left do  -- (its one waiter in its field: store.lua's enqueue)
      if q[i] == t.q1 then
        t.q1 = nil; t.q1r = nil
        q[i] = q[left]; q[left] = nil
        break
      end
    end
    if q[1] ~= nil then redis.call('ZREM', queue_key(t.h), unpack(q)) end
    t.dirty = true
    if t.n <= 0 then
      redis.call('ZREM', K.qlen, t.h)
      call.seen_idle(t.h, true)
      t.touched = true
      deactivate(t)
    else
      redis.call('ZINCRBY', K.qlen, num(-PUSH_SPAN * left), t.h)
    end
  end
  -- Their writes now, in the work the caller measures: a call of one waiter per tenant
  -- wrote as much after its work check as before it.
  call.save_now(tenants)
  call.flush_idle()
end
