-- ratelease.lua: a process's lease of rate tokens (THROTTLE_RATE_LEASE; the process side
-- is backends/redis/ratepool.py). In one call (core.lua's lease_tokens, twin of
-- Scheduler.lease_tokens): first the caller's admissions from its leases since its last
-- renewal are charged to their tenants (core.lua's charge_leased, as take would have
-- charged them one by one: their tags, the virtual clock, the window's cost), tenants made
-- as an acquire makes them; then the caller's last lease leaves the count of tokens out in
-- leases, its unspent tokens go back into the bucket and those it keeps stay counted;
-- then up to `wants` whole tokens leave the bucket for a new lease, only while nobody
-- waits for the budget and the budget is a rate alone. The tokens are out of the bucket
-- and counted out until the lease expires: the caller admits that many without asking,
-- nobody else can, and the bucket refills only to its burst less them (exact: the fleet
-- admits over any window what the plain bucket would).
-- It takes none (but still takes back) when the full call has work to do first: a budget
-- seen for the first time, an idle sweep due (Scheduler.lease_tokens alike: a charging
-- renewal's full call runs it first), a TTL refresh due in a call that does not save the
-- state whole (a charging renewal's full call makes it, and leases), a state without its
-- epoch or in its reclaim grace (fast.lua's quiet); the caller's next acquire goes as today.
-- A last lease of another epoch (a state since lost) is not counted here: nothing of it
-- goes back or is kept (it went with the state it came from), and its charges are dropped
-- (its tenants' tags went with that state too).
-- A call with charges of tenants all known and idle, with no TTL refresh, idle sweep or
-- window roll due, charges them leanly (fast.lua's call.lean_charges: each tenant's f, w,
-- st and xp read and its f written, the idle list, the state's hot fields as a call
-- without charges): the same tags, clock and window as the full call. Otherwise (a
-- tenant made or in line, a refresh or sweep due) it loads the state whole and writes it
-- as batch.lua does (tenants made, the idle list, the tenant bound, TTLs). Either charges
-- as many as a batch call's work bound allows (fast.lua's call.work_check: a tenant made
-- counts as one made by an acquire), and says how many: the caller sends the rest with
-- its next renewal.
--
-- KEYS[1]  P:s (routing only).
-- A caller that holds tokens after the call is in P:pl until its lease expires: told on its
-- grant list when someone starts waiting (store.lua's call.signal_waiting).
--
-- ARGV[1]  now override ("" in production).  ARGV[2] P.  ARGV[3] the process.
-- ARGV[4]  the caller's limits and policy (batch.lua's ARGV[4]).
-- ARGV[5]  the epoch of the caller's last lease ("" if none).
-- ARGV[6]  its unspent tokens given back (0 if none).  ARGV[7] the tokens wanted (0: none).
-- ARGV[8]  its unspent tokens kept.  ARGV[9] its generation (0: none).  ARGV[10] its expiry
--          (Redis time, as the last reply gave it).  ARGV[11] the tokens it counted out.
-- ARGV[12] the new lease's life T, in seconds.
-- ARGV[13] the number of charges; ARGV[14] the charges, one per LINE, each
--          digest|name|weight|cost|last (protocol.py's charges_arg).
-- Returns {taken, Redis's time (text), the state's epoch ("" if none), kept (the tokens
-- kept that still count: else they lapse), the new lease's generation (0: none), its
-- expiry (text), the charges taken (charged, or dropped as another state's; the rest are
-- to be sent again)}.

init(ARGV[2], ARGV[1], ARGV[3], false)
local charges = tonumber(ARGV[13]) or 0
if not load_hot_state(nil) then return {0, num(now), '', 0, 0, '0', charges} end  -- the next acquire
local charging = charges > 0 and S.ep == ARGV[5]
load_limits_stamped(ARGV[4], false)
S.la = S.la or 0; S.lk = S.lk or 0  -- as load_state
if S.tokens > L.burst then S.tokens = L.burst end  -- as load_state
local charged = charges
if charging then  -- (true: the full call's; 'lean': fast.lua's. No local more: EVAL's chunk has 200)
  charged = call.lean_charges(ARGV[14], charges)
  if charged ~= nil then charging = 'lean' end
end
if charging == true then
  L, POL, limits_memo = nil, nil, nil  -- (the full call's, as it takes them)
  load_state(ARGV[5], ARGV[4])
  load_limits_stamped(ARGV[4], true)
  S.la = S.la or 0; S.lk = S.lk or 0
  if S.tokens > L.burst then S.tokens = L.burst end
  refill()
  charged = 0
  local text, pos = ARGV[14], 1
  local started = nil
  if charges > TUNING.WORK_CHECK then started = call.start_us() end
  local check_at = TUNING.WORK_CHECK + 1
  for i = 1, charges do
    if started ~= nil and i == check_at then
      local over
      over, check_at = call.work_check(i, started)
      if over then break end
    end
    local h, name, weight, cost, last
    pos, h, name, weight, cost, last = call.next_charge(text, pos)
    if h == nil then return redis.error_reply('throttle_mw: malformed charge') end
    charge_leased(tenant(h, name, live_weight(h, tonum(weight))), tonum(cost), tonum(last))
    charged = i
  end
  forget_idle()
end
local gen = tonumber(ARGV[9]) or 0
if S.ep ~= ARGV[5] then gen = 0 end
local wants = tonumber(ARGV[7]) or 0
-- (A refresh due blocks only the calls that do not save whole: the full call's save makes
-- it, as Scheduler.lease_tokens, which has no TTLs, leases on. A sweep due blocks any: the
-- full call's ran above, unless SWEEP_BATCH stale tenants were left.)
if not ((charging == true or now < (S.xp or 0)) and now < (S.fi or 0) and S.ep ~= ''
    and now >= (S.rc or 0)) then
  wants = 0
end
local taken, kept, lease_gen, til = lease_tokens(gen, tonumber(ARGV[10]) or 0,
  tonumber(ARGV[11]) or 0, tonumber(ARGV[6]) or 0, tonumber(ARGV[8]) or 0, wants,
  tonumber(ARGV[12]) or 0)
if kept + taken > 0 then call.pool_held(til) end  -- (told when someone starts waiting)
if charging == true then
  save()
else
  local args, n = {}, 0
  if call.save_packed_anew(args, false) then n = 2 end
  if charging == 'lean' and S.lv ~= S0.lv then  -- (a stamp made: as save writes it)
    args[n + 1] = LIVE_STAMP; args[n + 2] = S.lv; n = n + 2
  end
  if n > 0 and call.gen0 ~= '' then  -- (a generation while someone waits: cleared, as save does)
    args[n + 1] = TUNING.GENERATION; args[n + 2] = ''; n = n + 2
    call.drop_kept()
  end
  if n > 0 then redis.call('HSET', K.state, unpack(args, 1, n)) end
  if charging == 'lean' and next(born) ~= nil then call.expire_keys(born); born = {} end  -- (the idle list made)
end
return {taken, num(now), S.ep, kept, lease_gen, num(til), charged}
