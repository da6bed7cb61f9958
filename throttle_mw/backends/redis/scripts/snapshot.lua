-- snapshot.lua: the live state of a budget, for metrics and the live-limits tool.
--
-- Read-only: it refills the token count in the answer without saving it.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  now override ("" in production).  ARGV[2] P.
-- ARGV[3..7] caller's rate, burst, concurrency, tenant_rate, tenant_burst ("" = unset;
--            a concurrency of AUTO: learned).
-- ARGV[8]  how many of the busiest tenants to list.
-- Returns a JSON object: tokens, in_flight, waiting, queued_by_priority, tenants,
-- fair_rate, processes, limits (in force) and busiest [{tenant, queued}].

init(ARGV[2], ARGV[1], '')
load_limits({rate = ARGV[3], burst = ARGV[4], concurrency = ARGV[5], tenant_rate = ARGV[6],
  tenant_burst = ARGV[7]})
load_state()
refill()
local busiest = {}
local top = redis.call('ZREVRANGE', K.qlen, 0, tonumber(ARGV[8]) - 1, 'WITHSCORES')
for i = 1, #top, 2 do
  -- (Its name: the end of its text in P:T, store.lua's call.NAME_PATTERN; the digest if
  -- it has none.)
  local text = redis.call('HGET', K.tenant_hash, top[i])
  local name = text and string.match(text, call.NAME_PATTERN)
  if name == nil or name == '' then name = top[i] end
  busiest[#busiest + 1] = {tenant = name, queued = math.floor(tonumber(top[i + 1]) / PUSH_SPAN)}
end
local tokens = cjson.null
if L.rate ~= nil then tokens = S.tokens end
local limits = {rate = L.rate or cjson.null, burst = L.burst,
  concurrency = L.concurrency or cjson.null, tenant_rate = L.tenant_rate or cjson.null,
  tenant_burst = L.tenant_burst, learned = L.learned}
local queued = {}
for rank = 0, NRANK - 1 do queued[PRIORITIES[rank + 1]] = S['n' .. rank] end
return cjson.encode({tokens = tokens, in_flight = S.inflight, waiting = S.waiting,
  queued_by_priority = queued,
  -- idle (without the idle list's anchor, keys.IDLE_ANCHOR) + waiting
  tenants = redis.call('ZCOUNT', K.tenants, '-inf', '(+inf') + redis.call('ZCARD', K.qlen),
  fair_rate = S.v_rate,
  processes = redis.call('ZCOUNT', K.procs, num(now), '+inf'),
  limits = limits, busiest = busiest})
