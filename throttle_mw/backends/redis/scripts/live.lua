-- live.lua: a live change of the limits (throttle-mw set and reset: admin.py's Budget),
-- made at one moment as Scheduler.set_limits makes it: the token bucket is first brought
-- up to now at the limits in force before the change (core.lua's refill), then P:cfg
-- changes and the bucket holds at most the new burst. So tokens earned before a change
-- are earned at the old rate and after it at the new one, however many changes come
-- between two calls. The state's live stamp is replaced, so every process reads the live
-- limits anew; the new stamp keeps the callers' own rate and burst (store.lua,
-- load_limits_stamped): the limits in force where P:cfg sets none. The state's TTL refresh
-- is made due, so the next call sets the keys' TTLs by the new limits (a longer keep), and
-- a change of a tenant cap keeps the tenants' keys until then.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  now override ("" in production).  ARGV[2] P.  ARGV[3] a nonce (the new stamp's
--          second word: no two stamps are alike).  ARGV[4] the live TTL in ms.
-- ARGV[5]  "1": P:cfg is deleted whole first (a reset of everything); else "".
-- ARGV[6..] fields of P:cfg and their new values, in pairs; "" deletes the field.
-- Returns 1.

init(ARGV[2], ARGV[1], ARGV[3])
local state = redis.call('HMGET', K.state, PACKED_FIELD, LIVE_STAMP)
local rate, burst = call.given_limits(state[2] or '')
local given = {rate = rate or '', burst = burst or ''}
local before = redis.call('HMGET', K.cfg, unpack(LIVE_FIELDS))
-- The limits before are known from the stamp, or from P:cfg alone if it sets both. (Not
-- known: the change meets the bucket at its next call, at the new limits.)
local known = state[1] and (burst ~= nil or (before[1] and before[2]))
if known then
  parse_limits(given, before)
  load_packed(state[1])
  if S.tokens > L.burst then S.tokens = L.burst end  -- (as load_state)
  refill()
end

if ARGV[5] == '1' then redis.call('DEL', K.cfg) end
local set, gone = {}, {}
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    gone[#gone + 1] = ARGV[i]
  else
    set[#set + 1] = ARGV[i]; set[#set + 1] = ARGV[i + 1]
  end
end
if #gone > 0 then redis.call('HDEL', K.cfg, unpack(gone)) end
if #set > 0 then
  redis.call('HSET', K.cfg, unpack(set))
  -- Never shorter than the state's TTL (store.lua, ttl_ms): not to lapse under the bucket.
  local ttl = tonumber(ARGV[4])
  local left = redis.call('PTTL', K.state)
  if left > ttl then ttl = left end
  redis.call('PEXPIRE', K.cfg, ttl)
end

-- A change of a tenant cap (or a reset) may keep a tenant longer (a slower or deeper cap:
-- call.kept_s); with no call after it, nothing would set the tenants' keys (kept+T) by the
-- new keep, and they could lapse with a spent cap (its tenant back with a full one). So
-- they are kept at least as long as the live limits that set it, until the next call,
-- whose TTL refresh (made due below) sets them by the new keep, shorter again.
local cap = ARGV[5] == '1'
for i = 6, #ARGV, 2 do
  if ARGV[i] == 'tenant_rate' or ARGV[i] == 'tenant_burst' then cap = true end
end
if cap then
  local ttl = tonumber(ARGV[4])
  for name, kind in pairs(KEY_TTL) do
    if kind == 'tenant' then
      local left = redis.call('PTTL', K[name])
      if left >= 0 and left < ttl then redis.call('PEXPIRE', K[name], ttl) end
    end
  end
end

if known then
  local after = redis.call('HMGET', K.cfg, unpack(LIVE_FIELDS))
  if burst ~= nil or after[2] then  -- (the new burst known: else load_state clamps)
    parse_limits(given, after)
    if S.tokens > L.burst then S.tokens = L.burst end
  end
end
if state[1] then
  if not known then load_packed(state[1]) end
  -- A TTL refresh due (xp 0: fast.lua's quiet gives up): the next call, a full one, sets
  -- every key's TTL by the limits now in force, not up to T/4 later. A change that keeps a
  -- capped tenant longer (a slower or deeper cap: call.kept_s) so reaches the tenants'
  -- keys (kept+T) at once, not after they lapsed with the tenant's spent cap.
  S.xp = 0
  local args = {}
  if call.save_packed_anew(args, false) then redis.call('HSET', K.state, args[1], args[2]) end
end
-- (With the live stamp, the state's generation, keys.GENERATION: a full call's kept state
-- holds neither.)
call.drop_kept()
if state[1] and burst ~= nil then
  redis.call('HSET', K.state, LIVE_STAMP, num(now) .. ' ' .. proc .. SEP .. rate .. SEP .. burst,
    TUNING.GENERATION, '')
else
  redis.call('HDEL', K.state, LIVE_STAMP, TUNING.GENERATION)  -- (read anew by the next call)
end
return 1
