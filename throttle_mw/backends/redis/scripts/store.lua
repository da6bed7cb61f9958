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
local recent        -- per process: lease-less admissions of this call (remember)
local fresh         -- a tenant was created this call (forget_idle must check the bound)
local born          -- budget-wide keys (KEY names) this call may have created: save()
                    -- gives them their TTL (Redis drops a key that empties, TTL and all)
local more          -- dispatch stopped at DISPATCH_LIMIT: tick again at once
local held_back     -- in flight counted for leases not yet reclaimed (hold_back)
local loaded        -- P:s's packed numbers as loaded (a state_memo entry, or nil)
local limits_memo   -- the memo entry L and POL came from (load_limits), or nil

-- The fields of P:s: tokens, last refill, concurrency in flight, the virtual clock v, the
-- fair-rate window (window.lua), waiting requests and their cost, the active tenants'
-- weight, a sequence counter, the fleet's tick claim (tk_at, tk_by), waiting requests by
-- priority rank (n0..), the next TTL refresh (xp), the next idle-tenant sweep (fi),
-- whether the lease keys hold their anchor (la: anchor_leases), the state's epoch (ep)
-- and the end of its reclaim grace (rc): see "A state made anew" below; the live
-- processes as last counted (np) and when they are counted again (pc: batch.lua's
-- live_processes).
-- The layout: the numbers in PACKED share one field, PACKED_FIELD, their texts in that
-- order joined with SEP ('' for unset), read and written whole: Redis reads one field for
-- a fraction of what it takes for a dozen, and a loaded library remembers the last text
-- it read or wrote for a prefix with its numbers (state_memo), so a call parses none of
-- them unless another writer came in between. The fields others read keep a field each
-- (PLAIN: renew.lua reads the epoch, tests the counters). Only load_state, load_hot_state
-- and save know this layout.
local PACKED = {'tokens', 'ts', 'v', 'win_at', 'win_v0', 'win_cost', 'v_rate', 'thr',
  'meas_at', 'qcost', 'wsum', 'seq', 'tk_at', 'xp', 'fi', 'la', 'rc', 'np', 'pc'}
