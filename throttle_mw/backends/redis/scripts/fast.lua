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
-- A release goes by lean_release first (below): most need not even what fast_release does.

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

-- The work clock: Lua's os.clock where the server has one (Redis 7.4+, Valkey: the
-- server's CPU time), false where it has none (Redis 6.2, 7.0: `os` is no global there),
-- nil until looked for (once per loaded library, or per EVAL call that measures its work).
-- Since Redis 7.2, and in Valkey, TIME is frozen for a script's whole run (redis/redis
-- #10300: every TIME of a call reads its start), so a work bound by TIME never stops a
-- call there; os.clock was added for that (redis/redis#12971). Redis 7.2.x has neither: a
-- call there is bounded by its count alone (WORK_UNITS).
local cpu_clock = nil
local function find_clock()
  local found, os_lib = pcall(function() return os end)
  cpu_clock = found and type(os_lib) == 'table' and type(os_lib.clock) == 'function'
    and os_lib.clock
end

-- The work clock in microseconds (only its differences mean anything): os.clock's, else
-- Redis's TIME (the test clock override aside), exact in a double: made once per work
-- check (the start's two texts were parsed again at each).
local function clock_us()
  if cpu_clock == nil then find_clock() end
  local clock = cpu_clock
  if clock then return clock() * US_PER_S end
  local t = redis.call('TIME')
  return tonum(t[1]) * US_PER_S + tonumber(t[2])  -- (the seconds: the same text a while)
end

-- The start of a call's work, in microseconds of the work clock: init's TIME where that is
-- the clock (the test clock override aside: then TIME read now), so its state, its expiries
-- and the operations' split count in it, not the operations only; with os.clock, read now
-- (after the state's load: a few microseconds of the call not counted, where reading it in
-- init would cost every call, the fast ones too, a clock read).
function call.start_us()
  if cpu_clock == nil then find_clock() end
  local s = call.time_s
  if s ~= nil and cpu_clock == false then return s * US_PER_S + call.time_us end
  return clock_us()
end

-- batch.lua's work check before operation i (i - 1 taken; the call started at `started`,
-- call.start_us): true if the call has done its share (the rest is deferred), else false
-- and the operation of the next check. The share is bounded two ways:
-- - by its work, counted: 1 an operation taken, TUNING.MADE_UNITS more for a tenant it
--   made (a new tenant is asked for, written with its TTL, listed idle and, at the tenant
--   bound, drops another after the loop: a few commands, where an operation on a tenant
--   already loaded runs one or none), at most TUNING.WORK_UNITS, whatever the clock says;
-- - by the work clock (clock_us): what it has run plus what is still to come after the loop
--   (the idle list, the drops, the last tenants' writes, the state's write-back: they grow
--   with what was taken) reaches TUNING.WORK_US. That rest is charged in advance at the
--   call's own rate so far, TUNING.AFTER_SHARE of its time per operation taken (its start
--   counted in that rate: an over-estimate).
-- While nobody waits, the next check comes after as many operations as would take half the
-- work left at that rate, TUNING.WORK_CHECK to TUNING.WORK_STRIDE of them (a check, TIME and
-- its parsing, its tenants' HSET, cost some 15 k instructions), and never past the counted
-- bound; every TUNING.WORK_CHECK while anyone waits (then an operation can dispatch up to
-- TUNING.DISPATCH_LIMIT). The rate: at a call's first check, its time so far per operation
-- taken (its start, the state and the split, counted in: an over-estimate); at the later
-- ones, per unit of counted work since that first check (M.work_spent, M.work_units, made
-- anew with the call's tables), the operations ahead each counted as making a tenant
-- (1 + MADE_UNITS): the start no longer taken for the loop's pace (a call at its clock's
-- bound checked some 8 times in 27 operations, most of them from that over-estimate), and
-- a change from cheap operations to new tenants still foreseen. docs/performance.md,
-- `churn7`.
function call.work_check(i, started)
  call.save_made()  -- (store.lua: new tenants' writes count in the work)
  local taken = i - 1
  local units = taken
  local made = M.made
  if made ~= nil then units = units + TUNING.MADE_UNITS * #made end
  -- (operations that surely fit: one counts 1 + MADE_UNITS at most, a tenant made)
  local room = math.floor((TUNING.WORK_UNITS - units) / (1 + TUNING.MADE_UNITS))
  if room < 1 then return true, i end
  local spent = clock_us() - started
  local left = TUNING.WORK_US - spent - spent * TUNING.AFTER_SHARE
  if left <= 0 then return true, i end
  local stride = TUNING.WORK_CHECK
  if S.waiting == 0 then
    local ahead
    local spent0 = M.work_spent
    if spent0 == nil then
      M.work_spent = spent; M.work_units = units
      ahead = math.floor(left * taken / (2 * spent * (1 + TUNING.AFTER_SHARE)))
    else
      ahead = math.floor(left * (units - M.work_units) / (2 * (spent - spent0)
        * (1 + TUNING.AFTER_SHARE) * (1 + TUNING.MADE_UNITS)))
    end
    if ahead > TUNING.WORK_STRIDE then ahead = TUNING.WORK_STRIDE end
    if ahead > stride then stride = ahead end
  end
  if stride > room then stride = room end
  return false, i + stride
end

local function flag(yes)
  if yes then return '1' end
  return '0'
end

-- A decision's reply line. (One concatenation each: a table made and joined for three
-- fields cost more than the string.)
local function encode(d)
  if d.line ~= nil then return d.line end  -- (call.ADMITTED's)
  if d.kind == 'admit' then return REPLY.admitted .. SEP .. flag(d.lease) .. SEP .. flag(d.degraded) end
  if d.kind == 'queue' then
    return REPLY.queued .. SEP .. call.deadline_text(d.deadline) .. SEP .. num(d.wait) .. SEP
      .. flag(d.limited)
  end
  return REPLY.rejected .. SEP .. d.reason .. SEP .. num(d.retry)
end

-- batch.lua's operations, each to its reply line.
-- An acquire as the client writes it (protocol.py's acquire_op; store.lua's
-- call.split_acquire): anything else is no operation of this library's.
-- (A Lua call costs Redis some 500 instructions, more than the tests of a step that returns
-- at once: on this path, once per acquire, the steps that do nothing in most calls are
-- skipped here rather than called: live_weight once the call knows no live weight is set
-- (M.no_weights: then it returns the given weight), encode for
-- a decision with its line made (call.ADMITTED's). docs/performance.md, `churnlua`.)
local function do_acquire(op)
  -- (call.split_acquire's match and its kept tail, written out: a Lua call an acquire
  -- spared, docs/performance.md, `churn11`.)
  local id, h, name, tail = string.match(op, call.ACQUIRE_PATTERN)
  if id == nil then return nil end
  tail = call.tails[tail] or call.acquire_tail(tail)
  if not tail then return nil end
  if tail.retry then
    local known = retried(id)
    if known ~= nil then return encode(known) end
  end
  local weight = tail.weight
  if not M.no_weights then weight = live_weight(h, weight) end
  local d = acquire(id, h, name, weight, tail.rank, tail.cost, tail.sheddable, tail.degradable,
    tail.max_wait)
  return d.line or encode(d)
end

-- (call's, not a local: batch.lua's main chunk, under EVAL one chunk with every file, may
-- have at most 200 locals at once, and its loop's branch was the most.)
function call.do_reclaim(op)
  local _, id, cost, old = string.match(op, RECLAIM_PATTERN)
  return REPLY.reclaimed .. SEP .. flag(reclaim(id, tonumber(cost), old))
end

local function do_cancel(id)
  local d = cancel(id)
  if d ~= nil then return table.concat({REPLY.cancelled, d.reason, num(d.retry)}, SEP) end
  local lease = admitted(id)
  if lease == nil then return REPLY.unknown end
  return REPLY.already_admitted .. SEP .. flag(lease)
end

-- A leave: its ids, TUNING.LEAVE_CHUNK at a time (core.lua's leave) while the call's work
-- allows (TUNING.LEAVE_US from `started`, the call's start if it measures its work: the
-- rest of the call is deferred), then one dispatch. Its reply says how many it took, from
-- the first (the caller sends the rest again), and whether the call's work is done.
local function do_leave(text, started)
  local start = started or clock_us()
  local done, over = 0, false
  local next_id = string.gmatch(text, '[^' .. SEP .. ']+')  -- (split only as far as taken)
  while true do
    local chunk = {}
    for id in next_id do
      chunk[#chunk + 1] = id
      if #chunk == TUNING.LEAVE_CHUNK then break end
    end
    if #chunk == 0 then break end
    leave(chunk)
    done = done + #chunk
    if clock_us() - start >= TUNING.LEAVE_US then
      over = true  -- (perhaps all were taken: the caller finds out from `done`)
      break
    end
  end
  refill()
  dispatch(nil)
  return REPLY.left .. SEP .. num(done), over
end

-- Loads the state into S (store.lua's load_hot_state) and the limits (load_limits_stamped,
-- from `limits`: batch.lua's ARGV[4]); false if the full call must run instead.
-- Whether the state leaves the fast path nothing the full call would do: nobody waits, no
-- TTL refresh (xp), idle sweep (fi) or, for an operation that rolls the fair-rate window
-- (`rolls`: an acquire or a charge, whose refill rolls it, core.lua's refill), a window
-- roll due, an epoch made, no reclaim grace running (an epoch to make or a grace are the
-- full call's: hold_back, store.lua's "A state made anew"). A release while nobody waits
-- rolls no window in the full call either (core.lua's release: no refill; batch.lua's
-- refill(true), the bucket alone), so a window run out does not stop fast_release or
-- lean_release (it did: every release then went by the full call until an acquire rolled
-- the window). The one test of fast_state, fast_acquire, lean_release and
-- call.lean_charges, from the state's fields as each has them.
local function quiet(waiting, xp, fi, win_at, ep, rc, rolls)
  return waiting == 0 and now < (xp or 0) and now < (fi or 0) and win_at ~= nil
    and (not rolls or now - win_at < WINDOW) and ep ~= '' and now >= (rc or 0)
end

local function fast_state(limits, vals)
  if not load_hot_state(vals) then return false end  -- a new budget
  load_limits_stamped(limits, false)
  S.la = S.la or 0; S.lk = S.lk or 0  -- as load_state
  return quiet(S.waiting, S.xp, S.fi, S.win_at, S.ep, S.rc, false)  -- (fast_release's)
end

-- A lease past its expiry (its process crashed): expire_leases must run first. Asked of
-- P:leases only once `now` reaches S.le, a time no lease expires before (store.lua's
-- put_lease keeps it one), which then becomes the first lease's expiry; with none (or
-- the anchor alone), the earliest a lease made now would expire (any lease added lowers
-- it). So P:leases is read about once per lease TTL, not on every acquire.
local function lapsed_lease()
  if S.inflight <= 0 then return false end
  local bound = S.le
  if bound ~= nil and bound > now then return false end
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  if #first > 0 and first[1] ~= TUNING.LEASE_ANCHOR then
    bound = tonumber(first[2])
  else
    bound = now + POL.lease_ttl
  end
  S.le = bound
  return bound <= now
end

local function give_up()
  S, S0, T = {}, {}, {}
  return nil
end

-- finish for fast_acquire's reply (one of FAST_ADMITTED): with a kept trailer, the whole
-- reply is kept with it too (memo.replies, by line; made anew with the trailer).
function call.finish_admitted(line, procs)  -- (call's: a chunk has at most 200 locals)
  local memo = limits_memo
  if memo.trailer_np == procs and memo.trailer_ep == S.ep then
    local replies = memo.replies
    if replies == nil or memo.replies_for ~= memo.trailer then
      replies = {}; memo.replies = replies; memo.replies_for = memo.trailer
    end
    local reply = replies[line]
    if reply == nil then reply = line .. LINE .. memo.trailer; replies[line] = reply end
    return reply
  end
  return finish(line, nil, procs)
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
  local id, h, _, tail = call.split_acquire(op, call.lasting)
  if id == nil or tail.retry then return nil end
  local weight = tail.weight
  if not call.load_acquire_state() then return give_up() end  -- a new budget
  load_limits_stamped(limits, false)
  if not quiet(S.waiting, S.xp, S.fi, S.win_at, S.ep, S.rc, true)
    or S.inflight > 0 and lapsed_lease() then
    return give_up()
  end
  if S.tokens ~= nil and S.tokens > L.burst then S.tokens = L.burst end  -- as load_state
  -- (No live weight set, known by the stamped reading: live_weight would return the
  -- caller's.)
  local memo = limits_memo
  if not (memo.no_weights and memo.lv == S.lv) then weight = live_weight(h, weight) end
  -- (Its field of P:T: f, w, cap, cap_at, st and xp; store.lua's call.read_head.)
  local f0, w0, cap0, cap_at0, st, xp, wt, capt, rest = call.read_head(h)
  if f0 == nil then return give_up() end
  if st ~= IDLE or now >= xp then return give_up() end  -- (IDLE: nothing waits, n = 0)
  local t = FAST_T
  t.h = h; t.dirty = false; t.f = f0; t.w = w0; t.cap = cap0; t.cap_at = cap_at0
  t.st = st; t.xp = xp; t.n = 0; t.wt = wt; t.capt = capt; t.rest = rest
  if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  refill()
  local cost = clamp(tail.cost)
  if not fits_at_once(t, cost) then return give_up() end
  t.dirty = true  -- (touch: its idle-list entry is call.save_acquire's)
  take(t, id, cost, proc)  -- (admit_now without its decision: the reply line is made once)
  t.f0 = f0; t.w0 = w0; t.cap0 = cap0; t.cap_at0 = cap_at0  -- (call.save_acquire compares)
  if L.concurrency ~= nil then return FAST_ADMITTED[2] end
  return FAST_ADMITTED[1]
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
-- From release.lua (`limits` nil: its short reply states none, so neither S nor the
-- limits are touched): `known`, the epoch its caller knew, must be the state's (else
-- false, vals: the reply must tell the caller the epoch, with the rest of the trailer).
local function lean_release(id, limits, known)
  local vals = redis.call('HMGET', K.state, unpack(HOT_FIELDS))
  local packed = unpack_state(vals[1])
  if packed == nil then return false, nil end  -- a new budget
  local p, at = packed.vals, call.AT
  local inflight, ep, lv = tonum(vals[2]), vals[4] or '', vals[5] or ''
  if inflight == nil
    or not quiet(tonum(vals[3]), p[at.xp], p[at.fi], p[at.win_at], ep, p[at.rc], false) then
    return false, nil
  end
  local np, pc = p[at.np], p[at.pc]
  if (p[at.lk] or 0) > 0 or (p[at.la] == 1 and inflight <= 1) or lv == '' or np == nil
    or pc == nil or now >= pc or now < pc - TUNING.PROCS_RECOUNT
    or limits == nil and ep ~= known then
    return false, vals
  end
  if limits ~= nil then
    S.lv = lv
    load_limits_stamped(limits, false)  -- (the reply's limits; stamped already: no write)
  end
  if redis.call('ZREM', K.leases, id) == 1 then
    redis.call('HSET', K.state, 'inflight', num(math.max(0, inflight - 1)))
  end
  if limits ~= nil then S.np = np; S.ep = ep end
  return true
end

-- ratelease.lua's charges (its ARGV[14], `count` of them) when every tenant charged is
-- known and idle: core.lua's charge_leased as the full call runs it, reading and writing
-- only what that can change, as fast_acquire does for an acquire. Each tenant's text read
-- (one HGET of its field of P:T: call.read_head; charge_leased uses no cap), its f (and w,
-- reweighed) written back (call.put_head), its last use on the idle list (one ZADD for
-- all: touch and call.flush_idle, as the full call's forget_idle); no tenant made, so no
-- sweep of the tenant bound. The state is the hot one (load_hot_state) and is written by
-- ratelease.lua (every packed number it changed, as a call without charges). It gives up,
-- before writing or charging anything, wherever the full call could do more: a TTL
-- refresh, an idle sweep or a fair-rate window roll due, a state without its epoch or in
-- its reclaim grace (quiet's conditions but for someone waiting: a charge of an idle tenant
-- is the same then), or a charged tenant new (made), in line (active or capped: the line
-- to move) or due for its TTL refresh. The charges are taken in the full call's order
-- within its work bound (call.work_check, from the call's start: one unit a charge);
-- returns how many were charged, or nil (nothing done: the full call must run, and reads
-- the tenants again). S and the limits are loaded (fast_state's load).
function call.lean_charges(text, count)
  if not quiet(0, S.xp, S.fi, S.win_at, S.ep, S.rc, true) then return nil end
  local pos = 1
  local by_h = {}
  local order, costs, lasts = {}, {}, {}
  -- (The first work check after TUNING.WORK_STRIDE charges, not TUNING.WORK_CHECK: a
  -- lean charge is two commands of a few fields, a fraction of a full call's operation,
  -- and a check is a TIME; most renewals charge fewer tenants and ask none.)
  local started = nil
  if count > TUNING.WORK_STRIDE then started = call.start_us() end
  local check_at = TUNING.WORK_STRIDE + 1
  local taken = 0
  for i = 1, count do
    if started ~= nil and i == check_at then
      local over
      over, check_at = call.work_check(i, started)
      if over then break end
    end
    local h, weight, cost, last, _
    pos, h, _, weight, cost, last = call.next_charge(text, pos)
    if h == nil then return nil end  -- (the full call says it is malformed)
    local t = by_h[h]
    if t == nil then
      weight = live_weight(h, tonum(weight))
      local f, w, cap, cap_at, st, xp, wt, capt, rest = call.read_head(h)
      if f == nil then return nil end  -- new: made by the full call
      if st ~= IDLE or now >= xp then return nil end
      t = {h = h, f = f, w = w, f0 = f, w0 = w, st = st, dirty = false, cap = cap,
        cap_at = cap_at, cap0 = cap, cap_at0 = cap_at, wt = wt, capt = capt, rest = rest}
      if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
      by_h[h] = t
    end
    order[i] = t; costs[i] = tonum(cost); lasts[i] = tonum(last)
    taken = i
  end
  -- Nothing written before here: the charges now, in order (the clock and the credit move
  -- with each), then the writes.
  refill()
  for i = 1, taken do
    local t = order[i]
    charge_leased(t, costs[i], lasts[i])
    call.seen_idle(t.h, true)  -- (touch: no waiter, st IDLE)
  end
  call.flush_idle()
  for _, t in pairs(by_h) do
    if t.w ~= t.w0 or t.f ~= t.f0 then call.put_head(t) end
  end
  return taken
end
