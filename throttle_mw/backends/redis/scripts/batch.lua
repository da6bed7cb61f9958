-- batch.lua: apply a batch of acquire / release / cancel / tick operations atomically.
--
-- One call carries every operation a process has ready, so concurrent requests share one
-- round trip. Operations run in order, exactly as the in-memory scheduler would run them
-- one by one (core.lua); grants and evictions for requests waiting in other processes go
-- onto those processes' lists (P:g:<proc>). This file only decodes operations and encodes
-- replies; the wire format is written in throttle_mw/backends/redis/protocol.py, which
-- generates the codes used here (OP, REPLY, FLAG, SEP, LINE).
--
-- KEYS[1]  P:s, the budget's state hash (routes the call in Redis Cluster; every other key
--          shares its hash tag and is derived from ARGV[2]).
-- ARGV[1]  now, in seconds: "" in production (Redis TIME is used); tests only.
-- ARGV[2]  P, the key prefix including its hash tag, e.g. "{throttle}".
-- ARGV[3]  this process's id.
-- ARGV[4]  the limits and the policy, joined with SEP: rate, burst, concurrency,
--          tenant_rate, tenant_burst ("" = unset; a concurrency of AUTO: learned; live
--          limits in P:cfg override them), credit_s, queue_limit, tenant_queue_limit,
--          tenant_idle_s, max_tenants, lease_ttl_s, key_ttl_s (T), live_limits_ttl_s: the
--          TTLs of keys.py's table (one argument: store.lua's load_limits_text).
-- ARGV[5]  the epoch of the budget's state the caller knew ("" if none): a caller that
--          knew one and finds no state starts the reclaim grace (store.lua, "A state
--          made anew").
-- ARGV[6]  number of operations; ARGV[7] the operations, one per LINE, fields joined
-- with SEP (one argument in, one string out: the client's packing and parsing cost per
-- call, not per operation):
--   A|id|tenant_digest|tenant_name|weight|rank|cost|flags|max_wait_s
--       flags: FLAG.sheddable, FLAG.degradable, FLAG.retry (answer from what exists)
--   R|id          release a lease (idempotent)
--   C|id          cancel a waiting request
--   T             tick (refill, expire, dispatch)
--   K|id|cost|epoch  reclaim a lease held in the state of that epoch (store.lua)
--   L|id|id|...  a process shutting down: those of its waiters leave the queue, the
--                other ids give back their lease if they hold one (core.lua's leave)
-- (Tenant ids, digests and request ids never contain SEP or LINE.)
-- Returns one string, its LINEs: one per operation, then the trailer (protocol.Trailer):
-- the delay until this process should tick (seconds, or "" if only an arrival or a release
-- can change anything), the number of live processes, the limits in force
-- (rate|burst|concurrency|tenant_rate|tenant_burst|learned, "" = unset: live overrides or
-- the caller's; learned is AUTO when the concurrency is the fleet's learned limit), so every
-- process's responses describe the limits the fleet runs on, and the state's epoch:
--   A|lease|degraded    admitted (lease 1: release it when done)
--   Q|deadline|wait_s|limited  queued; a grant or eviction will reach P:g:<proc>
--                       (limited 1: the concurrency limit was full for it)
--   J|reason|retry_s    rejected
--   R                   released (or nothing to release)
--   X|reason|retry_s    cancelled: it left the queue (reason for a timeout answer)
--   G|lease             cancel too late: it was already admitted
--   N                   cancel: not known here (already gone)
--   T                   ticked
--   K|registered        reclaimed (1) or nothing to do (0)
--   L|n                 a leave took its first n ids (the call's work was done: send the
--                       rest again)
--   D                   deferred: not run, the call had done its share of work (fast.lua's
--                       call.work_check: TUNING.WORK_UNITS, TUNING.WORK_US);
--                       the caller sends it again

-- The operations first: a malformed call changes nothing. (One operation, most calls:
-- nothing to split; its list is made only if fast.lua gives up.)
local ops
local text = ARGV[7] or ''
local single = ARGV[6] == '1' and text ~= '' and not string.find(text, LINE, 1, true)
if not single then
  -- (Split at each LINE with plain finds, empty pieces skipped as '[^LINE]+' did: a
  -- pattern's character class tried on every character cost some 4 k instructions an
  -- operation.)
  ops = {}
  local find, sub = string.find, string.sub
  local pos, n = 1, 0
  while true do
    local stop = find(text, LINE, pos, true)
    if stop == nil then
      if pos <= #text then n = n + 1; ops[n] = sub(text, pos) end
      break
    end
    if stop > pos then n = n + 1; ops[n] = sub(text, pos, stop - 1) end
    pos = stop + #LINE
  end
  if #ops ~= tonumber(ARGV[6]) then
    return redis.error_reply('throttle_mw: operation count mismatch')
  end
  if #ops == 1 then single = true; text = ops[1] end
end

-- One operation that nobody waiting can be affected by: fast.lua, or nil. (Not tried when
-- the last call left requests waiting: it would read the state only to give up.) A call of
-- one acquire that tries it starts with a light init: store.lua's init; if fast.lua gives
-- up, the tables a full call needs are made before it goes on.
local try = single and not call.left_waiting(ARGV[2])
local light = try and string.sub(text, 1, #OP.acquire) == OP.acquire
init(ARGV[2], ARGV[1], ARGV[3], light)

if single then
  local op = text
  local line
  if light then
    line = fast_acquire(op, ARGV[4])
    if line ~= nil then
      local procs = live_processes(false)
      call.save_acquire(FAST_T)
      return call.finish_admitted(line, procs)
    end
    call.init_tables()
  elseif try and string.sub(op, 1, #OP.acquire) == OP.release then
    -- (lean_release, else fast_release with what it read, else the full call; from
    -- release.lua, whose lean_release gave up: what it read, ARGV.lean_read)
    local id = string.sub(op, #OP.acquire + #SEP + 1)
    local done, vals = false, nil
    local read = ARGV.lean_read
    if read == nil then
      done, vals = lean_release(id, ARGV[4])
    elseif read ~= false then
      vals = read
    end
    if done then return finish(REPLY.released, nil, S.np) end
    if vals ~= nil then line = fast_release(id, ARGV[4], vals) end
  end
  if line ~= nil then
    local procs = live_processes(false)
    save(true)
    return finish(line, nil, procs)
  end
  ops = {op}
end

-- (A call of one operation that fast.lua gave up on has its limits already: by the state's
-- live stamp, or read this call; load_state takes them for the others.)
load_state(ARGV[5], ARGV[4])
load_limits_stamped(ARGV[4], true)  -- (the limits loaded are current: read this call, or by the stamp)
hold_back()
call.recall_line()  -- (store.lua: the line as the last call left it, if unchanged)
-- A call of many operations bounds its work (fast.lua's call.work_check), counted from its
-- start.
local started = nil
if #ops > TUNING.WORK_CHECK then started = call.start_us() end
-- The caller is alive. NX: only renew.lua extends a heartbeat, together with the process's
-- leases, so a crashed process's heartbeat lapses no later than its leases. (Asked first:
-- nearly always it is there, and a ZSCORE costs less than formatting the score with 17
-- digits for a ZADD NX that changes nothing; not asked while the loaded library knows it is
-- there: store.lua's call.heartbeat.)
local joined = call.heartbeat()
if joined then born.procs = true end
refill(true)  -- (the bucket: the window rolls in the operations, core.lua's refill)
expire_leases()
expire_waiters()

-- (Each operation to its reply line: fast.lua's do_acquire, do_cancel and do_leave, made once
-- in the library rather than on every call.)
local results = {nil}  -- (room for one line: most calls' only one)
local over = false

-- The work is checked after the first TUNING.WORK_CHECK operations, then as
-- call.work_check says.
local check_at = TUNING.WORK_CHECK + 1
-- An operation is tried as an acquire first (do_acquire's pattern, anchored at its kind,
-- fails at once on any other): its kind is cut out only for the others. (A string.sub per
-- acquire cost more than the failed match per other operation: docs/performance.md,
-- `churn7`.)
for i = 1, #ops do  -- (by index: ipairs is a C call per operation)
  local op = ops[i]
  if not over and started ~= nil and i == check_at then
    over, check_at = call.work_check(i, started)
  end
  local line = nil
  if not over then line = do_acquire(op) end
  if over then
    results[#results + 1] = REPLY.deferred
  elseif line ~= nil then
    results[#results + 1] = line
  else
    local kind = string.sub(op, 1, #OP.acquire)
    if kind == OP.acquire then
      return redis.error_reply('throttle_mw: malformed acquire')
    elseif kind == OP.release then
      release(string.sub(op, call.OP_BODY))
      results[#results + 1] = REPLY.released
    elseif kind == OP.cancel then
      results[#results + 1] = do_cancel(string.sub(op, call.OP_BODY))
    elseif kind == OP.tick then
      tick()
      results[#results + 1] = REPLY.ticked
    elseif kind == OP.leave then
      line, over = do_leave(string.sub(op, call.OP_BODY), started)
      results[#results + 1] = line
    elseif kind == OP.reclaim then
      results[#results + 1] = call.do_reclaim(op)
    else
      return redis.error_reply('throttle_mw: unknown operation')
    end
  end
end

forget_idle()
local due = next_due()
do  -- (a block: a script run by EVAL is one chunk of at most 200 locals at once)
  local grace = grace_due()
  if grace ~= nil and (due == nil or grace < due) then due = grace end
end
if more then due = now end  -- dispatch left admissions for the next tick
if due ~= nil then due = claim_tick(due) end
local procs = live_processes(joined)
call.stamp_line()
save()
call.keep_line()
call.keep_state()
if M.made ~= nil then call.spare_made() end  -- (store.lua: after keep_line)
-- (One operation, most calls: nothing to join.)
if #results > 1 then results[1] = table.concat(results, LINE) end
return finish(results[1] or '', due, procs)
