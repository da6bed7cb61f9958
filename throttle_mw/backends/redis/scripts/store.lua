-- store.lua: the state layer. No Python twin: the Python scheduler keeps its state in
-- objects, the scripts keep it in Redis (the key layout: throttle_mw/backends/redis/keys.py).
-- This file loads the budget's state and its tenants into Lua tables, writes back what
-- changed, and collects the messages and lease records a call produces. The rules
-- (window.lua, core.lua) only touch these tables and the queues' sorted sets.
--
-- Time is Redis' own clock (TIME) in seconds, one clock for the whole fleet, unless a
-- test passes an explicit `now`. Every name below the budget's hash tag P comes from KEY.
--
-- The state below is per call: init() starts it afresh. (Loaded as a function library,
-- this file runs once and its locals outlive a call; run with EVAL, it runs every call.)

local S             -- budget state (the fields of P:s), loaded by load_state()
local S0            -- the state as loaded: save() writes only what changed
local L             -- limits in force
local POL           -- policy
local K             -- key names
local T             -- tenants loaded this call, by digest
local now
local proc
local out_events    -- per process: messages for its grant list
local recent        -- per process: lease-less admissions of this call (core.lua's take)
local fresh         -- a tenant was created this call (forget_idle must check the bound)
local born          -- budget-wide keys (KEY names) this call may have created: save()
                    -- gives them their TTL (Redis drops a key that empties, TTL and all)
local more          -- dispatch stopped at TUNING.DISPATCH_LIMIT: tick again at once
local held_back     -- in flight counted for leases not yet reclaimed (hold_back)
local M             -- what this call has learned of the keys, so it asks Redis once
                    -- (top, capped, deadlines, weights) and the idle list's pending
                    -- changes ("A call's memos" below)
local loaded        -- P:s's packed numbers as loaded (a state_memo entry, or nil)
local limits_memo   -- the memo entry L and POL came from (load_limits), or nil

-- The fields of P:s: tokens, last refill, concurrency in flight, the virtual clock v, the
-- fair-rate window (window.lua), waiting requests and their cost, the active tenants'
-- weight, a sequence counter, the fleet's tick claim (tk_at, tk_by), waiting requests by
-- priority rank (n0..), the next TTL refresh (xp), the next idle-tenant sweep (fi),
-- whether the lease keys hold their anchor (la: anchor_leases), the state's epoch (ep)
-- and the end of its reclaim grace (rc): see "A state made anew" below; the live
-- processes as last counted (np) and when they are counted again (pc: batch.lua's
-- live_processes); the stamp of the last full call's save (lm: "The line as the last
-- call left it" below); a time no lease in P:leases expires before (le: put_lease,
-- fast.lua's lapsed_lease; unset: not known); rate tokens out in processes' leases
-- (core.lua's lease_tokens; unset: none ever): the newer generation's number (rg), its
-- tokens (ra) and expiry (rx), the older one's tokens (rb) and expiry (ry); sq, a
-- pre-release build's (branch `fanout`), neither read nor written, its place kept (no build
-- without the state's generation shares a budget with this one: keys.GENERATION); when
-- the round of the signal that someone waits began, while processes are still to be told
-- (sk: call.signal_next; unset: none are).
-- The layout: the numbers in PACKED share one field, PACKED_FIELD, their texts in that
-- order joined with SEP ('' for unset), read and written whole: Redis reads one field for
-- a fraction of what it takes for a dozen, and a loaded library remembers the last text
-- it read or wrote for a prefix with its numbers (state_memo), so a call parses none of
-- them unless another writer came in between. The fields others read keep a field each
-- (PLAIN: renew.lua reads the epoch, tests the counters). Only load_state, load_hot_state
-- and save know this layout (and fast.lua's lean_release, by call.AT). One more field
-- names the write that last changed these (keys.GENERATION, not a field of S): a full
-- call takes the state it kept by it alone (call.take_kept); every writer of PACKED_FIELD
-- or PLAIN's fields while someone waits stamps it anew or clears it.
local PACKED = {'tokens', 'ts', 'v', 'win_at', 'win_v0', 'win_cost', 'v_rate', 'thr',
  'meas_at', 'qcost', 'wsum', 'seq', 'tk_at', 'xp', 'fi', 'la', 'rc', 'np', 'pc', 'lm', 'lk', 'le',
  'rg', 'ra', 'rx', 'rb', 'ry', 'sq', 'sk'}
local PACKED_FIELD = 'nums'
-- (call.save_plain writes PLAIN's fields out in this order.)
local PLAIN = {'inflight', 'waiting', 'tk_by', 'ep', LIVE_STAMP}
local RANK_COUNT = {}  -- 'n0'.. by rank + 1: made once, not per call
for rank = 0, NRANK - 1 do
  RANK_COUNT[rank + 1] = 'n' .. rank
  PLAIN[#PLAIN + 1] = RANK_COUNT[rank + 1]
end
local STRING_FIELDS = {tk_by = true, ep = true, [LIVE_STAMP] = true}
local EMPTY_TEXTS = {}  -- every packed number unset
for i = 1, #PACKED do EMPTY_TEXTS[i] = '' end
-- The fields load_hot_state reads (fast.lua's calls): the packed numbers, in flight,
-- waiting, the epoch and the live stamp (load_limits_stamped). (Not the state's
-- generation, keys.GENERATION: a stamp is only there while someone waits, call.gen0.)
local HOT_FIELDS = {PACKED_FIELD, 'inflight', 'waiting', 'ep', LIVE_STAMP}

-- The state layer's helpers that are not part of load and save (num's whole numbers,
-- "A call's memos" below), in one table: a chunk may have at most 200 locals, and each
-- script is one chunk with all of these files.
local call = {integers = {}, integers_kept = 0, last_number = false, last_text = false}
-- The entry scripts another entry script runs (release.lua's full call is batch.lua's),
-- each as a function of (KEYS, ARGV), by name (scripts.py, CALLED).
call.entry = {}

-- tonumber, remembered by the text: glibc's strtod takes thousands of instructions for the
-- 17 digits of NUMBER_FORMAT, and most numbers a call reads are the same text call after
-- call (limits, policy, most state fields). Lua interns strings: a lookup costs little.
local NUMBERS = {}
local NUMBERS_KEPT = 0

-- Each packed number's place in PACKED, by name: fast.lua's lean_release takes the few it
-- needs from their state_memo entry, without making S.
call.AT = {}
for i = 1, #PACKED do call.AT[PACKED[i]] = i end

-- PLAIN's fields load_hot_state does not read: what load_state still asks for in a call
-- where fast.lua read the hot ones and gave up.
call.COLD_PLAIN = {}
do  -- (at load: a function library may use no standard library there)
  local hot = {}
  for i = 1, #HOT_FIELDS do hot[HOT_FIELDS[i]] = true end
  for i = 1, #PLAIN do
    if not hot[PLAIN[i]] then call.COLD_PLAIN[#call.COLD_PLAIN + 1] = PLAIN[i] end
  end
end

local now_text        -- num(now), made once per call (init) when first needed

-- A number as text. NUMBER_FORMAT (17 significant digits) costs glibc several thousand
-- instructions a number: `now` is formatted once per call; a whole number (counts,
-- costs, sequence numbers: most of what a call writes) is written as %d instead, the same
-- text, for a third of that, and the small ones are remembered; so is the last number
-- formatted (the times made from `now` are often written twice in a row).
local function num(x)
  if x == now then
    if now_text == nil then now_text = string.format(NUMBER_FORMAT, x) end
    return now_text
  end
  if x == call.last_number then return call.last_text end
  local text
  if x % 1 == 0 and x < TUNING.INTEGER_TEXT_MAX and x > -TUNING.INTEGER_TEXT_MAX then
    text = call.integers[x]
    if text == nil then
      text = string.format('%d', x)
      if call.integers_kept >= TUNING.NUMBERS_MAX then call.integers = {}; call.integers_kept = 0 end
      call.integers[x] = text
      call.integers_kept = call.integers_kept + 1
    end
  else
    text = string.format(NUMBER_FORMAT, x)
  end
  call.last_number = x; call.last_text = text  -- (a number's text: good from call to call)
  return text
end

-- num(x) for the numbers call.save_acquire writes that count up (a tenant's finish tag, the
-- window's admitted cost): most calls write a new one, and a whole one (weight 1, cost 1)
-- is mostly one up from one written a call or a few before. In a loaded library
-- (call.lasting), a whole number of 10 or more is the text of its tens (remembered in
-- call.integers, like num's: the count went through them) then its last digit: a
-- concatenation costs a fraction of formatting. (Not num's way: for the full call's
-- numbers, which do not count one by one, the split costs more than it saves; save_packed
-- takes it for the three that do: win_cost, seq, lm; docs/performance.md, `satsave`.) The
-- number itself is not remembered when its tens are: keeping each new one cost a table
-- insert, and filled call.integers to TUNING.NUMBERS_MAX every thousand or so tenants
-- made, after which every whole number num writes was formatted and kept again (together
-- some 5 k instructions a new tenant under churn: docs/performance.md, `churn5`). Its
-- tens are kept, one in ten.
-- `a`, `b` (both or neither): the text followed by them, made by one concatenation (a new
-- tenant's text, save_tenant: not the number's text made first, then the whole).
function call.count_text(x, a, b)
  if x >= 10 and x % 1 == 0 and x < TUNING.INTEGER_TEXT_MAX and call.lasting then
    local integers = call.integers
    local text = integers[x]
    if text == nil then
      local low = x % 10
      text = integers[(x - low) / 10]
      if text == nil then
        text = call.whole_text(x)
      elseif a == nil then
        return text .. call.DIGITS[low + 1]
      else
        return text .. call.DIGITS[low + 1] .. a .. b
      end
    end
    if a == nil then return text end
    return text .. a .. b
  end
  if a == nil then return num(x) end
  return num(x) .. a .. b
end

call.DIGITS = {'0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}

function call.whole_text(x)  -- (x whole, 0 <= x < INTEGER_TEXT_MAX)
  if x < 10 then return num(x) end
  local low = x % 10  -- (exact below 2^53)
  local text = (call.integers[(x - low) / 10] or call.whole_text((x - low) / 10))
    .. call.DIGITS[low + 1]
  if call.integers_kept >= TUNING.NUMBERS_MAX then call.integers = {}; call.integers_kept = 0 end
  call.integers[x] = text  -- (as num keeps them)
  call.integers_kept = call.integers_kept + 1
  return text
end

local function tonum(text)
  if not text then return nil end
  local value = NUMBERS[text]
  if value == nil then
    value = tonumber(text)
    if value == nil then return nil end
    if NUMBERS_KEPT >= TUNING.NUMBERS_MAX then NUMBERS = {}; NUMBERS_KEPT = 0 end
    NUMBERS[text] = value
    NUMBERS_KEPT = NUMBERS_KEPT + 1
  end
  return value
end

local function opt(x)
  if x == nil or x == false or x == '' then return nil end
  return tonum(x)
end

local function has_flag(flags, bit)
  return flags % (bit + bit) >= bit
end

-- A pattern matching `n` fields joined with SEP, capturing each. (Runs when the code is
-- loaded, where a function library may use no standard library.)
local function fields_pattern(n)
  local field = '([^' .. SEP .. ']*)'
  local pattern = '^' .. field
  for _ = 2, n do pattern = pattern .. SEP .. field end
  return pattern .. '$'
end
local WAITER_PATTERN = fields_pattern(#WAITER_FIELDS)
local RECLAIM_PATTERN = fields_pattern(4)
-- A lease's charge (ratelease.lua; protocol.py's charges_arg): digest|name|weight|cost|last.
call.CHARGE_PATTERN = fields_pattern(5)
-- The charge at `pos` of a renewal's charges, one per LINE (ratelease.lua's full path,
-- fast.lua's call.lean_charges): the position after it, then its fields (h nil: malformed).
function call.next_charge(text, pos)
  local stop, entry = string.find(text, LINE, pos, true), nil
  if stop == nil then entry = string.sub(text, pos); pos = #text + 1 else entry = string.sub(text, pos, stop - 1); pos = stop + #LINE end
  return pos, string.match(entry, call.CHARGE_PATTERN)
end

-- An acquire's fields after its tenant (weight|rank|cost|flags|max_wait: ACQUIRE_FIELDS'
-- last five) are the same text for every request of a route: parsed once and kept by
-- that text (TUNING.NUMBERS_MAX at most, then afresh), {weight, rank, cost, max_wait
-- (numbers), sheddable, degradable, retry (the flags)}; false if its flags are no number
-- (a malformed operation: batch.lua answers with an error).
-- (Matching the nine fields with a pattern, character class by character class, cost
-- more than all the rest of decoding an operation.)
call.TAIL_PATTERN = fields_pattern(5)
call.tails = {}
call.tails_kept = 0
function call.acquire_tail(text)
  local tail = call.tails[text]
  if tail ~= nil then return tail end
  local weight, rank, cost, flags, max_wait = string.match(text, call.TAIL_PATTERN)
  flags = tonum(flags)
  if flags == nil then return false end
  tail = {weight = tonum(weight), rank = tonum(rank), cost = tonum(cost), max_wait = tonum(max_wait),
    sheddable = has_flag(flags, FLAG.sheddable), degradable = has_flag(flags, FLAG.degradable),
    retry = has_flag(flags, FLAG.retry)}
  if call.tails_kept >= TUNING.NUMBERS_MAX then call.tails = {}; call.tails_kept = 0 end
  call.tails[text] = tail
  call.tails_kept = call.tails_kept + 1
  return tail
end

-- An acquire as the client writes it (protocol.py: A|id|digest|name|tail): its id, digest,
-- tenant name and tail taken apart by one pattern (call.ACQUIRE_PATTERN), its tail as
-- call.acquire_tail keeps it; nil if the operation is not in that form (batch.lua answers
-- with an error). fast.lua's fast_acquire decodes by it (its do_acquire, the full call's,
-- writes the match out).
-- (One match in place of four plain finds and four subs: 1.8 k instructions fewer an
-- acquire, docs/performance.md, `churnlua`. Its tail is taken by '(.*)', which tests no
-- character class; a pattern of all nine fields, the tail's by a class each, cost more.)
-- `keep` (fast.lua's fast_acquire, in a loaded library): what follows the id
-- (digest|name|tail, the same text for every request of a tenant and route) is split once
-- and kept by that text, as call.acquire_tail keeps a tail (TUNING.NUMBERS_MAX at most,
-- then afresh): {digest, name, tail}; the call then cuts only the id out (a find and two
-- subs). Only there: a full call decodes as before (its tenants, in a batch of new ones or
-- a long line, are seldom those of the last calls).
call.OP_BODY = #OP.acquire + #SEP + 1  -- where an operation's first field begins (any kind)
do
  local field = '([^' .. SEP .. ']*)' .. SEP
  call.ACQUIRE_PATTERN = '^' .. OP.acquire .. SEP .. field .. field .. field .. '(.*)$'
end
call.rests = {}
call.rests_kept = 0
function call.split_acquire(op, keep)
  if keep then
    local find, sub, body = string.find, string.sub, call.OP_BODY
    if find(op, SEP, 1, true) ~= body - #SEP then return nil end
    local b = find(op, SEP, body, true)
    if b == nil then return nil end
    local rest = sub(op, b + #SEP)
    local parts = call.rests[rest]
    if parts ~= nil then return sub(op, body, b - 1), parts[1], parts[2], parts[3] end
    local id, h, name, tail = call.split_acquire(op)
    if id ~= nil then
      if call.rests_kept >= TUNING.NUMBERS_MAX then call.rests = {}; call.rests_kept = 0 end
      call.rests[rest] = {h, name, tail}
      call.rests_kept = call.rests_kept + 1
    end
    return id, h, name, tail
  end
  local id, h, name, rest = string.match(op, call.ACQUIRE_PATTERN)
  if id == nil then return nil end
  -- (The kept tail looked up here, not by a call of call.acquire_tail.)
  local tail = call.tails[rest]
  if tail == nil then tail = call.acquire_tail(rest) end
  if not tail then return nil end
  return id, h, name, tail
end

-- --- loading and saving -----------------------------------------------------------------

-- A call's state, key names, clock and caller: every script starts here.
-- Key names by prefix: built once per prefix, not per call (a string made in Lua costs as
-- much as a Redis command; a function library keeps this table between calls).
local KEYS_BY_PREFIX = {}
local KEYS_CACHED = 0

local function key_names(prefix)
  local names = KEYS_BY_PREFIX[prefix]
  if names ~= nil then return names end
  names = {prefix = prefix}
  for name, suffix in pairs(KEY) do names[name] = prefix .. suffix end
  if KEYS_CACHED >= TUNING.KEYS_CACHE_MAX then KEYS_BY_PREFIX = {}; KEYS_CACHED = 0 end
  KEYS_BY_PREFIX[prefix] = names
  KEYS_CACHED = KEYS_CACHED + 1
  return names
end

-- A process's recent admissions (P:rc:<proc>) by name, kept with the prefix's names
-- (TUNING.NAMES_MAX at most, then afresh): the names a call of one request uses are mostly
-- those of the last calls.
-- (memo: the names' table in K, counted in K[kept].)
local function kept_name(memo, kept, suffix, id)
  local names = K[memo]
  if names == nil or K[kept] >= TUNING.NAMES_MAX then
    names = {}; K[memo] = names; K[kept] = 0
  end
  local name = names[id]
  if name == nil then
    name = K.prefix .. suffix .. id
    names[id] = name
    K[kept] = K[kept] + 1
  end
  return name
end

function call.recent_key(p) return kept_name('recent_names', 'recent_names_kept', KEY.recent, p) end

-- A call's tables, made anew: init, and batch.lua when fast.lua's acquire, started with
-- a light init, gave up.
function call.init_tables()
  -- (The tables a call fills field by field are made with room for their fields: the
  -- nils in a constructor size it, and a table grown a field at a time is rebuilt each
  -- time it doubles.)
  S, T, out_events, recent, fresh = {}, {}, {}, {}, false
  S0 = {inflight = nil, waiting = nil, tk_by = nil, ep = nil, [LIVE_STAMP] = nil}  -- (+ n0..)
  born = {tenants = nil, waiters = nil, deadlines = nil, qlen = nil, procs = nil,
    active = nil, capped = nil, leases = nil, tenant_hash = nil}
  M = {top_known = nil, top_t = nil, top_r = nil, capped_next = nil, capped_checked = nil,
    dl_next = nil, dl_floor = nil, idle = nil, idle_adds = nil, last_number = nil, last_text = nil,
    no_weights = nil, made = nil, hot_read = nil, kept = nil,
    granted = nil, raw = nil, queued_at = nil, queued_text = nil, tw = nil, plain_mid = nil,
    work_spent = nil, work_units = nil, stamped = nil, gen = nil, by_gen = nil, dropped = nil}
  more = false
  held_back = 0
  loaded = nil
end

-- The tenants of a light init: none, and none added (fast.lua's acquire only reads T).
call.NO_TENANTS = {}

-- The key names and the clock: all that release.lua's lean release needs (init's start).
-- `now_override`: the test clock's text, or a number (release.lua's full call goes on
-- on the clock it read); '' or nil: Redis's TIME.
local function start(prefix, now_override)
  K = key_names(prefix)
  if now_override ~= nil and now_override ~= '' then
    now = tonumber(now_override)
    call.time_s = nil
  else
    -- (The seconds by tonum: the same text a while. The microseconds by arithmetic: the
    -- same conversion as tonumber's, which converts twice. Both kept: call.now_score.)
    local t = redis.call('TIME')
    local s, us = tonum(t[1]), t[2] + 0
    now = s + us / US_PER_S
    call.time_s = s; call.time_us = us; call.time_texts = t
  end
  now_text = nil
end

-- `light`: for fast.lua's acquire only, which uses neither S0 nor out_events and adds no
-- tenant to T; a table made is an allocation and its share of garbage collection (a
-- call of one request makes about twenty). If it gives up, call.init_tables first.
local function init(prefix, now_override, process, light)
  if light then
    S, S0, T, out_events, recent, fresh = nil, nil, call.NO_TENANTS, nil, {}, false
    born = {}
    M = {}
    more = false
    held_back = 0
    loaded = nil
  else
    call.init_tables()
  end
  L, POL = nil, nil
  limits_memo = nil
  proc = process
  start(prefix, now_override)
end

-- The limits in force: live overrides (P:cfg, set with the CLI) win over the caller's.
-- A concurrency of AUTO is the fleet's learned limit (P:cfg's `learned`, written by the
-- process that takes the fleet's learning step: backends/redis/learner.py).
-- a: the caller's limits and policy, as strings by name (LIMIT_ARGS).
local LIMIT_ARGS = {'rate', 'burst', 'concurrency', 'tenant_rate', 'tenant_burst', 'credit',
  'queue_limit', 'tenant_queue_limit', 'idle', 'max_tenants', 'lease_ttl', 'ttl', 'live_ttl'}
local LIVE_FIELDS = {'rate', 'burst', 'concurrency', 'tenant_rate', 'tenant_burst', LEARNED}

local function parse_limits(a, cfg)
  local function pick(live, given)
    if live ~= false and live ~= nil then
      if live == OFF then return nil end
      if live == AUTO then return AUTO end
      return tonum(live)
    end
    if given == AUTO then return AUTO end
    return opt(given)
  end
  L, POL = {}, {}
  L.rate = pick(cfg[1], a.rate)
  L.burst = pick(cfg[2], a.burst)
  L.concurrency = pick(cfg[3], a.concurrency)
  L.learned = L.concurrency == AUTO
  if L.learned then L.concurrency = tonum(cfg[6]) or LEARN_INITIAL end
  L.tenant_rate = pick(cfg[4], a.tenant_rate)
  L.tenant_burst = pick(cfg[5], a.tenant_burst)
  L.whole_burst = math.floor(L.burst)  -- (core.lua's clamp)
  L.reserve = 0  -- Limits.reserve
  if L.burst >= RESERVE_DIVISOR then L.reserve = math.floor(L.burst / RESERVE_DIVISOR) end
  POL.credit = opt(a.credit)
  POL.queue_limit = opt(a.queue_limit)
  POL.tenant_queue_limit = opt(a.tenant_queue_limit)
  POL.idle = opt(a.idle)
  POL.max_tenants = opt(a.max_tenants)
  POL.lease_ttl = opt(a.lease_ttl)
  POL.ttl = opt(a.ttl)
  POL.live_ttl = opt(a.live_ttl)
end

local function load_limits(a)
  parse_limits(a, redis.call('HMGET', K.cfg, unpack(LIVE_FIELDS)))
end

-- load_limits for batch.lua, from its ARGV[4] (LIMIT_ARGS joined with SEP) and P:cfg,
-- remembered by prefix: the same text comes call after call, and L and POL are never
-- changed once made, so a call that finds the texts it last parsed takes the same tables
-- (Lua interns strings: comparing them costs next to nothing).
local function load_limits_text(text)
  local cfg = redis.call('HMGET', K.cfg, unpack(LIVE_FIELDS))
  local memo = K.limits_memo
  if memo ~= nil and memo.text == text and memo.cfg[1] == cfg[1] and memo.cfg[2] == cfg[2]
    and memo.cfg[3] == cfg[3] and memo.cfg[4] == cfg[4] and memo.cfg[5] == cfg[5]
    and memo.cfg[6] == cfg[6] then
    L, POL, limits_memo = memo.L, memo.POL, memo
    memo.read_at = now
    return
  end
  local a, pos = {}, 1
  for i = 1, #LIMIT_ARGS do
    local stop = string.find(text, SEP, pos, true) or #text + 1
    a[LIMIT_ARGS[i]] = string.sub(text, pos, stop - 1)
    pos = stop + #SEP
  end
  parse_limits(a, cfg)
  -- (given: the caller's own rate and burst, for the live stamp: load_limits_stamped)
  limits_memo = {text = text, cfg = cfg, L = L, POL = POL, read_at = now,
    given = SEP .. a.rate .. SEP .. a.burst}
  K.limits_memo = limits_memo
end

-- The full call's limits (load_state, before the state's defaults need them): by the
-- state's live stamp as fast.lua takes them (load_limits_stamped), while the library read
-- P:cfg less than TUNING.LIVE_REREAD ago; else read. A change to P:cfg or P:w deletes the
-- stamp (read at once); a live override that expires on its own is met within
-- TUNING.LIVE_REREAD by a full call (a saturated budget's ticks are all full calls).
function call.limits_by_stamp(text)
  local memo = K.limits_memo
  if S.lv ~= '' and memo ~= nil and memo.lv == S.lv and memo.text == text
    and now >= memo.read_at and now < memo.read_at + TUNING.LIVE_REREAD then
    L, POL, limits_memo = memo.L, memo.POL, memo
    return
  end
  load_limits_text(text)
end

-- The live limits and weights as last read (P:cfg, P:w), without reading them again: the
-- state's LIVE_STAMP (S.lv, loaded) names the reading, and whoever changes either key
-- deletes it (keys.py, LIVE_STAMP). A call that finds the stamp its library remembers
-- with the limits (K.limits_memo.lv) takes those; else it reads P:cfg (load_limits_text)
-- and stamps the state anew, or adopts its stamp (a reading made after the stamp was
-- set is current). The first word of the stamp is the time it was made, the second the
-- process: no two readings have one; after them, the caller's own rate and burst (ARGV's
-- texts, each after SEP), which live.lua needs to know the limits in force before a live
-- change (call.given_limits). (A live override that expires on its own is noticed at the
-- latest at the state's next TTL refresh: the full call reads P:cfg.)
local function load_limits_stamped(text, fresh_read)
  local memo = K.limits_memo
  if not fresh_read and S.lv ~= '' and memo ~= nil and memo.lv == S.lv and memo.text == text then
    L, POL, limits_memo = memo.L, memo.POL, memo
    return
  end
  if not fresh_read then load_limits_text(text) end
  if S.lv == '' then S.lv = num(now) .. ' ' .. proc .. limits_memo.given end
  if limits_memo.lv ~= S.lv then
    limits_memo.lv = S.lv
    limits_memo.no_weights = nil  -- asked again (live_weight)
  end
end

-- The caller's own rate and burst (texts; '' = unset) a live stamp keeps after its first
-- SEP (load_limits_stamped), or nil if it keeps none (no stamp: P:cfg or P:w changed since
-- the last call, or a state stamped by an older version).
function call.given_limits(stamp)
  local first = string.find(stamp, SEP, 1, true)
  if first == nil then return nil end
  local second = string.find(stamp, SEP, first + #SEP, true)
  if second == nil then return nil end
  return string.sub(stamp, first + #SEP, second - 1), string.sub(stamp, second + #SEP)
end

-- The limits in force as batch.lua's reply states them (rate|burst|concurrency|tenant_rate|
-- tenant_burst|learned, "" = unset), memoized: the same few limits come call after call,
-- and formatting numbers is a good part of a small call's cost.
local LINES = {}
local LINES_KEPT = 0

local function limits_line()
  if limits_memo ~= nil and limits_memo.line ~= nil then return limits_memo.line end
  local node = LINES
  local path = {L.rate or false, L.burst or false, L.concurrency or false,
    L.tenant_rate or false, L.tenant_burst or false, L.learned}
  for i = 1, #path - 1 do
    local next_node = node[path[i]]
    if next_node == nil then next_node = {}; node[path[i]] = next_node end
    node = next_node
  end
  local line = node[path[#path]]
  if line ~= nil then
    if limits_memo ~= nil then limits_memo.line = line end
    return line
  end
  local function limit(x)
    if x == nil then return '' end
    return num(x)
  end
  local learned = ''
  if L.learned then learned = AUTO end
  line = table.concat({limit(L.rate), num(L.burst), limit(L.concurrency), limit(L.tenant_rate),
    num(L.tenant_burst), learned}, SEP)
  if LINES_KEPT >= TUNING.KEYS_CACHE_MAX then LINES = {}; LINES_KEPT = 0; return line end
  node[path[#path]] = line
  LINES_KEPT = LINES_KEPT + 1
  if limits_memo ~= nil then limits_memo.line = line end
  return line
end

-- P:s's packed numbers from their text (PACKED_FIELD's value, or false): the entry of
-- state_memo, parsed only if it is not the text last read or written for this prefix.
local function unpack_state(text)
  if not text then return nil end
  local memo = K.state_memo
  if memo ~= nil and memo.text == text then return memo end
  local vals, texts = {}, {}
  local pos = 1
  for i = 1, #PACKED do
    local stop = string.find(text, SEP, pos, true)
    local piece
    if stop == nil then
      piece = string.sub(text, pos)
      pos = #text + 1
    else
      piece = string.sub(text, pos, stop - 1)
      pos = stop + #SEP
    end
    texts[i] = piece
    vals[i] = tonum(piece)  -- '' (unset): nil
  end
  memo = {text = text, vals = vals, texts = texts}
  K.state_memo = memo
  return memo
end

-- The packed numbers into a new S (their loaded values stay in `loaded`: save compares
-- with them). Written out, in PACKED's order: a table made whole costs a fraction of one
-- filled field by field (every few fields would grow it anew).
local function load_packed(text)
  loaded = unpack_state(text)
  if loaded == nil then S = {}; return end
  local v = loaded.vals
  S = {tokens = v[1], ts = v[2], v = v[3], win_at = v[4], win_v0 = v[5], win_cost = v[6],
    v_rate = v[7], thr = v[8], meas_at = v[9], qcost = v[10], wsum = v[11], seq = v[12],
    tk_at = v[13], xp = v[14], fi = v[15], la = v[16], rc = v[17], np = v[18], pc = v[19],
    lm = v[20], lk = v[21], le = v[22], rg = v[23], ra = v[24], rx = v[25], rb = v[26], ry = v[27],
    sq = v[28], sk = v[29]}
end

local function load_plain(name, value)
  if STRING_FIELDS[name] then value = value or '' else value = tonum(value) end
  S[name] = value
  S0[name] = value
end

-- The state as fast.lua needs it (HOT_FIELDS, read now, or `vals` as read; the ranks'
-- counts are not loaded, and save leaves them as they are); false if there is none.
local function load_hot_state(vals)
  vals = vals or redis.call('HMGET', K.state, unpack(HOT_FIELDS))  -- (or as read: lean_release)
  M.hot_read = vals  -- (load_state reads only the rest if fast.lua gives up)
  if not vals[1] then return false end
  load_packed(vals[1])
  S.inflight = tonum(vals[2]); S.waiting = tonum(vals[3]); S.ep = vals[4] or ''
  S.lv = vals[5] or ''
  S0.inflight = S.inflight; S0.waiting = S.waiting; S0.ep = S.ep; S0.lv = S.lv
  call.gen0 = call.maybe_gen(S.waiting)
  return true
end

-- The budget's state; a budget seen for the first time starts full. `known`: the epoch the
-- caller knew ("" or nil: none), see "A state made anew" below. `limits`: batch.lua's
-- ARGV[4], for a call without its limits yet (call.limits_by_stamp).
local function load_state(known, limits)
  local hot = M.hot_read
  if hot ~= nil then  -- read this call by load_hot_state: the rest only (same call, same key)
    M.hot_read = nil
    local rest = redis.call('HMGET', K.state, unpack(call.COLD_PLAIN))
    load_packed(hot[1])
    for i = 2, #HOT_FIELDS do load_plain(HOT_FIELDS[i], hot[i]) end
    for i, name in ipairs(call.COLD_PLAIN) do load_plain(name, rest[i]) end
    call.gen0 = call.maybe_gen(S.waiting)
  else
    if call.take_kept() then  -- (by the state's generation alone: call.take_kept)
      if L == nil then call.limits_by_stamp(limits) end
      if S.tokens > L.burst then S.tokens = L.burst end
      return
    end
    local vals = redis.call('HMGET', K.state, PACKED_FIELD, unpack(call.PLAIN_GEN))
    M.raw = vals  -- (save keeps it as written: call.take_state)
    call.gen0 = vals[#vals] or ''
    if call.take_state(vals) then  -- (its defaults are set: it was loaded below before)
      if L == nil then call.limits_by_stamp(limits) end
      if S.tokens > L.burst then S.tokens = L.burst end
      return
    end
    load_packed(vals[1])
    for i, name in ipairs(PLAIN) do load_plain(name, vals[i + 1]) end
  end
  if L == nil then call.limits_by_stamp(limits) end
  if S.ts == nil then
    S.tokens = L.burst; S.ts = now; S.inflight = 0; S.v = 0
    S.win_at = now; S.win_v0 = 0; S.win_cost = 0; S.v_rate = 0; S.thr = 0
    S.meas_at = -math.huge; S.waiting = 0; S.qcost = 0; S.wsum = 0; S.seq = 0; S.tk_at = 0
    S.ep = ''
    S.rc = 0
    -- A caller that knew another epoch: this state replaces one that was lost, whose leases
    -- are still held. Admit nothing new until they are reclaimed.
    if known ~= nil and known ~= '' and L.concurrency ~= nil then S.rc = now + TUNING.RECLAIM_GRACE end
  end
  for rank = 1, NRANK do S[RANK_COUNT[rank]] = S[RANK_COUNT[rank]] or 0 end
  S.xp = S.xp or 0
  S.fi = S.fi or 0
  S.la = S.la or 0
  S.lk = S.lk or 0
  S.rc = S.rc or 0
  if S.ep == '' then S.ep = num(now) .. '/' .. proc end  -- new (or older than epochs)
  if S.tokens > L.burst then S.tokens = L.burst end
end

-- The state as the last full call of this library left it (keep_state), taken instead of
-- made anew when P:s holds what that call wrote, the texts of its packed numbers and of
-- its plain fields alike (`vals`, as read: M.raw): S, S0 (its plain fields as written) and
-- the packed numbers' memo entry are those of that call, unchanged since (save updates
-- them as it writes). A saturated budget's calls come one after another: building S
-- (thirty fields) took a tenth of such a call. false: made anew.
-- First asked by the state's generation (keys.GENERATION, call.take_kept): the stamp this
-- library's full calls wrote (those that leave requests waiting: save), found again, says
-- this library was the last to write P:s (nothing read is compared), and the next full
-- call writes none while someone still waits. Every other write of the packed numbers or
-- the plain fields clears the stamp (save, ratelease.lua, live.lua, Keys.live_changed), a
-- full call that leaves nobody waiting too: a stamp is only there while someone waits, so
-- fast.lua's calls, which write only while nobody does, need not (call.maybe_gen). No
-- other library's stamp is alike: seeded from Redis's TIME (in microseconds) when this
-- library first stamps (call.new_gen), then S.lm, counted up by each of its full calls
-- (call.stamp_line). A key deleted or expired and made anew holds another stamp or none.
-- (With EVAL nothing is kept: such calls only clear it.)
--
-- PLAIN's fields, then the generation: what a full call reads when it cannot take the
-- kept state by its generation (the stamp as read: call.gen0).
call.PLAIN_GEN = {}
for i = 1, #PLAIN do call.PLAIN_GEN[i] = PLAIN[i] end  -- (at load: no unpack)
call.PLAIN_GEN[#PLAIN + 1] = TUNING.GENERATION

function call.take_kept()
  local kept = K.kept_state
  if kept == nil or not kept.text or not kept.gen then return false end
  local memo = kept.loaded
  if redis.call('HGET', K.state, TUNING.GENERATION) ~= kept.gen
    or K.state_memo ~= memo or memo.text ~= kept.text then
    return false  -- (the full read: call.take_state compares its texts)
  end
  kept.text = false  -- (taken: a call that fails before keep_state leaves none behind)
  S, S0, loaded = kept.S, kept.S0, memo
  M.raw = kept.raw
  call.gen0 = kept.gen
  M.by_gen = true  -- (save writes no stamp: P:s holds this one)
  return true
end

function call.take_state(vals)
  local kept = K.kept_state
  if kept == nil or not kept.text then return false end
  local text = kept.text
  kept.text = false  -- (taken: a call that fails before keep_state leaves none behind)
  local memo = kept.loaded
  if vals[1] ~= text or K.state_memo ~= memo or memo.text ~= text then return false end
  local raw = kept.raw
  for i = 2, #PLAIN + 1 do
    if vals[i] ~= raw[i] then return false end
  end
  S, S0, loaded = kept.S, kept.S0, memo
  return true
end

-- After save: the state for the next full call (call.take_kept if save stamped it, M.gen;
-- else call.take_state), if this call read P:s whole (M.raw) and wrote all it changed.
function call.keep_state()
  if not call.lasting or M.raw == nil or loaded == nil then return end
  local kept = K.kept_state
  if kept == nil then
    kept = {text = false, loaded = false, S = false, S0 = false, raw = false, gen = false}
    K.kept_state = kept
  end
  kept.text = loaded.text; kept.loaded = loaded; kept.S = S; kept.S0 = S0; kept.raw = M.raw
  kept.gen = M.gen or false
end

-- The state's generation as a call that did not read it knows it: '' (none) while nobody
-- waits, as the state was read (a stamp is only written, and only stays, while someone
-- waits: save), else '?' (perhaps one: a write clears it). Fast.lua's calls write only
-- while nobody waits.
function call.maybe_gen(waiting)
  if (waiting or 0) > 0 then return '?' end
  return ''
end

-- A write that clears the state's generation (keys.GENERATION) drops this library's kept
-- state with it: the next full call reads P:s whole at once, without first asking for a
-- generation it knows is gone.
function call.drop_kept()
  local kept = K.kept_state
  if kept ~= nil then kept.text = false end
end

-- The generation a full call that keeps its state writes (keys.GENERATION) where it did not
-- take the state by its stamp: the library's seed, Redis's TIME (seconds and microseconds)
-- when it first stamped, then this call's S.lm (call.stamp_line: one up per full call of the
-- library). No other library has the seed (each took it in a call of its own, a full call's
-- time apart at least), and this one never stamps a number twice.
function call.new_gen()
  local seed = call.gen_seed
  if seed == nil then
    local time = redis.call('TIME')
    seed = time[1] .. '.' .. time[2] .. '/'
    call.gen_seed = seed
  end
  return seed .. num(S.lm)
end

-- --- a call's memos ---------------------------------------------------------------------------
--
-- What one call learns of the keys it keeps in M (init makes it anew), so that it asks Redis
-- once per call, not once per step, where `now` and the keys cannot have moved meanwhile:
-- the tenant first in line and its head waiter (core.lua's top_active; dispatch, next_due
-- and fits_at_once all ask), whether capped tenants are due and the earliest cap release
-- (release_capped, next_due), the earliest deadline (expire_waiters, next_due), whether any
-- live weight is set (live_weight). Each step that changes what a memo holds forgets it
-- (M.top_known = false, M.capped_next = nil, M.dl_next = nil: "not known, ask"). And the
-- changes to the idle list (P:tenants) a call makes are written together, by flush_idle,
-- before anything reads the list and at the end: one ZADD and one ZREM a call, whatever
-- the tenants it touched (a tenant that queues is taken off the list in the same call it
-- was put on with the same last use: only the last change counts).


-- A time as its score in the idle list P:tenants: whole microseconds (floor), so the list's
-- compact encoding (listpack, up to 128 tenants by default) keeps its scores as integers,
-- and a ZADD that walks it compares them without parsing each one's 17 digits (strtod).
-- Both sides of forget_idle's comparison are floored alike: a tenant's last use and the
-- idle bound compare as they do in Python unless they fall in the same microsecond.
-- (%d: a whole number's text for a fraction of NUMBER_FORMAT's cost.)
function call.idle_score(t)
  return string.format('%d', math.floor(t * US_PER_S))
end

-- call.idle_score(now), from TIME's texts where they are its digits: floor(now * 10^6) is
-- the seconds * 10^6 + the microseconds unless the division rounded below them (checked),
-- and that whole number's text is the seconds' then the microseconds' to six places. A
-- concatenation costs a fraction of formatting (and of math.floor, a call).
call.US_PAD = {'00000', '0000', '000', '00', '0', ''}  -- (by the microseconds' digits)
function call.now_score()
  local s, us = call.time_s, call.time_us
  if s ~= nil and s >= 1 and us < US_PER_S then
    local exact, x = s * US_PER_S + us, now * US_PER_S
    if x >= exact and x < exact + 1 then
      local texts = call.time_texts
      local digits = texts[2]
      return texts[1] .. call.US_PAD[#digits] .. digits
    end
  end
  return call.idle_score(now)
end

-- The lowest score in sorted set `key`, or false if it is empty.
function call.first_score(key)
  local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
  if #first == 0 then return false end
  return tonumber(first[2])
end

-- Tenant h was used now and waits for nothing (idle: on the list), or it waits (off it).
function call.seen_idle(h, idle)
  local pending = M.idle
  if pending == nil then M.idle = {[h] = idle} else pending[h] = idle end
end

-- The idle list's changes, with its anchor (keys.IDLE_ANCHOR) in every ZADD: the list
-- keeps it when its last tenant starts waiting, so it is not made anew (and given a TTL)
-- each time one goes back on it. Only a ZADD all of whose members are new (the anchor
-- too) may have made the key: else a member was there, and the key has its TTL from
-- whoever made it. (A ZREM never removes the anchor: no tenant's digest is its text.)
-- Two sources: touch's tenants, each once a call, already as the ZADD's arguments
-- (M.idle_adds: false, the digest, false, the next ...: the score, the same for all, put in
-- at the end, so a call whose tenant then waits makes none), and the others' changes by
-- digest (call.seen_idle, M.idle: the last one wins, and a digest there
-- overrides its place in M.idle_adds). Under churn only the first: no table by digest
-- grown and walked a new tenant (docs/performance.md, `churn11`).
function call.flush_idle()
  local pending, add = M.idle, M.idle_adds
  if pending == nil and add == nil then return end
  M.idle = nil; M.idle_adds = nil
  -- (One tenant, most calls of one request: no lists made.)
  local one, idle = nil, true
  if pending == nil then
    if #add == 2 then one = add[2] end
  else
    local h, last = next(pending)
    if next(pending, h) == nil and (add == nil or #add == 2 and add[2] == h) then
      one = h; idle = last
    end
  end
  if one ~= nil then
    if not idle then
      redis.call('ZREM', K.tenants, one)
    elseif redis.call('ZADD', K.tenants, call.now_score(), one, '+inf', TUNING.IDLE_ANCHOR) == 2 then
      born.tenants = true
    end
    return
  end
  local drop = nil
  if pending ~= nil then
    local seen = call.now_score()
    if add ~= nil then  -- (touch's, less those changed since)
      local kept, n = {}, 0
      for i = 2, #add, 2 do
        local h = add[i]
        if pending[h] == nil then kept[n + 1] = seen; kept[n + 2] = h; n = n + 2 end
      end
      add = kept
    else
      add = {}
    end
    drop = {}
    for h, idle in pairs(pending) do
      if idle then add[#add + 1] = seen; add[#add + 1] = h else drop[#drop + 1] = h end
    end
  end
  if drop == nil then  -- (touch's alone: the call's score in their places)
    local seen = call.now_score()
    for i = 1, #add, 2 do add[i] = seen end
  end
  if #add > 0 then
    local members = #add / 2 + 1
    add[#add + 1] = '+inf'; add[#add + 1] = TUNING.IDLE_ANCHOR
    if redis.call('ZADD', K.tenants, unpack(add)) == members then born.tenants = true end
  end
  if drop ~= nil and #drop > 0 then redis.call('ZREM', K.tenants, unpack(drop)) end
end

-- The first in line after push(t, r), from what was known before (known, top_t, top_r):
-- a tenant that joins the line (was_idle) is first if its tag is lower than the first's
-- (a tie is asked: P:active orders ties by member); a waiter that joins the first
-- tenant's queue is its head if its priority is more urgent; else the first is the same.
function call.line_after_push(t, r, was_idle, known, top_t, top_r)
  M.top_known = false
  if not known then return end
  if was_idle then
    if top_t == nil or t.f < top_t.f then
      M.top_known = true; M.top_t = t; M.top_r = r
    elseif t.f > top_t.f then
      M.top_known = true; M.top_t = top_t; M.top_r = top_r
    end
  elseif top_t == nil then
    return  -- (t waits but nobody is in line: capped, or keys lost; asked again)
  elseif top_t == t then
    M.top_known = true; M.top_t = t
    if r.rank < top_r.rank then M.top_r = r else M.top_r = top_r end
  else
    M.top_known = true; M.top_t = top_t; M.top_r = top_r
  end
end

-- The earliest deadline (P:dl) as a call knows it: M.dl_next, the earliest itself (false:
-- none; nil: not known), else perhaps M.dl_floor, a time no deadline is earlier than
-- (nil: none known). A waiter that leaves only raises the earliest: the one that was
-- earliest stays a floor, and a saturated budget's tick, whose admitted waiter held the
-- earliest deadline (first come, first due), need not ask for the next one while the floor
-- is later than anything it decides on (expire_waiters, next_due).
function call.deadline_added(deadline, text)
  M.queued_at = deadline; M.queued_text = text  -- (its text, for the reply: call.deadline_text)
  local first = M.dl_next
  if first ~= nil then
    if first == false or deadline < first then M.dl_next = deadline end
  elseif M.dl_floor ~= nil and deadline < M.dl_floor then
    M.dl_floor = deadline
  end
end

-- A queued request's deadline as its reply states it: the text push made for P:dl, if
-- it is that one (one formatting with 17 digits fewer per queueing acquire).
function call.deadline_text(deadline)
  if deadline == M.queued_at then return M.queued_text end
  return num(deadline)
end

-- A waiter of this deadline left P:dl (-math.huge: one or more, any deadline).
function call.deadline_left(deadline)
  local first = M.dl_next
  if first and deadline <= first then
    M.dl_next = nil
    M.dl_floor = first
  end
end

-- Is any tenant in line (P:active not empty)?
function call.anyone_in_line()
  if M.top_known then return M.top_t ~= nil end
  return redis.call('ZCARD', K.active) > 0
end

-- forget_idle's deletion of the idle tenants `hs` (digests; repeats allowed), the idle
-- list's first `ranked` members (forget_idle reads them by score from the lowest and by
-- rank from the first, and nothing changes the list in between): a few commands for all of
-- them. A tenant not loaded this call waits if it is in P:qlen (push puts it there with its
-- first waiter, unlink takes it out with its last; while nobody waits, S.waiting 0, none
-- does, and P:qlen is not asked). Only the tenant's field of P:T is deleted (one HDEL for
-- all): one that waits for nothing has no queue (P:q:<h>: Redis drops a sorted set with
-- its last member; a queue left by state that expired around it goes with its own TTL).
-- (Loops by index, not ipairs: a C call per step; the list itself as the unknown ones when
-- none was loaded this call, most calls, and as the ones to delete when besides nobody
-- waits.)
function call.drop_idle_tenants(hs, ranked)
  local n = #hs
  local unknown = hs
  for i = 1, n do
    if T[hs[i]] ~= nil then
      unknown = {}
      for j = 1, n do
        local h = hs[j]
        if T[h] == nil then unknown[#unknown + 1] = h end
      end
      break
    end
  end
  local gone = hs
  if unknown ~= hs or S.waiting > 0 then
    local waits = {}
    if #unknown > 0 and S.waiting > 0 then
      local scores = redis.call('ZMSCORE', K.qlen, unpack(unknown))
      for i = 1, #unknown do
        if scores[i] then waits[unknown[i]] = true end
      end
    end
    gone = {}
    for i = 1, n do
      local h = hs[i]
      local t = T[h]
      local busy
      if t ~= nil then busy = t.n > 0 else busy = waits[h] end
      if not busy then
        gone[#gone + 1] = h
        if t ~= nil then t.deleted = true; T[h] = nil; M.dropped = true end
      end
    end
  end
  if #gone > 0 then redis.call('HDEL', K.tenant_hash, unpack(gone)) end
  -- (a waiting one too: state written before tenants waited off the list. By rank: no
  -- member sent and looked up, docs/performance.md, `churn11`.)
  redis.call('ZREMRANGEBYRANK', K.tenants, '0', num(ranked - 1))
end

-- A stray tenant is a field of P:T whose tenant is neither on the idle list nor waiting
-- (in P:qlen): its idle-list entry was lost (a script that failed halfway: Redis keeps the
-- writes made before the error), so neither the idle sweep nor the bound would ever drop
-- it, and P:T would keep it while the budget lives. Each idle sweep (forget_idle, once per
-- TUNING.SWEEP_PERIOD, or each call while a backlog is left) counts P:T's fields (HLEN):
-- if there are more than the tenants on the list (`listed`) and the requests waiting (at
-- least one each of the tenants waiting), some are strays, and it walks TUNING.STRAY_BATCH
-- fields of P:T on from P:s's cursor (TUNING.TENANT_CURSOR; absent: from the start; the
-- anchor, TUNING.ENCODING_ANCHOR, is counted and never dropped) and deletes the strays
-- among them; tenants loaded this call (T) are left to save. (So P:T holds at
-- most some strays more than the list and the waiting tenants, whose count the idle list's
-- bound and the queue limit bound; a sweep without strays costs one HLEN.)
function call.sweep_strays(listed)
  if redis.call('HLEN', K.tenant_hash) <= listed + S.waiting + 1 then return end  -- (+ anchor)
  local cursor = redis.call('HGET', K.state, TUNING.TENANT_CURSOR) or '0'
  local scan = redis.call('HSCAN', K.tenant_hash, cursor, 'COUNT', TUNING.STRAY_BATCH)
  local after, found = scan[1], scan[2]
  if after ~= cursor then
    if after == '0' then
      redis.call('HDEL', K.state, TUNING.TENANT_CURSOR)
    else
      redis.call('HSET', K.state, TUNING.TENANT_CURSOR, after)
    end
  end
  local hs = {}
  for i = 1, #found, 2 do  -- (digest, text, ...)
    local h = found[i]
    if T[h] == nil and h ~= TUNING.ENCODING_ANCHOR then hs[#hs + 1] = h end
  end
  if #hs == 0 then return end
  local listed = redis.call('ZMSCORE', K.tenants, unpack(hs))
  local unlisted = {}
  for i = 1, #hs do
    if not listed[i] then unlisted[#unlisted + 1] = hs[i] end
  end
  if #unlisted == 0 then return end
  local strays = unlisted
  if S.waiting > 0 then
    local waiting = redis.call('ZMSCORE', K.qlen, unpack(unlisted))
    strays = {}
    for i = 1, #unlisted do
      if not waiting[i] then strays[#strays + 1] = unlisted[i] end
    end
    if #strays == 0 then return end
  end
  redis.call('HDEL', K.tenant_hash, unpack(strays))
end

-- --- the line as the last call left it ---------------------------------------------------
--
-- A saturated budget's calls come one after another, each asking what the last one
-- learned: who is first in line and its head waiter (four reads: P:active, the tenant,
-- its queue, the waiter), the first capped tenant's release and the earliest deadline. A
-- loaded function library (scripts.py sets call.lasting; with EVAL nothing outlives a
-- call) keeps what a full call knew of these once it is saved (keep_line), and the next
-- call takes it instead of asking (recall_line) if P:s's packed numbers are the very text
-- that call wrote. That text names its call: each full call stamps it with a number of
-- its own (S.lm, one up per call of the loaded library: no other call's text has it),
-- and a call that changes the line (any writer: another library version, EVAL) changes a
-- packed number with it: a waiter queued moves seq, one that leaves moves qcost, an
-- admission win_cost, a tenant in or out of line wsum or seq, and a cap refilled is
-- time gone by (ts). A text found unchanged: the line is as that call left it.

-- Before save: the stamp of this call's text.
function call.stamp_line()
  if not call.lasting then return end
  call.stamps = (call.stamps or 0) + 1
  S.lm = call.stamps
  M.stamped = true  -- (save stamps the state's generation too: call.new_gen)
end

-- After save: what this call knows of the line, as Redis now holds it. The tenant first
-- in line is kept as it is, its loaded fields made what was written (the next call takes
-- the same tables: a table made costs more than all that a recalled line saves).
function call.keep_line()
  if not call.lasting or loaded == nil or loaded.vals[20] ~= S.lm then  -- (lm: PACKED[20])
    K.line_memo = nil
    return
  end
  -- (One table per prefix, its fields all assigned anew: one made per call cost more.)
  local memo = K.line_table
  if memo == nil then
    memo = {text = nil, capped = nil, dl = nil, dl_floor = nil, top_known = nil, waiting = nil,
      t = nil, r = nil, kept = nil}
    K.line_table = memo
  end
  memo.text = loaded.text; memo.capped = M.capped_next; memo.dl = M.dl_next
  memo.dl_floor = M.dl_floor; memo.top_known = M.top_known; memo.waiting = S.waiting
  memo.t = nil; memo.r = nil; memo.kept = nil
  local t = M.top_t
  if M.top_known and t ~= nil then
    call.as_written(t)
    memo.t = t
    memo.r = M.top_r  -- (a waiter's fields never change)
  end
  -- The tenant this call granted last (dispatch): mostly it asks again in the next call
  -- (call.recall_tenant).
  local g = M.granted
  if g ~= nil and g ~= t and T[g.h] == g then
    call.as_written(g)
    memo.kept = g
  end
  K.line_memo = memo
end

-- After keep_line, batch.lua's last step: the tables of this call's new tenants (M.made)
-- left to the next call's new tenants (load_tenant assigns each of their fields anew), in a
-- loaded library: a table made is an allocation and its share of garbage collection, some
-- 2 k instructions a new tenant under churn (docs/performance.md, `churn9`). Not given:
-- a tenant keep_line keeps for the next call (K.line_memo's t and kept: call.recall_line
-- and call.recall_tenant put it back in T, where a new tenant of that call must not share
-- its table), nor one dropped this call (forget_idle marks it `deleted`, which save and
-- save_made skip and load_tenant does not clear). Nothing else holds a tenant's table past
-- its call (T and M are made anew). The list is made's own, those given kept in place.
function call.spare_made()
  local made = M.made
  if made == nil or not call.lasting then return end
  local memo = K.line_memo
  local kept, granted = nil, nil
  if memo ~= nil then kept = memo.t; granted = memo.kept end
  if kept == nil and granted == nil and not M.dropped then  -- (all given: most calls)
    call.spare = made
    return
  end
  local n, all = 0, #made
  for i = 1, all do
    local t = made[i]
    if t ~= kept and t ~= granted and not t.deleted then n = n + 1; made[n] = t end
  end
  for i = all, n + 1, -1 do made[i] = nil end
  call.spare = made
end

-- Tenant t after save: its loaded fields made what was written (if it was), so the next
-- call takes the same table as a load would make it (call.restore_tenant). In place: a
-- tenant's loaded tables are its own (but a new tenant's, and the costs of one written
-- with nothing waiting: shared, never changed; save_tenant).
function call.as_written(t)
  local l = t.loaded
  if not t.dirty and l ~= call.NEW_LOADED then return end  -- (as loaded; save_tenant's `again`)
  local tc = t.c
  if l == call.NEW_LOADED then
    l = {f = nil, w = nil, cap = nil, cap_at = nil, n = nil, c = {unpack(tc)}, st = nil, am = nil,
      xp = nil}
    t.loaded = l
  elseif l.c == call.NEW_LOADED.c then
    l.c = {unpack(tc)}
  else
    local c = l.c
    for rank = 1, NRANK do c[rank] = tc[rank] end
  end
  l.f = t.f; l.w = t.w; l.cap = t.cap; l.cap_at = t.cap_at; l.n = t.n; l.st = t.st
  l.am = t.am; l.xp = t.xp
  t.dirty = false
end

-- Tenant t as load_tenant makes it from its text in P:T: its fields as loaded, nothing this
-- call did yet. Only a tenant keep_line kept is restored, and call.as_written made its loaded
-- fields its own (f, w, cap, cap_at, n, the costs by rank, st, am, xp) after the last
-- change to it; nothing changes a kept tenant until a call takes it (recall_line takes the
-- memo whole), so those are already as loaded and are not copied back (some 20 table
-- assignments a restore; a saturated budget's calls restore one or two tenants each):
-- only what a call marks on a tenant besides is cleared.
function call.restore_tenant(t)
  t.dirty = false; t.touched = nil; t.queue_made = nil
  T[t.h] = t
end

-- The tenant the last call granted (keep_line), taken instead of read, or nil. One in line
-- (ACTIVE) changes only with the line (P:s's packed numbers: a reweigh moves wsum), as the
-- first in line does. Another can also be dropped as idle (forget_idle), or reweighed by
-- an acquire that was then rejected, with P:s as it was: its text in P:T is read and must
-- be the one this library last wrote or read (t.tx; save_tenant skips a write of that
-- text, so it must be what Redis holds).
function call.recall_tenant(h)
  local t = M.kept
  if t == nil or t.h ~= h then return nil end
  M.kept = nil
  local l = t.loaded
  if l.st ~= ACTIVE then
    if redis.call('HGET', K.tenant_hash, h) ~= t.tx then return nil end
  end
  call.restore_tenant(t)
  return t
end

-- Did the last full call of this library on this budget leave requests waiting (batch.lua:
-- then fast.lua, which gives up whenever any wait, is not tried)? Only a hint: another
-- writer may have changed that since; the full call decides the same either way. (By the
-- key prefix: asked before init.)
function call.left_waiting(prefix)
  local memo = key_names(prefix).line_memo
  return memo ~= nil and memo.waiting > 0
end

-- After load_state: the line as the last call left it, if nothing changed since. (Taken:
-- a call that fails before keep_line leaves none behind.)
function call.recall_line()
  local memo = K.line_memo
  K.line_memo = nil
  if memo == nil or loaded == nil or loaded.text ~= memo.text then return end
  M.capped_next = memo.capped
  M.dl_next = memo.dl
  M.dl_floor = memo.dl_floor
  M.kept = memo.kept  -- (call.recall_tenant)
  if not memo.top_known then return end
  M.top_known = true
  local t = memo.t
  if t == nil then M.top_t = nil; M.top_r = nil; return end
  call.restore_tenant(t)
  M.top_t = t
  M.top_r = memo.r
end

-- How long an idle tenant is kept (Scheduler._forget_idle's idle_after, for core.lua's
-- forget_idle): the idle time, or while a per-tenant cap may still be refilling, as long as
-- an empty cap takes to refill (made anew, its cap would be full), in seconds.
function call.kept_s()
  if L.tenant_rate ~= nil then return math.max(POL.idle, L.tenant_burst / L.tenant_rate) end
  return POL.idle
end

-- A TTL in milliseconds by its kind in KEY_TTL (keys.py, "TTL"): 'state' (T), 'tenant'
-- (kept+T: call.kept_s) or 'live'.
-- As text: a number passed to redis.call is formatted with 17 digits on every call.
local function ttl_ms(kind)
  -- (live: never shorter than the state's, so a live override cannot lapse under a bucket
  -- that outlives it: README, "Live limits")
  if kind == 'live' then return num(math.floor(math.max(POL.live_ttl, POL.ttl) * MS_PER_S)) end
  -- (tenant: never shorter than a tenant is kept, so a capped tenant's key cannot lapse
  -- while forget_idle would still keep it, and the tenant come back with a full cap)
  if kind == 'tenant' then return num(math.floor((call.kept_s() + POL.ttl) * MS_PER_S)) end
  return num(math.floor(POL.ttl * MS_PER_S))
end

-- PEXPIRE the budget-wide keys named in `names` (a set of KEY_TTL's names) by their kind,
-- the live keys last: before Redis 7 each PEXPIRE counts from its own moment, so a live
-- key pushed out first could lapse a millisecond before the state it governs.
function call.expire_keys(names)
  for name in pairs(names) do
    local kind = KEY_TTL[name]
    if kind ~= 'live' then redis.call('PEXPIRE', K[name], ttl_ms(kind)) end
  end
  for name in pairs(names) do
    if KEY_TTL[name] == 'live' then redis.call('PEXPIRE', K[name], ttl_ms('live')) end
  end
end

-- A new tenant as if loaded (load_tenant): the fields at their defaults, w (1), n (0), the
-- costs by rank (0), st (IDLE) and am (''), as an empty value in its text reads; save_tenant
-- makes a plain new tenant's text (those at their defaults) from a part made once a call.
-- Never changed: save_tenant makes a tenant's next loaded state anew.
call.NONE = {}  -- (load_tenant: the reading of a tenant that does not exist)
call.NEW_LOADED = {w = 1, n = 0, c = {}, st = IDLE, am = ''}
for rank = 1, NRANK do call.NEW_LOADED.c[rank] = 0 end
-- A new tenant's costs by rank are these (shared, all 0) until a waiter of its is counted:
-- a table made per new tenant, and its garbage, spared. Each writer of a tenant's costs
-- (core.lua's push, unlink, top_active, leave) takes its own copy first
-- (call.own_costs).
call.ZERO_COSTS = call.NEW_LOADED.c
function call.own_costs(t)
  local c = t.c
  if c == call.ZERO_COSTS then c = {unpack(c)}; t.c = c end
  return c
end

-- The refresh time (xp) of the tenants a call writes, and its text and the queues' TTL:
-- the same for every tenant of the call, made once (as num(now) is). It is the whole second
-- below now + idle / TTL_REFRESHES where that is still ahead of now: a refresh up to a
-- second sooner, and a whole number's text, the same for a second's calls (num keeps it),
-- not a 17-digit one made per call. Else, only with an idle under 4 s, the exact time.
function call.tenant_xp()
  local xp = now + POL.idle / TTL_REFRESHES
  local whole = math.floor(xp)
  if whole > now then xp = whole end
  M.tenant_xp = xp; M.tenant_xp_text = num(xp); M.tenant_ttl = ttl_ms('tenant')
  return xp
end

-- Writes tenant t if it changed since it was loaded: its whole text (call.TENANT_PATTERN)
-- made, and put in P:T with the call's others (M.tw, call.flush_tenants: one HSET per work check
-- and one at save) unless it is the text loaded or last written (t.tx). `again`: it may be
-- written again this call (save_made), so what is written becomes its loaded state; `hot`:
-- a call of fast.lua's (save), which can change only the first four fields and refreshes
-- no TTL.
local function save_tenant(t, again, hot)
  local loaded = t.loaded
  local c = t.c  -- (its costs by rank)
  -- A plain new tenant: nothing but its own fields (name, f, cap, cap_at, xp) moved from
  -- their defaults (call.NEW_LOADED's: w 1, n 0, its costs shared and all 0, st IDLE, am
  -- ''), most under churn. Written first and at once, in the fewest steps: its text is its
  -- f's, then a part made once a call (all the rest but the name: the same for the call's
  -- plain new tenants), then its name; its xp is the call's (it was 0, or the call's
  -- already); it has no queue. (docs/performance.md, `churn11`: a new tenant's write was
  -- some 100 Lua steps.) It keeps call.NEW_LOADED: written again this call, its text is made
  -- again and compared with t.tx; call.as_written makes its loaded fields. (A call of
  -- fast.lua's makes no tenant; one loaded as new there is written whole, below.)
  if loaded == call.NEW_LOADED and c == call.ZERO_COSTS and not hot and t.w == 1 and t.n == 0
    and t.st == IDLE and t.am == '' then
    local xp = M.tenant_xp or call.tenant_xp()
    t.xp = xp
    local cap, cap_at = t.cap, t.cap_at
    local mid = M.plain_mid
    if mid == nil or M.plain_cap ~= cap or M.plain_cap_at ~= cap_at or M.plain_xp ~= xp then
      mid = SEP .. SEP .. (cap and num(cap) or '') .. SEP .. (cap_at and num(cap_at) or '') .. SEP
        .. string.rep(SEP, NRANK) .. SEP .. SEP .. SEP .. M.tenant_xp_text .. SEP .. SEP
      M.plain_mid = mid; M.plain_cap = cap; M.plain_cap_at = cap_at; M.plain_xp = xp
    end
    local text = call.count_text(t.f, mid, t.nm or '')
    if text ~= t.tx then
      t.tx = text
      local tw = M.tw
      if tw == nil then M.tw = {t.h, text}
      else
        local n = #tw
        tw[n + 1] = t.h; tw[n + 2] = text
      end
    end
    t.queue_made = nil
    return
  end
  -- Capped this call (or again, after it was back in line): P:capped may be new.
  if t.st == CAPPED and (loaded.st ~= CAPPED or t.am ~= loaded.am) then born.capped = true end
  local name = t.nm or ''  -- (as stored, or a new tenant's: tenant in core.lua)
  -- Its queue's TTL (P:q:<h>) pushed out once a quarter of it has passed (xp, up to a
  -- second sooner: call.tenant_xp); the tenant itself has no TTL of its own: P:T's is the
  -- budget's (expire_keys), and it leaves by the idle sweep, the bound (forget_idle) or the
  -- stray sweep (call.sweep_strays).
  local refresh = not hot and now >= t.xp
  if refresh then t.xp = M.tenant_xp or call.tenant_xp() end
  local text
  do
    -- (One table kept for the parts, call.tparts; the text made with one concat.)
    local parts = call.tparts
    parts[1] = call.count_text(t.f)
    local v = t.w
    if v == 1 then parts[2] = '' else parts[2] = num(v) end
    v = t.cap
    if v == nil then parts[3] = '' else parts[3] = num(v) end
    v = t.cap_at
    if v == nil then parts[4] = '' else parts[4] = num(v) end
    v = t.n
    if v == 0 then parts[5] = '' else parts[5] = num(v) end
    for rank = 1, NRANK do
      v = c[rank]
      if v == 0 then parts[5 + rank] = '' else parts[5 + rank] = num(v) end
    end
    v = t.st
    if v == IDLE then parts[NRANK + 6] = '' else parts[NRANK + 6] = num(v) end
    v = t.am  -- (its sequence number alone: the member is that, SEP, the digest)
    if v == '' then parts[NRANK + 7] = ''
    else parts[NRANK + 7] = string.sub(v, 1, MEMBER_SEQ_DIGITS) end
    v = t.xp
    if v == 0 then parts[NRANK + 8] = ''
    elseif v == M.tenant_xp then parts[NRANK + 8] = M.tenant_xp_text
    else parts[NRANK + 8] = num(v) end
    v = t.q1  -- (its one waiter, its rank first: enqueue)
    if v == nil then parts[NRANK + 9] = '' else parts[NRANK + 9] = num(t.q1r) .. v end
    parts[NRANK + 10] = name
    text = table.concat(parts, SEP, 1, NRANK + 10)
  end
  if text ~= t.tx then
    t.tx = text
    -- (Collected in M.tw, for call.flush_tenants: in place, not by a Lua call a tenant.)
    local tw = M.tw
    if tw == nil then M.tw = {t.h, text}
    else
      local n = #tw
      tw[n + 1] = t.h; tw[n + 2] = text
    end
  end
  if refresh then
    if t.n > 0 and t.q1 == nil then redis.call('PEXPIRE', K.prefix .. KEY.queue .. t.h, M.tenant_ttl) end
  elseif t.queue_made and t.n > 0 then
    redis.call('PEXPIRE', K.prefix .. KEY.queue .. t.h, ttl_ms('tenant'))
  end
  t.queue_made = nil
  if again then
    -- (Its costs as loaded if none moved: a loaded table of costs is never changed.)
    local costs = call.NEW_LOADED.c  -- (all 0, as with nothing waiting: shared, never changed)
    for rank = 1, NRANK do
      if c[rank] ~= 0 then
        costs = {unpack(c)}  -- (made whole)
        break
      end
    end
    t.loaded = {f = t.f, w = t.w, cap = t.cap, cap_at = t.cap_at, n = t.n, c = costs, st = t.st,
      am = t.am, xp = t.xp}
  end
end

-- The tenants made this call so far, written now: batch.lua calls this at its work checks,
-- so that their writes count in the work that bounds a call (TUNING.WORK_US) instead of all
-- coming after it (a call of new tenants spent twice its work budget writing them). The
-- list of them is kept for the call: those up to M.made_saved are written.
function call.save_made()
  local made = M.made
  if made == nil or #made == M.made_saved then return end
  local from = (M.made_saved or 0) + 1
  M.made_saved = #made
  call.save_now(made, from)
end

-- Tenants ts[from or 1..] written now (save_made; core.lua's leave, before each of its
-- work checks, for the same reason).
function call.save_now(ts, from)
  for i = from or 1, #ts do
    local t = ts[i]
    if t.dirty and not t.deleted then
      save_tenant(t, true)
      t.dirty = false
    end
  end
  call.flush_tenants()
end

-- What fast.lua's calls can change (`hot`: save compares only these): these packed numbers
-- (their places in PACKED), in flight and the live stamp; of a tenant, f, w, cap and
-- cap_at (fast.lua gives up when a TTL refresh, a window roll or an idle sweep is due, and
-- runs only while nobody waits).
call.HOT_PACKED = {}
do  -- (at load: a function library may use no standard library there)
  local hot = {tokens = true, ts = true, v = true, win_cost = true, la = true, np = true,
    pc = true, lk = true, le = true}
  for i = 1, #PACKED do
    if hot[PACKED[i]] then call.HOT_PACKED[#call.HOT_PACKED + 1] = i end
  end
end

-- A process's recent admissions (core.lua's take): trimmed back to RECENT_KEPT once
-- TUNING.RECENT_SLACK more came in (at least the last RECENT_KEPT are kept), their TTL set
-- when the list is made and pushed out a quarter of T apart (the loaded library keeps when,
-- by process: with EVAL, or once the library is loaded anew, on the next call).
-- push_recent_of: process p's (`ids`, of `recent`).
function call.push_recent_of(p, ids)
  local due = K.recent_due
  if due == nil then due = {}; K.recent_due = due end
  local names = K.recent_names
  local key = names and names[p] or call.recent_key(p)
  local size
  if #ids == 1 then
    size = redis.call('LPUSH', key, ids[1])  -- (no unpack: a call)
  else
    size = redis.call('LPUSH', key, unpack(ids))
  end
  if size > RECENT_KEPT + TUNING.RECENT_SLACK then
    redis.call('LTRIM', key, '0', num(RECENT_KEPT - 1))
  end
  local at = due[p]
  if size == #ids or at == nil or now >= at or now < at - POL.ttl then
    redis.call('PEXPIRE', key, ttl_ms('state'))
    due[p] = now + POL.ttl / TTL_REFRESHES
  end
end

function call.push_recent()
  for p, ids in pairs(recent) do call.push_recent_of(p, ids) end
end

-- save's packed numbers, a full call's with a memo entry (`loaded`): the entry changed in
-- place, as save_acquire does (only K.state_memo and the kept state hold it, and both
-- follow it), and no memo while it is changed: a call that fails halfway leaves one
-- whose text no P:s has. args: save's HSET, which gets the field if one changed (true).
function call.save_packed(args)
  local s, vals, texts = S, loaded.vals, loaded.texts
  local text = loaded.text
  loaded.text = false
  -- (PACKED's fields written out, in its order: a loop over their names took twice as long)
  local c, x = false, nil
  x = s.tokens; if x ~= vals[1] then c = true; vals[1] = x; texts[1] = x and num(x) or '' end
  x = s.ts; if x ~= vals[2] then c = true; vals[2] = x; texts[2] = x and num(x) or '' end
  x = s.v; if x ~= vals[3] then c = true; vals[3] = x; texts[3] = x and num(x) or '' end
  x = s.win_at; if x ~= vals[4] then c = true; vals[4] = x; texts[4] = x and num(x) or '' end
  x = s.win_v0; if x ~= vals[5] then c = true; vals[5] = x; texts[5] = x and num(x) or '' end
  x = s.win_cost; if x ~= vals[6] then c = true; vals[6] = x; texts[6] = x and call.count_text(x) or '' end
  x = s.v_rate; if x ~= vals[7] then c = true; vals[7] = x; texts[7] = x and num(x) or '' end
  x = s.thr; if x ~= vals[8] then c = true; vals[8] = x; texts[8] = x and num(x) or '' end
  x = s.meas_at; if x ~= vals[9] then c = true; vals[9] = x; texts[9] = x and num(x) or '' end
  x = s.qcost; if x ~= vals[10] then c = true; vals[10] = x; texts[10] = x and num(x) or '' end
  x = s.wsum; if x ~= vals[11] then c = true; vals[11] = x; texts[11] = x and num(x) or '' end
  x = s.seq; if x ~= vals[12] then c = true; vals[12] = x; texts[12] = x and call.count_text(x) or '' end
  x = s.tk_at; if x ~= vals[13] then c = true; vals[13] = x; texts[13] = x and num(x) or '' end
  x = s.xp; if x ~= vals[14] then c = true; vals[14] = x; texts[14] = x and num(x) or '' end
  x = s.fi; if x ~= vals[15] then c = true; vals[15] = x; texts[15] = x and num(x) or '' end
  x = s.la; if x ~= vals[16] then c = true; vals[16] = x; texts[16] = x and num(x) or '' end
  x = s.rc; if x ~= vals[17] then c = true; vals[17] = x; texts[17] = x and num(x) or '' end
  x = s.np; if x ~= vals[18] then c = true; vals[18] = x; texts[18] = x and num(x) or '' end
  x = s.pc; if x ~= vals[19] then c = true; vals[19] = x; texts[19] = x and num(x) or '' end
  x = s.lm; if x ~= vals[20] then c = true; vals[20] = x; texts[20] = x and call.count_text(x) or '' end
  x = s.lk; if x ~= vals[21] then c = true; vals[21] = x; texts[21] = x and num(x) or '' end
  x = s.le; if x ~= vals[22] then c = true; vals[22] = x; texts[22] = x and num(x) or '' end
  x = s.rg; if x ~= vals[23] then c = true; vals[23] = x; texts[23] = x and num(x) or '' end
  x = s.ra; if x ~= vals[24] then c = true; vals[24] = x; texts[24] = x and num(x) or '' end
  x = s.rx; if x ~= vals[25] then c = true; vals[25] = x; texts[25] = x and num(x) or '' end
  x = s.rb; if x ~= vals[26] then c = true; vals[26] = x; texts[26] = x and num(x) or '' end
  x = s.ry; if x ~= vals[27] then c = true; vals[27] = x; texts[27] = x and num(x) or '' end
  x = s.sq; if x ~= vals[28] then c = true; vals[28] = x; texts[28] = x and num(x) or '' end
  x = s.sk; if x ~= vals[29] then c = true; vals[29] = x; texts[29] = x and num(x) or '' end
  if c then
    text = table.concat(texts, SEP)
    args[1] = PACKED_FIELD; args[2] = text
    loaded.rest = nil  -- (save_acquire's texts after the sixth: made again)
  end
  loaded.text = text
  return c
end

-- save's packed numbers otherwise (a state made anew, or fast.lua's `hot` calls, which
-- compare only what they can change): a new memo entry if one changed.
function call.save_packed_anew(args, hot)
  local vals = {S.tokens, S.ts, S.v, S.win_at, S.win_v0, S.win_cost, S.v_rate, S.thr,
    S.meas_at, S.qcost, S.wsum, S.seq, S.tk_at, S.xp, S.fi, S.la, S.rc, S.np, S.pc, S.lm, S.lk,
    S.le, S.rg, S.ra, S.rx, S.rb, S.ry, S.sq, S.sk}
  local old, texts = {}, nil
  if loaded ~= nil then old = loaded.vals end
  local places = nil
  if hot then places = call.HOT_PACKED end
  for j = 1, #(places or PACKED) do
    local i = j
    if places ~= nil then i = places[j] end
    local value = vals[i]
    if value ~= old[i] then
      if texts == nil then
        if loaded ~= nil then texts = {unpack(loaded.texts)} else texts = {unpack(EMPTY_TEXTS)} end
      end
      if value == nil then texts[i] = '' else texts[i] = num(value) end
    end
  end
  if texts ~= nil then
    loaded = {text = table.concat(texts, SEP), vals = vals, texts = texts}
    K.state_memo = loaded
    args[1] = PACKED_FIELD; args[2] = loaded.text
  end
  return texts ~= nil
end

-- save's plain fields that changed (PLAIN's, written out: a loop over their names took
-- twice as long) into args after its first n, their texts made what was read (M.raw: the
-- HMGET's, PLAIN[i] at i + 1); the new count. `hot`: a call of fast.lua's, which can
-- change only in flight and the live stamp (and has no M.raw).
function call.put_plain(args, n, name, value, i)
  args[n + 1] = name
  if type(value) == 'number' then value = num(value) end
  args[n + 2] = value
  S0[name] = S[name]
  local raw = M.raw
  if raw ~= nil then raw[i] = value end
  return n + 2
end

function call.save_plain(args, n, hot)
  local s, s0, put = S, S0, call.put_plain
  if s.inflight ~= s0.inflight then n = put(args, n, 'inflight', s.inflight, 2) end
  if hot then
    if s.lv ~= s0.lv then n = put(args, n, LIVE_STAMP, s.lv, 6) end
    return n
  end
  if s.waiting ~= s0.waiting then n = put(args, n, 'waiting', s.waiting, 3) end
  if s.tk_by ~= s0.tk_by then n = put(args, n, 'tk_by', s.tk_by, 4) end
  if s.ep ~= s0.ep then n = put(args, n, 'ep', s.ep, 5) end
  if s.lv ~= s0.lv then n = put(args, n, LIVE_STAMP, s.lv, 6) end
  for rank = 1, NRANK do
    local name = RANK_COUNT[rank]
    if s[name] ~= s0[name] then n = put(args, n, name, s[name], 6 + rank) end
  end
  return n
end

-- save's HSET of P:s, kept from call to call (its first n entries in use: a table grown
-- entry by entry is made anew as it doubles).
call.state_args = {}

-- Only what changed, and key TTLs only when due (every budget-wide key, a quarter of T
-- apart) or for keys this call may have created: this runs on every call. `hot`: a call of
-- fast.lua's, which compares only what it can change (call.HOT_PACKED).
local function save(hot)
  -- (Someone waits now and nobody did as this call found the state: call.signal_waiting;
  -- someone did, and processes are still to be told: the next of them.)
  if S.waiting > 0 then
    if (S0.waiting or 0) <= 0 then call.signal_waiting()
    elseif S.sk then call.signal_next()
    end
  end
  call.flush_idle()
  local args, n = call.state_args, 0
  S.inflight = S.inflight - held_back
  held_back = 0
  local refresh = now >= S.xp
  if refresh then S.xp = now + POL.ttl / TTL_REFRESHES end
  -- The packed numbers (in PACKED's order): their text anew if one changed, only the
  -- changed ones formatted.
  local changed
  if loaded ~= nil and not hot then
    changed = call.save_packed(args)
  else
    changed = call.save_packed_anew(args, hot)
  end
  if changed then n = 2 end
  n = call.save_plain(args, n, hot)
  -- The state's generation (keys.GENERATION): a full call that keeps its state and leaves
  -- requests waiting (so the next call is a full one: batch.lua tries no fast path) stamps
  -- its write (call.keep_state, call.take_kept), unless it took the state by its stamp
  -- (M.by_gen: P:s holds it and this library was its last writer: the stamp stays, nothing
  -- written). Any other write clears the stamp it found, a call that leaves nobody waiting
  -- too: so a stamp is only there while someone waits, and fast.lua's calls, which write
  -- only while nobody does, need neither read nor clear it (call.maybe_gen).
  if M.stamped and M.raw ~= nil and loaded ~= nil and S.waiting > 0 then
    if M.by_gen then
      M.gen = call.gen0
    elseif n > 0 then
      local gen = call.new_gen()
      args[n + 1] = TUNING.GENERATION; args[n + 2] = gen; n = n + 2
      M.gen = gen; call.gen0 = gen
    end
  elseif n > 0 and call.gen0 ~= '' then
    args[n + 1] = TUNING.GENERATION; args[n + 2] = ''; n = n + 2
    call.gen0 = ''
    call.drop_kept()
  end
  if n > 0 then redis.call('HSET', K.state, unpack(args, 1, n)) end
  for _, t in pairs(T) do
    if t.dirty and not t.deleted then save_tenant(t, false, hot) end
  end
  call.flush_tenants()
  local expiring = born
  if refresh then expiring = KEY_TTL end
  call.expire_keys(expiring)
  born = {}
  call.push_recent()
  for p, msgs in pairs(out_events) do
    local key = K.prefix .. KEY.grants .. p
    redis.call('RPUSH', key, unpack(msgs))
    redis.call('PEXPIRE', key, ttl_ms('state'))
  end
end

-- --- a fast acquire's state and writes (fast.lua) ---------------------------------------
--
-- load_hot_state and save(true) for one acquire, for less: the state goes into a table kept
-- from call to call (call.S_kept; with EVAL, made per call) whose fields are all assigned
-- anew each call (assigning a field a table has costs a fraction of adding one to a new
-- table), and the writes are save(true)'s for one tenant, made without its general tables.

call.S_kept = {}

-- The state as load_hot_state loads it (and fast_state defaults it), into S; false if
-- there is none. Every field of PACKED and HOT_FIELDS is assigned (nil if unset).
function call.load_acquire_state()
  -- (HOT_FIELDS written out: unpack is a call.)
  local v = redis.call('HMGET', K.state, PACKED_FIELD, 'inflight', 'waiting', 'ep', LIVE_STAMP)
  if not v[1] then return false end
  loaded = K.state_memo
  if loaded == nil or loaded.text ~= v[1] then loaded = unpack_state(v[1]) end
  local n, s = loaded.vals, call.S_kept
  s.tokens = n[1]; s.ts = n[2]; s.v = n[3]; s.win_at = n[4]; s.win_v0 = n[5]; s.win_cost = n[6]
  s.v_rate = n[7]; s.thr = n[8]; s.meas_at = n[9]; s.qcost = n[10]; s.wsum = n[11]
  s.seq = n[12]; s.tk_at = n[13]; s.xp = n[14]; s.fi = n[15]; s.la = n[16] or 0; s.rc = n[17]
  s.np = n[18]; s.pc = n[19]; s.lm = n[20]; s.lk = n[21] or 0; s.le = n[22]
  s.rg = n[23]  -- (leases of rate tokens: the rest only if there were any)
  if s.rg ~= nil then s.ra = n[24]; s.rx = n[25]; s.rb = n[26]; s.ry = n[27] end
  s.sq = n[28]; s.sk = n[29]
  s.inflight = NUMBERS[v[2]] or tonum(v[2]); s.waiting = NUMBERS[v[3]] or tonum(v[3])
  s.ep = v[4] or ''; s.lv = v[5] or ''
  call.inflight0 = s.inflight; call.lv0 = s.lv
  S = s
  return true
end

-- A fast path's tenant t (read by call.read_head) written back: its f, w, cap and cap_at
-- (cap's and cap_at's texts as read, t.capt, unless they moved), then the rest of its
-- text as read (t.rest), in one HSET of its field of P:T.
function call.put_head(t)
  local w, cap, cap_at = t.w, t.cap, t.cap_at
  local wt = ''
  if w ~= 1 then wt = num(w) end
  local capt = t.capt
  if cap ~= t.cap0 or cap_at ~= t.cap_at0 then
    capt = SEP .. (cap and num(cap) or '') .. SEP .. (cap_at and num(cap_at) or '')
  end
  redis.call('HSET', K.tenant_hash, t.h, call.count_text(t.f) .. SEP .. wt .. capt .. t.rest)
end

-- Tenant h's text in P:T taken apart for the fast paths: f, w, cap, cap_at, st, xp (as
-- numbers), and w's text, cap's and cap_at's (with their SEPs) and the rest's, kept for
-- call.put_head; nil if it has none.
function call.read_head(h)
  local text = redis.call('HGET', K.tenant_hash, h)
  if not text then return nil end
  local f, w, capt, cap, cap_at, rest, st, xp = string.match(text, call.FAST_PATTERN)
  if f == nil then return nil end
  -- ('' is a default, or unset: no lookup, no call)
  local weight, state = 1, IDLE
  if w ~= '' then weight = NUMBERS[w] or tonum(w) or 1 end
  if st ~= '' then state = NUMBERS[st] or tonum(st) or IDLE end
  if cap == '' then cap = nil else cap = NUMBERS[cap] or tonum(cap) end
  if cap_at == '' then cap_at = nil else cap_at = NUMBERS[cap_at] or tonum(cap_at) end
  return NUMBERS[f] or tonum(f), weight, cap, cap_at, state, NUMBERS[xp] or tonum(xp) or 0, w,
    capt, rest
end

-- What save(true) writes after an acquire of tenant t by fast.lua (t.f0, t.w0, t.cap0,
-- t.cap_at0: its f, w, cap and cap_at as loaded): the idle list, the packed numbers that changed, in flight and the live
-- stamp, the tenant's changed fields, the TTLs of keys this call made, the recent admissions.
-- (No TTL refresh is due, nobody waits, nothing is held back: fast.lua checked.)
function call.save_acquire(t)
  local seen = call.now_score()
  -- (Without the list's anchor, which a full call adds (call.flush_idle): its member costs
  -- each fast acquire a little; a member new here may have made the key, so it gets a TTL.)
  if redis.call('ZADD', K.tenants, seen, t.h) > 0 then born.tenants = true end
  -- The packed numbers fast.lua can change (call.HOT_PACKED, by their places in PACKED:
  -- tokens, ts, v, win_cost, la, np, pc, lk, le), compared and formatted one by one ('' if
  -- unset). The memo entry loaded is changed in place (only K.state_memo holds it), and is
  -- no memo while it is changed.
  local s, vals, texts = S, loaded.vals, loaded.texts
  local text = loaded.text
  loaded.text = false
  local changed, later = false, false
  local x = s.tokens
  if x ~= vals[1] then changed = true; vals[1] = x; texts[1] = x and num(x) or '' end
  x = s.ts
  if x ~= vals[2] then changed = true; vals[2] = x; texts[2] = x and num(x) or '' end
  x = s.v
  if x ~= vals[3] then changed = true; vals[3] = x; texts[3] = x and num(x) or '' end
  x = s.win_cost
  if x ~= vals[6] then changed = true; vals[6] = x; texts[6] = x and call.count_text(x) or '' end
  x = s.la
  if x ~= vals[16] then later = true; vals[16] = x; texts[16] = x and num(x) or '' end
  x = s.np
  if x ~= vals[18] then later = true; vals[18] = x; texts[18] = x and num(x) or '' end
  x = s.pc
  if x ~= vals[19] then later = true; vals[19] = x; texts[19] = x and num(x) or '' end
  x = s.lk
  if x ~= vals[21] then later = true; vals[21] = x; texts[21] = x and num(x) or '' end
  x = s.le
  if x ~= vals[22] then later = true; vals[22] = x; texts[22] = x and num(x) or '' end
  -- The text: the first six numbers' texts, then the rest's as the memo entry keeps it
  -- (`rest`: made again only if one of them changed); one concatenation.
  if later then changed = true end
  if changed and (later or loaded.rest == nil) then
    loaded.rest = SEP .. table.concat(texts, SEP, 7, #PACKED)
  end
  local inflight_changed = s.inflight ~= call.inflight0
  if not changed then loaded.text = text end
  if changed then
    loaded.text = texts[1] .. SEP .. texts[2] .. SEP .. texts[3] .. SEP .. texts[4] .. SEP
      .. texts[5] .. SEP .. texts[6] .. loaded.rest
    if s.lv ~= call.lv0 then
      if inflight_changed then
        redis.call('HSET', K.state, PACKED_FIELD, loaded.text, 'inflight', num(s.inflight),
          LIVE_STAMP, s.lv)
      else
        redis.call('HSET', K.state, PACKED_FIELD, loaded.text, LIVE_STAMP, s.lv)
      end
    elseif inflight_changed then
      redis.call('HSET', K.state, PACKED_FIELD, loaded.text, 'inflight', num(s.inflight))
    else
      redis.call('HSET', K.state, PACKED_FIELD, loaded.text)
    end
  elseif inflight_changed or s.lv ~= call.lv0 then  -- (a clock that did not move)
    local args = {}
    if inflight_changed then args[1] = 'inflight'; args[2] = num(s.inflight) end
    if s.lv ~= call.lv0 then args[#args + 1] = LIVE_STAMP; args[#args + 1] = s.lv end
    redis.call('HSET', K.state, unpack(args))
  end
  if t.dirty then  -- (its field of P:T: f, w, cap, cap_at, and the rest as read)
    local f0, w0, cap0, cap_at0 = t.f0, t.w0, t.cap0, t.cap_at0
    if t.w == w0 and t.cap == cap0 and t.cap_at == cap_at0 then
      if t.f ~= f0 then
        redis.call('HSET', K.tenant_hash, t.h,
          call.count_text(t.f) .. SEP .. t.wt .. t.capt .. t.rest)
      end
    else
      call.put_head(t)
    end
  end
  if next(born) ~= nil then
    call.expire_keys(born)
    born = {}
  end
  local ids = recent[proc]  -- (its only admission: admit_now's, if it took no lease)
  if ids ~= nil then call.push_recent_of(proc, ids) end
end

-- --- the caller's heartbeat ----------------------------------------------------------------
--
-- Every batch call registers its caller in P:procs (ZADD NX when it is not there: only
-- renew.lua extends a heartbeat). A loaded library remembers, by process, the heartbeat's
-- expiry as it last read or wrote it, with the state's epoch then (K.beats; K is kept by
-- prefix), and asks P:procs only when it does not know the caller is there: an entry whose
-- expiry is still ahead cannot be gone, as renew.lua sweeps only lapsed ones and only the
-- process itself removes its own (leave.lua, which forgets it here too). The epoch: a Redis
-- emptied meanwhile has the state made anew, with another. (A heartbeat lapsed but not yet
-- swept, as in a test that never renews, is asked for every call, as before. With EVAL
-- nothing is kept: asked every call.) Returns whether this call registered the caller.
function call.heartbeat()
  if call.beat_known(proc) then return false end
  local at = redis.call('ZSCORE', K.procs, proc)
  local joined = false
  if at then
    at = NUMBERS[at] or tonum(at)
  else
    at = now + POL.lease_ttl
    joined = redis.call('ZADD', K.procs, 'NX', num(at), proc) == 1
  end
  call.beat_seen(proc, at, S.ep)
  return joined
end

-- Process p's heartbeat is known to be in P:procs, not lapsed (call.heartbeat; core.lua's
-- orphaned, for a waiter's process: the fleet's processes renew on the same library).
function call.beat_known(p)
  local beats = K.beats
  local beat = beats and beats[p]
  return beat ~= nil and beat.ep == S.ep and now < beat.at
end

-- Process p's heartbeat is in P:procs until `at`, the state's epoch `ep` (call.heartbeat;
-- renew.lua). At most TUNING.NAMES_MAX processes are kept by prefix, then afresh.
function call.beat_seen(p, at, ep)
  local beats = K.beats
  if beats == nil or K.beats_kept >= TUNING.NAMES_MAX then
    beats = {}; K.beats = beats; K.beats_kept = 0
  end
  local beat = beats[p]
  if beat == nil then
    beats[p] = {at = at, ep = ep}
    K.beats_kept = K.beats_kept + 1
  else
    beat.at = at; beat.ep = ep
  end
end

-- --- events and leases ---------------------------------------------------------------------

-- A message (its fields joined with SEP) for process p's grant list. (The fields are
-- joined by the callers, in one concatenation: a table of them made for table.concat cost
-- twice that.)
local function emit(p, message)
  local list = out_events[p]
  if list == nil then out_events[p] = {message} else list[#list + 1] = message end
end

-- A grant (waited seconds, lease flag) or an eviction (reason, seconds) for request `id`.
local function emit_granted(p, id, waited, lease)
  local flag = '0'
  if lease then flag = '1' end
  emit(p, MESSAGE.granted .. SEP .. id .. SEP .. num(waited) .. SEP .. flag)
end

local function emit_evicted(p, id, reason, wait)
  emit(p, MESSAGE.evicted .. SEP .. id .. SEP .. reason .. SEP .. num(wait))
end

-- --- pools out of the bucket (THROTTLE_RATE_LEASE, THROTTLE_KEEP_SLOTS) ---------------------
--
-- A process with a pool admits without a call: from a lease of rate tokens (ratelease.lua),
-- or on kept concurrency slots (renew.lua registers it). It stops when it hears that someone
-- waits for the budget; a reply tells it, and so does this: when a call leaves someone
-- waiting and the last one had left nobody (S.waiting from 0 to more; save), each process
-- that may hold a pool gets MESSAGE.waiting on its grant list, read within a round trip by
-- its listener (grants.py), and gives its pool back at once (ratepool.py, slotpool.py). Only
-- then: only while rate tokens are out in leases (S.ra, S.rb) or the budget's slots may be
-- kept (a concurrency alone), and only to the processes in P:pl (process -> until when it
-- may hold one). A message lost (a listener reconnecting, a Redis that failed over) only
-- delays the pool's return to the process's next reply or its T: the bound is exact
-- whatever the pools do (the tokens and slots are counted out in Redis).
--
-- One call tells TUNING.SIGNAL_BATCH processes at most (each costs an RPUSH and a PEXPIRE,
-- some 19,000 instructions: all of a large fleet at once would hold Redis for over a
-- millisecond), and no call does work that grows with the fleet. Up to SIGNAL_BATCH live
-- registrations are told from P:pl at once (ZRANGEBYSCORE ... LIMIT); with more, a signal
-- is a round over P:pn, P:pl's members by name (all scored 0, so ZRANGEBYLEX walks them
-- in a fixed order whatever their registrations' expiries do), from the name after the
-- last one taken (P:s's TUNING.SIGNAL_CURSOR, read only while a round is under way: S.sk,
-- when it began). Each call of the round takes the next SIGNAL_BATCH names (ZRANGEBYLEX
-- ... LIMIT) and their registrations (ZMSCORE of P:pl): the live ones are told, the
-- lapsed or gone ones dropped from both keys. Each following full call that leaves someone waiting takes the next
-- batch, until the walk reaches the last name: N registered processes are all told within
-- ceil(N / SIGNAL_BATCH) such calls, each once (a process renewed meanwhile keeps its
-- place: its name). Nobody waits any more: the round waits (a pool kept while nobody
-- waits takes nothing from anyone); the next opening, within the gap or after it, goes on
-- with it: a signal starts anew only once the last round reached its end.

-- The processes that may hold a pool are told that someone waits (save, on the transition).
function call.signal_waiting()
  local leased = S.rg ~= nil and ((S.ra or 0) > 0 and now < (S.rx or 0)
    or (S.rb or 0) > 0 and now < (S.ry or 0))
  if not leased and not (L.concurrency ~= nil and L.rate == nil and L.tenant_rate == nil) then
    return
  end
  -- The rest of the last signal first (within the gap too: at most SIGNAL_BATCH a call;
  -- none left: a signal anew).
  if S.sk and call.signal_next() > 0 then return end
  -- At most once per TUNING.SIGNAL_GAP per budget (P:s's TUNING.SIGNALED: read only here): a
  -- pool taken since the last signal goes back at its next reply or its T.
  local last = tonumber(redis.call('HGET', K.state, TUNING.SIGNALED))
  if last ~= nil and now >= last and now < last + TUNING.SIGNAL_GAP then return end
  redis.call('HSET', K.state, TUNING.SIGNALED, num(now))
  local batch = TUNING.SIGNAL_BATCH
  local holders = redis.call('ZRANGEBYSCORE', K.pools, '(' .. num(now), '+inf', 'LIMIT', 0,
    batch + 1)
  if #holders <= batch then  -- (one call's: told, no round)
    for i = 1, #holders do emit(holders[i], MESSAGE.waiting) end
    return
  end
  -- More: a round by name. P:pl out of its compact encoding first (the anchor: longer than
  -- an entry of it may be; score 0, never live, never in P:pn), where each of the round's
  -- ZMSCORE lookups would scan it (some 10,000 instructions each at 100 members).
  redis.call('ZADD', K.pools, 'NX', 0, TUNING.LEASE_ANCHOR)
  call.signal_next('-')
end

-- The next TUNING.SIGNAL_BATCH names of P:pn after `from` (a ZRANGEBYLEX bound; nil: the
-- cursor of the round under way) are told if their registration in P:pl is live, dropped
-- from P:pn and P:pl if it lapsed (or from P:pn if it is gone). The round goes on (S.sk,
-- the cursor after the last name taken) while names are left. Returns how many it took.
function call.signal_next(from)
  local batch = TUNING.SIGNAL_BATCH
  if from == nil then from = redis.call('HGET', K.state, TUNING.SIGNAL_CURSOR) end
  local names = {}
  if from then
    names = redis.call('ZRANGEBYLEX', K.pools_names, from, '+', 'LIMIT', 0, batch + 1)
  end
  local n = #names
  if n > batch then
    n = batch
    S.sk = S.sk or now
    redis.call('HSET', K.state, TUNING.SIGNAL_CURSOR, '(' .. names[n])
  else
    S.sk = nil  -- (the cursor field stays: read only while S.sk is set)
  end
  if n == 0 then return 0 end
  local untils = redis.call('ZMSCORE', K.pools, unpack(names, 1, n))
  local gone = nil
  for i = 1, n do
    local til = tonumber(untils[i])  -- (false: not in P:pl)
    if til ~= nil and til > now then
      emit(names[i], MESSAGE.waiting)
    else
      gone = gone or {}
      gone[#gone + 1] = names[i]
    end
  end
  if gone ~= nil then
    redis.call('ZREM', K.pools_names, unpack(gone))
    redis.call('ZREM', K.pools, unpack(gone))  -- (lapsed: a heartbeat registers it anew)
  end
  return n
end

-- The caller holds a lease of rate tokens until `til` (ratelease.lua): it is in P:pl. The
-- key's TTL set when the ZADD made its member (perhaps the key), else pushed out a quarter
-- of T apart (the loaded library keeps when, by prefix, as call.push_recent_of does: with
-- EVAL, on every call); renew.lua, the other writer, sets it too.
function call.pool_held(til)
  local added = redis.call('ZADD', K.pools, 'GT', num(til), proc)
  if added > 0 then redis.call('ZADD', K.pools_names, 0, proc) end  -- (its name: signal_next)
  local due = K.pools_due
  if added > 0 or due == nil or now >= due or now < due - POL.ttl then
    redis.call('PEXPIRE', K.pools, ttl_ms('state'))
    redis.call('PEXPIRE', K.pools_names, ttl_ms('state'))
    K.pools_due = now + POL.ttl / TTL_REFRESHES
  end
end

-- P:leases and P:lc in their big encodings (skiplist, hash table) while many leases are in
-- flight: in Redis's compact encoding (listpack, up to 128 entries by default) every ZADD,
-- ZREM and HDEL scans the whole collection, so a lease would cost more the more are in
-- flight. One anchor member longer than any compact entry may be (zset-/hash-max-listpack-
-- value, 64 bytes by default) converts them for good, whatever the server's settings below
-- that length; it is set once TUNING.LEASE_ANCHOR_AT are in flight (fewer are cheap either way)
-- and taken out with the last lease (a budget at rest keeps no lease keys). Score +inf:
-- never expired, never first. S.la: the anchor is set.
local function anchor_leases()
  if S.la == 1 or S.inflight < TUNING.LEASE_ANCHOR_AT then return end
  redis.call('ZADD', K.leases, 'inf', TUNING.LEASE_ANCHOR)
  redis.call('HSET', K.lease_costs, TUNING.LEASE_ANCHOR, '0')
  born.lease_costs = true
  S.la = 1
end

local function unanchor_leases()
  if S.la ~= 1 or S.inflight > 0 then return end
  redis.call('ZREM', K.leases, TUNING.LEASE_ANCHOR)
  redis.call('HDEL', K.lease_costs, TUNING.LEASE_ANCHOR)
  S.la = 0
end

-- A lease is its member in P:leases (its expiry the score); one of a cost other than 1 has
-- its cost in P:lc too, and S.lk counts those: while none is in flight (most of the time:
-- most requests cost 1) a lease is one ZADD and its release one ZREM.
-- S.le, a time no lease expires before (fast.lua's lapsed_lease), stays one: a lease added
-- lowers it if it expires earlier (a renewal, renew.lua's, only moves an expiry later, and
-- a lease that leaves only raises the earliest). Unset (not known) it stays unset.
local function put_lease(id, cost)
  anchor_leases()
  local expiry = now + POL.lease_ttl
  if S.le ~= nil and expiry < S.le then S.le = expiry end
  redis.call('ZADD', K.leases, num(expiry), id)
  if cost ~= 1 then
    if S.lk <= 0 then born.lease_costs = true end  -- (P:lc may be new)
    redis.call('HSET', K.lease_costs, id, num(cost))
    S.lk = S.lk + 1
  end
end

local function add_lease(id, cost)
  if S.inflight <= 0 then born.leases = true end  -- the first lease: P:leases is new
  S.inflight = S.inflight + cost
  put_lease(id, cost)
end

-- Gives a lease's concurrency back; false if there was none.
local function drop_lease(id)
  if redis.call('ZREM', K.leases, id) == 0 then return false end
  local cost = 1
  if S.lk > 0 then
    local raw = redis.call('HGET', K.lease_costs, id)
    if raw then
      cost = tonum(raw)
      redis.call('HDEL', K.lease_costs, id)
      S.lk = S.lk - 1
    end
  end
  S.inflight = math.max(0, S.inflight - cost)
  unanchor_leases()
  return true
end

-- Was request `id` admitted already (by this process)? true: with a lease; false: without
-- one (recently); nil: not that anyone remembers.
local function admitted(id)
  if redis.call('ZSCORE', K.leases, id) then return true end
  if redis.call('LPOS', K.prefix .. KEY.recent .. proc, id) then return false end
  return nil
end

-- --- a state made anew (scheduler README, "Only in Lua: a state made anew") ---------------
--
-- Redis restarted empty, or a failover to an empty replica, loses every lease while their
-- requests still run. Each state has an epoch (made with it, carried by every batch reply);
-- a process that sees a new one reclaims the leases it holds, and the first call of a
-- process that knew the old one starts a grace of RECLAIM_GRACE_S in which nothing new is
-- admitted: the whole limit counts as held (hold_back) while the leases come back.

-- Called once per batch call after load_state: in the grace, the limit counts as held.
local function hold_back()
  if now < S.rc and L.concurrency ~= nil then
    held_back = L.concurrency
    S.inflight = S.inflight + held_back
  end
end

-- When a tick must end the grace (nil: no grace, or nobody waits).
local function grace_due()
  if now < S.rc and S.waiting > 0 then return S.rc end
  return nil
end

-- Register again lease `id` of `cost` that this process holds, lost with the state of epoch
-- `old` ("" for a lease of the failure mode's, never in Redis: registered only if the
-- limit has room for it). Nothing if its state is the one in force (still there, or it
-- expired there: never resurrected), or it is registered already (a retried reclaim).
-- After the grace too, whatever the room: its request runs, and counting it is what keeps
-- the fleet from admitting more until it is back under the limit. Refused, it would not
-- undo what the new state admitted meanwhile, and each release would make room that is
-- not there. (Reclaims come in time because a process holding leases probes a Redis away
-- more often than the grace lasts: recovery.py, HOLDING_PROBE_S.)
local function reclaim(id, cost, old)
  if L.concurrency == nil or old == S.ep then return false end
  if redis.call('ZSCORE', K.leases, id) then return false end
  cost = math.max(1, math.min(cost, L.concurrency))
  if old == '' and S.inflight - held_back + cost > L.concurrency then return false end
  born.leases = true
  S.inflight = S.inflight + cost
  put_lease(id, cost)
  return true
end

-- --- tenants ---------------------------------------------------------------------------------

-- A new weight (a live change, or replicas configured differently): the weight of the
-- tenants in line must follow, or the fair rate per unit weight drifts.
local function reweigh(t, weight)
  if t.st == ACTIVE then S.wsum = S.wsum - t.w + weight end
  t.w = weight
  t.dirty = true
end

-- A tenant's state in one field of P:T (K.tenant_hash), by digest (keys.py's table):
-- f|w|cap|cap_at|n|c0..|st|am|xp|q1|name, '' for a default (w 1, n 0, a cost 0, st IDLE,
-- am '', xp 0, no lone waiter) or unset (cap, cap_at): TENANT_FIELDS' order, then the
-- name (the rest of the text: a name may hold SEP). `am`, the member in P:active, is stored as its sequence
-- number alone (the member is that, SEP, the digest: put back on reading).
call.TENANT_PATTERN = '^'
for _ = 1, #TENANT_FIELDS do
  call.TENANT_PATTERN = call.TENANT_PATTERN .. '([^' .. SEP .. ']*)' .. SEP
end
call.TENANT_PATTERN = call.TENANT_PATTERN .. '(.*)$'
-- The fast paths' reading of a text (call.read_head), one match: f, w, the text from w's
-- SEP to cap_at's end (SEP cap SEP cap_at), cap, cap_at, the rest (from cap_at's end:
-- SEP n SEP c0 .. SEP st SEP am SEP xp SEP q1 SEP name), and in the rest st and xp.
do
  local value, skip = '([^' .. SEP .. ']*)', SEP .. '[^' .. SEP .. ']*'
  local pattern = '^' .. value .. SEP .. value .. '(' .. SEP .. value .. SEP .. value .. ')('
    .. skip
  for _ = 1, NRANK do pattern = pattern .. skip end
  call.FAST_PATTERN = pattern .. SEP .. value .. skip .. SEP .. value .. SEP .. '.*)$'
end
call.tparts = {}
-- A tenant's name: its text after the values (snapshot.lua). (The patterns are made when
-- the code is loaded, where a function library may use no standard library: no
-- string.rep. Those above and save_tenant know TENANT_FIELDS' order.)
call.NAME_PATTERN = '^'
for _ = 1, #TENANT_FIELDS do call.NAME_PATTERN = call.NAME_PATTERN .. '[^' .. SEP .. ']*' .. SEP end
call.NAME_PATTERN = call.NAME_PATTERN .. '(.*)$'

-- Writes to P:T, collected (M.tw: digest, text, ...; save_tenant, its only writer, appends
-- them): one HSET for all, at each work check (call.save_now) and at save
-- (call.flush_tenants). An HSET that adds a field may have made
-- the key: P:T gets its TTL then (born). Each HSET puts the anchor too
-- (TUNING.ENCODING_ANCHOR, a field longer than Redis's compact encodings allow, as the idle
-- list's ZADD does with its own), so that P:T is a hashtable from its first tenant and
-- reading or writing one costs the same with 10 tenants as with 500 whatever
-- hash-max-listpack-* say (a compact hash is searched and rewritten end to end on each HGET
-- and HSET).
function call.flush_tenants()
  local tw = M.tw
  if tw == nil then return end
  M.tw = nil
  if redis.call('HSET', K.tenant_hash, TUNING.ENCODING_ANCHOR, '', unpack(tw)) > 0 then
    born.tenant_hash = true
  end
end

-- A tenant's state, loaded once per call (made, in memory, if it has none); `weight`, if
-- given, is the caller's weight for it.
local function load_tenant(h, weight)
  local t = T[h]
  if t ~= nil then
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
    return t
  end
  if M.kept ~= nil then  -- (a Lua call only with a tenant kept: under churn none is)
    t = call.recall_tenant(h)
    if t ~= nil then
      if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
      return t
    end
  end
  -- Its field of P:T, one text taken apart by one pattern (call.TENANT_PATTERN): one
  -- command a tenant, and none for a key of its own (an EXISTS, a PEXPIRE, a DEL before).
  -- (A call of many acquires reading its tenants with one HMGET before the loop cost more
  -- than an HGET each: the pass over the operations it needs; docs/performance.md.)
  local text = redis.call('HGET', K.tenant_hash, h)
  local v = call.NONE
  if text then v = {string.match(text, call.TENANT_PATTERN)} end
  -- (Tables made whole: one filled field by field grows anew every few fields.)
  if v[1] == nil then  -- (none, or a text not of this layout: made anew)
    local w = weight or 1
    local spare = call.spare  -- (a table the last call's new tenants left: call.spare_made)
    if spare ~= nil and spare[1] ~= nil then
      local n = #spare
      t = spare[n]; spare[n] = nil
      -- (Every field the constructor below names, assigned anew: a spare table never has
      -- others, `deleted` included: call.spare_made.)
      t.h = h; t.dirty = true; t.loaded = call.NEW_LOADED; t.c = call.ZERO_COSTS; t.w = w
      t.f = S.v + 1 / w; t.cap = L.tenant_burst; t.cap_at = now; t.n = 0; t.st = IDLE
      t.am = ''; t.xp = 0; t.touched = nil; t.queue_made = nil; t.nm = nil; t.tx = nil
      -- (q1, q1r: not in the constructor below, its 16 slots (churn7), and cleared only if
      -- set: in Lua 5.1 a nil assigned to a field the table lacks adds it, and a full
      -- table is made anew for it: +8 % a call under churn when assigned always.)
      if t.q1 ~= nil then t.q1 = nil; t.q1r = nil end
    else
      t = {h = h, dirty = true, loaded = call.NEW_LOADED, c = call.ZERO_COSTS, w = w,
        f = S.v + 1 / w, cap = L.tenant_burst, cap_at = now, n = 0, st = IDLE, am = '', xp = 0,
        touched = nil, queue_made = nil, nm = nil, tx = nil}
    end
    fresh = true
    local made = M.made
    if made == nil then made = {}; M.made = made end
    made[#made + 1] = t
  else
    -- TENANT_FIELDS: f, w, cap, cap_at, n, the costs by rank, st, am, xp, q1.
    -- (Absent, w, n, the costs, st and am are their defaults: call.NEW_LOADED.)
    -- (tonum's remembered numbers looked up here first: most are, and a call costs. The
    -- costs by rank: their texts into a table of their size, made whole, then numbers.)
    local c = {unpack(v, 6, 5 + NRANK)}
    for rank = 1, NRANK do
      local x = c[rank]
      c[rank] = NUMBERS[x] or tonum(x) or 0
    end
    local i = NRANK + 6
    local x1, x2, x3, x4, x5 = v[1], v[2], v[3], v[4], v[5]
    local xi, xp = v[i], v[i + 2]
    local l = {f = NUMBERS[x1] or tonum(x1), w = NUMBERS[x2] or tonum(x2) or 1,
      cap = NUMBERS[x3] or tonum(x3), cap_at = NUMBERS[x4] or tonum(x4),
      n = NUMBERS[x5] or tonum(x5) or 0, c = {unpack(c)}, st = NUMBERS[xi] or tonum(xi) or IDLE,
      am = v[i + 1] or '', xp = NUMBERS[xp] or tonum(xp)}
    if l.am ~= '' then l.am = l.am .. SEP .. h end  -- (its sequence number stored)
    -- Its one waiter's rank (a digit) and id, if its queue is that field (enqueue).
    local q1, q1r = v[NRANK + 9], nil
    if q1 == '' then q1 = nil
    else
      q1r = string.sub(q1, 1, 1); q1r = NUMBERS[q1r] or tonum(q1r); q1 = string.sub(q1, 2)
    end
    t = {h = h, dirty = false, loaded = l, c = c, f = l.f, w = l.w, cap = l.cap,
      cap_at = l.cap_at, n = l.n, st = l.st, am = l.am, xp = l.xp or 0, touched = nil,
      queue_made = nil, deleted = nil, nm = v[NRANK + 10], tx = text, q1 = q1, q1r = q1r}
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  end
  T[h] = t
  return t
end

-- The weight the caller gives a tenant: a live weight (set with the CLI) wins. Asked for a
-- tenant already in T too (Scheduler reads limits.weight on every acquire): T also holds
-- tenants a call loaded without a weight (a cancel's, dispatch's) and, in a loaded library,
-- the tenants the last call kept (call.recall_line, call.recall_tenant); leaving those as
-- they were made a library's decisions differ from EVALSHA's after a change of weight.
local function live_weight(h, given)
  -- Whether any is set is known with the stamped reading of the live limits (asked once
  -- per reading: load_limits_stamped, which every caller's entry script has run).
  local memo = limits_memo
  if M.no_weights == nil and memo ~= nil and memo.lv ~= nil and memo.lv == S.lv then
    if memo.no_weights == nil then memo.no_weights = redis.call('EXISTS', K.weights) == 0 end
    M.no_weights = memo.no_weights
  end
  if M.no_weights then return given end
  local live = redis.call('HGET', K.weights, h)
  if live then return tonum(live) end
  return given
end

-- Its last use, for idle expiry; once per call is enough: `now` does not move within it.
-- A tenant with waiters is not on the idle list (core.lua's forget_idle).
local function touch(t)
  if not t.touched and t.n == 0 then
    -- (On the idle list: its ZADD's arguments made here, once a tenant a call (t.touched),
    -- the call's score put in their places by call.flush_idle.)
    local add = M.idle_adds
    if add == nil then M.idle_adds = {false, t.h}
    else
      local n = #add
      add[n + 1] = false; add[n + 2] = t.h
    end
    t.touched = true
  end
  t.dirty = true
end

call.member_format = '%0' .. MEMBER_SEQ_DIGITS .. 'd'  -- (made once)

-- Tenant t's member in P:active: the activation sequence number first, so ties in the
-- finish tag go in activation order.
local function active_member(t)
  -- Its weight is all the weight in line (activate added it): P:active was empty, so gone.
  if S.wsum <= t.w + EPS then born.active = true end
  return string.format(call.member_format, S.seq) .. SEP .. t.h
end

local function tenant_of_member(member)
  return load_tenant(string.sub(member, MEMBER_SEQ_DIGITS + #SEP + 1))
end

-- --- waiting requests --------------------------------------------------------------------------

local function queue_key(h) return K.prefix .. KEY.queue .. h end

-- A tenant's queue (Tenant.queue) is where its waiters' ids are, by rank, then in order of
-- arrival. A tenant with one waiter keeps it in its own field of P:T (t.q1, its id, and
-- t.q1r, its rank; stored as the rank's digit then the id, keys.TENANT_FIELDS' q1), written
-- with the tenant anyway: no key of its own, so no ZADD, PEXPIRE, ZREM and ZRANGE for a
-- tenant that queues one request at a time (a saturated budget's tenants; the rank's one
-- digit: keys.py's assertion on PRIORITIES). Its second waiter moves it to P:q:<h>, at
-- the score of its rank and sequence number 0 (it came before any other of its rank
-- there), with save_tenant giving that key its TTL (queue_made); the key is used while it
-- exists (Redis drops it with its last member), so the field is set only on a push to an
-- empty queue. enqueue runs before push counts the waiter (t.n), dequeue before unlink
-- does.
local function enqueue(t, r)
  if t.n == 0 then
    t.q1 = r.id; t.q1r = r.rank
    return
  end
  local q1 = t.q1
  if q1 == nil then
    redis.call('ZADD', queue_key(t.h), num(r.rank * RANK_SPAN + S.seq), r.id)
    return
  end
  local first = num(t.q1r * RANK_SPAN)
  t.q1 = nil; t.q1r = nil
  t.queue_made = true
  redis.call('ZADD', queue_key(t.h), first, q1, num(r.rank * RANK_SPAN + S.seq), r.id)
end

local function dequeue(t, r)
  if t.q1 ~= nil and t.q1 == r.id then
    t.q1 = nil; t.q1r = nil
    return
  end
  redis.call('ZREM', queue_key(t.h), r.id)
end

-- (deadline: num(r.deadline), made once by push for both keys.)
local function save_waiter(r, deadline)
  -- The first waiter (of all, or of its tenant) creates the queue's keys: give them TTLs.
  if S.waiting == 0 then born.waiters = true; born.deadlines = true; born.qlen = true end
  -- (One concatenation: a table of the fields made for table.concat cost twice that.)
  redis.call('HSET', K.waiters, r.id, r.h .. SEP .. num(r.cost) .. SEP .. num(r.rank) .. SEP
    .. r.proc .. SEP .. deadline .. SEP .. num(r.enq))
end

local function load_waiter(id)
  local raw = redis.call('HGET', K.waiters, id)
  if not raw then return nil end
  local h, cost, rank, p, deadline, enq = string.match(raw, WAITER_PATTERN)
  return {id = id, h = h, cost = tonum(cost), rank = tonum(rank), proc = p,
    deadline = tonumber(deadline), enq = tonumber(enq)}
end

-- Many waiters in one command (core.lua's leave): a list as long as `ids`, false for an
-- id not waiting; their deadline and enqueue time are not read.
local LEAVER_PATTERN = '^'  -- (the first four fields: no string.rep where this runs)
for _ = 1, 4 do LEAVER_PATTERN = LEAVER_PATTERN .. '([^' .. SEP .. ']*)' .. SEP end
function call.load_waiters(ids)
  local raws = redis.call('HMGET', K.waiters, unpack(ids))
  for i = 1, #ids do
    local raw = raws[i]
    if raw then
      local h, cost, rank, p = string.match(raw, LEAVER_PATTERN)
      raws[i] = {id = ids[i], h = h, cost = tonum(cost), rank = tonum(rank), proc = p}
    end
  end
  return raws
end

-- Tenant t's most urgent, oldest waiter (Tenant.head), or nil.
local function head_of(t)
  if t.q1 ~= nil then return load_waiter(t.q1) end  -- (its one waiter: enqueue)
  local ids = redis.call('ZRANGE', queue_key(t.h), '0', '0')
  if #ids == 0 then return nil end
  return load_waiter(ids[1])
end

-- Tenant t's lowest-priority, newest waiter (Tenant.last), or nil.
local function last_of(t)
  if t.q1 ~= nil then return load_waiter(t.q1) end
  local ids = redis.call('ZRANGE', queue_key(t.h), '-1', '-1')
  if #ids == 0 then return nil end
  return load_waiter(ids[1])
end