local PACKED_FIELD = 'nums'
local PLAIN = {'inflight', 'waiting', 'tk_by', 'ep'}
local RANK_COUNT = {}  -- 'n0'.. by rank + 1, and a tenant's 'c0'..: made once, not per call
local RANK_COST = {}
for rank = 0, NRANK - 1 do
  RANK_COUNT[rank + 1] = 'n' .. rank
  RANK_COST[rank + 1] = 'c' .. rank
  PLAIN[#PLAIN + 1] = RANK_COUNT[rank + 1]
end
local STRING_FIELDS = {tk_by = true, ep = true}
local EMPTY_TEXTS = {}  -- every packed number unset
for i = 1, #PACKED do EMPTY_TEXTS[i] = '' end
-- The fields load_hot_state reads (fast.lua's calls): the packed numbers, in flight,
-- waiting and the epoch.
local HOT_FIELDS = {PACKED_FIELD, 'inflight', 'waiting', 'ep'}

-- The fields of P:t:<h> (a tenant): finish tag, weight, cap bucket and its time, waiting
-- requests, their cost by rank (c0..), state (IDLE, ACTIVE, CAPPED), member in P:active,
-- next TTL refresh.
local TENANT_FIELDS = {'f', 'w', 'cap', 'cap_at', 'n'}
for rank = 0, NRANK - 1 do TENANT_FIELDS[#TENANT_FIELDS + 1] = 'c' .. rank end
TENANT_FIELDS[#TENANT_FIELDS + 1] = 'st'
TENANT_FIELDS[#TENANT_FIELDS + 1] = 'am'
TENANT_FIELDS[#TENANT_FIELDS + 1] = 'xp'

local now_text        -- num(now), made once per call (init) when first needed

local function num(x)
  if x == now then
    if now_text == nil then now_text = string.format(NUMBER_FORMAT, x) end
    return now_text
  end
  return string.format(NUMBER_FORMAT, x)
end

-- tonumber, remembered by the text: glibc's strtod takes thousands of instructions for the
-- 17 digits of NUMBER_FORMAT, and most numbers a call reads are the same text call after
-- call (limits, policy, most state fields). Lua interns strings: a lookup costs little.
local NUMBERS = {}
local NUMBERS_KEPT = 0

local function tonum(text)
  if not text then return nil end
  local value = NUMBERS[text]
  if value == nil then
    value = tonumber(text)
    if value == nil then return nil end
    if NUMBERS_KEPT >= NUMBERS_MAX then NUMBERS = {}; NUMBERS_KEPT = 0 end
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
local FIRST_FIELD = '^([^' .. SEP .. ']*)'
local WAITER_PATTERN = fields_pattern(#WAITER_FIELDS)
local ACQUIRE_PATTERN = fields_pattern(#ACQUIRE_FIELDS)
local RECLAIM_PATTERN = fields_pattern(4)

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
  if KEYS_CACHED >= KEYS_CACHE_MAX then KEYS_BY_PREFIX = {}; KEYS_CACHED = 0 end
  KEYS_BY_PREFIX[prefix] = names
  KEYS_CACHED = KEYS_CACHED + 1
  return names
end

local function init(prefix, now_override, process)
  S, S0, L, POL, T, out_events, recent, fresh = {}, {}, nil, nil, {}, {}, {}, false
  born = {}
  more = false
  held_back = 0
  loaded = nil
  limits_memo = nil
  K = key_names(prefix)
  proc = process
  if now_override ~= nil and now_override ~= '' then
    now = tonumber(now_override)
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / US_PER_S
  end
  now_text = nil
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
    return
  end
  local a, pos = {}, 1
  for i = 1, #LIMIT_ARGS do
    local stop = string.find(text, SEP, pos, true) or #text + 1
    a[LIMIT_ARGS[i]] = string.sub(text, pos, stop - 1)
    pos = stop + #SEP
  end
  parse_limits(a, cfg)
  limits_memo = {text = text, cfg = cfg, L = L, POL = POL}
  K.limits_memo = limits_memo
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
  if LINES_KEPT >= KEYS_CACHE_MAX then LINES = {}; LINES_KEPT = 0; return line end
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
    tk_at = v[13], xp = v[14], fi = v[15], la = v[16], rc = v[17], np = v[18], pc = v[19]}
end

local function load_plain(name, value)
  if STRING_FIELDS[name] then value = value or '' else value = tonum(value) end
  S[name] = value
  S0[name] = value
end

-- The state as fast.lua needs it (HOT_FIELDS; the ranks' counts are not loaded, and
-- save leaves them as they are); false if there is none.
local function load_hot_state()
  local vals = redis.call('HMGET', K.state, unpack(HOT_FIELDS))
  if not vals[1] then return false end
  load_packed(vals[1])
  S.inflight = tonum(vals[2]); S.waiting = tonum(vals[3]); S.ep = vals[4] or ''
  S0.inflight = S.inflight; S0.waiting = S.waiting; S0.ep = S.ep
  return true
end

-- The budget's state; a budget seen for the first time starts full. `known`: the epoch the
-- caller knew ("" or nil: none), see "A state made anew" below.
local function load_state(known)
  local vals = redis.call('HMGET', K.state, PACKED_FIELD, unpack(PLAIN))
  load_packed(vals[1])
  for i, name in ipairs(PLAIN) do load_plain(name, vals[i + 1]) end
  if S.ts == nil then
    S.tokens = L.burst; S.ts = now; S.inflight = 0; S.v = 0
    S.win_at = now; S.win_v0 = 0; S.win_cost = 0; S.v_rate = 0; S.thr = 0
    S.meas_at = -math.huge; S.waiting = 0; S.qcost = 0; S.wsum = 0; S.seq = 0; S.tk_at = 0
    S.ep = ''
    S.rc = 0
    -- A caller that knew another epoch: this state replaces one that was lost, whose leases
    -- are still held. Admit nothing new until they are reclaimed.
    if known ~= nil and known ~= '' and L.concurrency ~= nil then S.rc = now + RECLAIM_GRACE end
  end
  for rank = 1, NRANK do S[RANK_COUNT[rank]] = S[RANK_COUNT[rank]] or 0 end
  S.xp = S.xp or 0
  S.fi = S.fi or 0
  S.la = S.la or 0
  S.rc = S.rc or 0
  if S.ep == '' then S.ep = num(now) .. '/' .. proc end  -- new (or older than epochs)
  if S.tokens > L.burst then S.tokens = L.burst end
end

-- A TTL in milliseconds by its kind in KEY_TTL (keys.py, "TTL"): 'state' (T), 'tenant'
-- (idle+T) or 'live'.
local function ttl_ms(kind)
  if kind == 'live' then return math.floor(POL.live_ttl * MS_PER_S) end
  if kind == 'tenant' then return math.floor((POL.idle + POL.ttl) * MS_PER_S) end
  return math.floor(POL.ttl * MS_PER_S)
end

local function save_tenant(t)
  local fields = {}
  local function put(name, value)
    if value ~= t.loaded[name] then
      fields[#fields + 1] = name
      if type(value) == 'number' then fields[#fields + 1] = num(value) else fields[#fields + 1] = value end
    end
  end
  put('f', t.f); put('w', t.w); put('cap', t.cap); put('cap_at', t.cap_at); put('n', t.n)
  for rank = 1, NRANK do put(RANK_COST[rank], t.c[rank]) end
  put('st', t.st); put('am', t.am)
  -- Capped this call (or again, after it was back in line): P:capped may be new.
  if t.st == CAPPED and (t.loaded.st ~= CAPPED or t.am ~= t.loaded.am) then born.capped = true end
  if now >= t.xp then
    t.xp = now + POL.idle / TTL_REFRESHES
    put('xp', t.xp)
    local ttl = ttl_ms('tenant')
    redis.call('PEXPIRE', t.key, ttl)
    if t.n > 0 then redis.call('PEXPIRE', K.prefix .. KEY.queue .. t.h, ttl) end
  end
  if #fields > 0 then redis.call('HSET', t.key, unpack(fields)) end
end

-- Only what changed, and key TTLs only when due (every budget-wide key, a quarter of T
-- apart) or for keys this call may have created: this runs on every call.
local function save()
  local args = {}
  S.inflight = S.inflight - held_back
  held_back = 0
  local refresh = now >= S.xp
  if refresh then S.xp = now + POL.ttl / TTL_REFRESHES end
  -- The packed numbers (in PACKED's order): their text anew if one changed, only the
  -- changed ones formatted.
  local vals = {S.tokens, S.ts, S.v, S.win_at, S.win_v0, S.win_cost, S.v_rate, S.thr,
    S.meas_at, S.qcost, S.wsum, S.seq, S.tk_at, S.xp, S.fi, S.la, S.rc, S.np, S.pc}
  local old, texts = {}, nil
  if loaded ~= nil then old = loaded.vals end
  for i = 1, #PACKED do
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
  for i = 1, #PLAIN do
    local name = PLAIN[i]
    local value = S[name]
    if value ~= S0[name] then
      args[#args + 1] = name
      if type(value) == 'number' then args[#args + 1] = num(value) else args[#args + 1] = value end
    end
  end
  if #args > 0 then redis.call('HSET', K.state, unpack(args)) end
  for _, t in pairs(T) do
    if t.dirty and not t.deleted then save_tenant(t) end
  end
  local expiring = born
  if refresh then expiring = KEY_TTL end
  for name in pairs(expiring) do redis.call('PEXPIRE', K[name], ttl_ms(KEY_TTL[name])) end
  born = {}
  -- A process's recent admissions: trimmed back to RECENT_KEPT once RECENT_SLACK more
  -- came in (at least the last RECENT_KEPT are kept), their TTL set when the list is made
  -- and pushed out a quarter of T apart (the loaded library keeps when, by process: with
  -- EVAL, or once the library is loaded anew, on the next call).
  local due = K.recent_due
  if due == nil then due = {}; K.recent_due = due end
  for p, ids in pairs(recent) do
    local key = K.prefix .. KEY.recent .. p
    local size = redis.call('LPUSH', key, unpack(ids))
    if size > RECENT_KEPT + RECENT_SLACK then redis.call('LTRIM', key, 0, RECENT_KEPT - 1) end
    local at = due[p]
    if size == #ids or at == nil or now >= at or now < at - POL.ttl then
      redis.call('PEXPIRE', key, ttl_ms('state'))
      due[p] = now + POL.ttl / TTL_REFRESHES
    end
  end
  for p, msgs in pairs(out_events) do
    local key = K.prefix .. KEY.grants .. p
    redis.call('RPUSH', key, unpack(msgs))
    redis.call('PEXPIRE', key, ttl_ms('state'))
  end
end

-- --- events and leases ---------------------------------------------------------------------

local function emit(p, ...)
  local list = out_events[p]
  if list == nil then list = {}; out_events[p] = list end
  list[#list + 1] = table.concat({...}, SEP)
end

-- A grant (waited seconds, lease flag) or an eviction (reason, seconds) for request `id`.
local function emit_granted(p, id, waited, lease)
  local flag = '0'
  if lease then flag = '1' end
  emit(p, MESSAGE.granted, id, num(waited), flag)
end

local function emit_evicted(p, id, reason, wait)
  emit(p, MESSAGE.evicted, id, reason, num(wait))
end

-- P:leases and P:lc in their big encodings (skiplist, hash table) while many leases are in
-- flight: in Redis's compact encoding (listpack, up to 128 entries by default) every ZADD,
-- ZREM and HDEL scans the whole collection, so a lease would cost more the more are in
-- flight. One anchor member longer than any compact entry may be (zset-/hash-max-listpack-
-- value, 64 bytes by default) converts them for good, whatever the server's settings below
-- that length; it is set once LEASE_ANCHOR_AT are in flight (fewer are cheap either way)
-- and taken out with the last lease (a budget at rest keeps no lease keys). Score +inf:
-- never expired, never first. S.la: the anchor is set.
local function anchor_leases()
  if S.la == 1 or S.inflight < LEASE_ANCHOR_AT then return end
  redis.call('ZADD', K.leases, 'inf', LEASE_ANCHOR)
  redis.call('HSET', K.lease_costs, LEASE_ANCHOR, '0')
  S.la = 1
end

local function unanchor_leases()
  if S.la ~= 1 or S.inflight > 0 then return end
  redis.call('ZREM', K.leases, LEASE_ANCHOR)
  redis.call('HDEL', K.lease_costs, LEASE_ANCHOR)
  S.la = 0
end

local function add_lease(id, cost, p)
  if S.inflight <= 0 then born.leases = true; born.lease_costs = true end  -- the first lease
  S.inflight = S.inflight + cost
  anchor_leases()
  redis.call('ZADD', K.leases, num(now + POL.lease_ttl), id)
  redis.call('HSET', K.lease_costs, id, cost .. SEP .. p)
end

-- Gives a lease's concurrency back; false if there was none.
local function drop_lease(id)
  local raw = redis.call('HGET', K.lease_costs, id)
  if not raw then return false end
  S.inflight = math.max(0, S.inflight - tonum(string.match(raw, FIRST_FIELD)))
  redis.call('HDEL', K.lease_costs, id)
  redis.call('ZREM', K.leases, id)
  unanchor_leases()
  return true
end

-- Lease-less admissions: kept briefly so a retried acquire is answered, not redone.
-- Collected here and written once per call by save().
local function remember(p, id)
  local ids = recent[p]
  if ids == nil then ids = {}; recent[p] = ids end
  ids[#ids + 1] = id
end

-- Was request `id` admitted already (by this process)? true: with a lease; false: without
-- one (recently); nil: not that anyone remembers.
local function admitted(id)
  if redis.call('HEXISTS', K.lease_costs, id) == 1 then return true end
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
  if redis.call('HEXISTS', K.lease_costs, id) == 1 then return false end
  cost = math.max(1, math.min(cost, L.concurrency))
  if old == '' and S.inflight - held_back + cost > L.concurrency then return false end
  born.leases = true; born.lease_costs = true
  S.inflight = S.inflight + cost
  anchor_leases()
  redis.call('ZADD', K.leases, num(now + POL.lease_ttl), id)
  redis.call('HSET', K.lease_costs, id, cost .. SEP .. proc)
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

-- A tenant's state, loaded once per call (made, in memory, if it has none); `weight`, if
-- given, is the caller's weight for it.
local function load_tenant(h, weight)
  local t = T[h]
  if t ~= nil then
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
    return t
  end
  local key = K.prefix .. KEY.tenant .. h
  local v = redis.call('HMGET', key, unpack(TENANT_FIELDS))
  t = {h = h, key = key, dirty = false, loaded = {}, c = {}}
  if v[1] == false then
    local w = weight or 1
    t.w = w; t.f = S.v + 1 / w; t.cap = L.tenant_burst; t.cap_at = now; t.n = 0
    for rank = 1, NRANK do t.c[rank] = 0 end
    t.st = IDLE; t.am = ''; t.xp = 0; t.dirty = true; t.new = true
    fresh = true
  else
    local l = t.loaded
    for i, name in ipairs(TENANT_FIELDS) do
      if name == 'am' then l[name] = v[i] or '' else l[name] = tonum(v[i]) end
    end
    t.f = l.f; t.w = l.w; t.cap = l.cap; t.cap_at = l.cap_at; t.n = l.n
    for rank = 1, NRANK do t.c[rank] = l[RANK_COST[rank]] end
    t.st = l.st; t.am = l.am; t.xp = l.xp or 0
    if weight ~= nil and weight ~= t.w then reweigh(t, weight) end
  end
  T[h] = t
  return t
end

-- The weight for a tenant not yet loaded this call: a live weight (set with the CLI) wins.
local function live_weight(h, given)
  if T[h] ~= nil then return nil end  -- already loaded this call, with its weight
  local live = redis.call('HGET', K.weights, h)
  if live then return tonum(live) end
  return given
end

-- Its last use, for idle expiry; once per call is enough: `now` does not move within it.
-- A tenant with waiters is not on the idle list (core.lua's forget_idle).
local function touch(t)
  if not t.touched and t.n == 0 then
    if redis.call('ZADD', K.tenants, num(now), t.h) == 1 then born.tenants = true end
    t.touched = true
  end
  t.dirty = true
end

-- Tenant t's member in P:active: the activation sequence number first, so ties in the
-- finish tag go in activation order.
local function active_member(t)
  -- Its weight is all the weight in line (activate added it): P:active was empty, so gone.
  if S.wsum <= t.w + EPS then born.active = true end
  return string.format('%0' .. MEMBER_SEQ_DIGITS .. 'd', S.seq) .. SEP .. t.h
end

local function tenant_of_member(member)
  return load_tenant(string.sub(member, MEMBER_SEQ_DIGITS + #SEP + 1))
end

-- --- waiting requests --------------------------------------------------------------------------

local function queue_key(h) return K.prefix .. KEY.queue .. h end

local function save_waiter(r)
  -- The first waiter (of all, or of its tenant) creates the queue's keys: give them TTLs.
  if S.waiting == 0 then born.waiters = true; born.deadlines = true; born.qlen = true end
  if T[r.h] ~= nil and T[r.h].n == 0 then T[r.h].xp = 0 end  -- save_tenant refreshes both
  redis.call('HSET', K.waiters, r.id, table.concat({r.h, r.cost, r.rank, r.proc, num(r.deadline),
    num(r.enq)}, SEP))
end

local function load_waiter(id)
  local raw = redis.call('HGET', K.waiters, id)
  if not raw then return nil end
  local h, cost, rank, p, deadline, enq = string.match(raw, WAITER_PATTERN)
  return {id = id, h = h, cost = tonum(cost), rank = tonum(rank), proc = p,
    deadline = tonumber(deadline), enq = tonumber(enq)}
end

-- Tenant t's most urgent, oldest waiter (Tenant.head), or nil.
local function head_of(t)
  local ids = redis.call('ZRANGE', queue_key(t.h), 0, 0)
  if #ids == 0 then return nil end
  return load_waiter(ids[1])
end

-- Tenant t's lowest-priority, newest waiter (Tenant.last), or nil.
local function last_of(t)
  local ids = redis.call('ZRANGE', queue_key(t.h), -1, -1)
  if #ids == 0 then return nil end
  return load_waiter(ids[1])
end
