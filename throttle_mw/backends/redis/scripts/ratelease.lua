-- ratelease.lua: a process's lease of rate tokens (THROTTLE_RATE_LEASE; the process side
-- is backends/redis/ratepool.py). In one call: the unspent tokens of the caller's last
-- lease go back into the bucket (at most its burst), then up to `wants` whole tokens
-- leave it for a new lease (core.lua's lease_tokens, twin of Scheduler.lease_tokens),
-- only while nobody waits for the budget and the budget is a rate alone. The tokens are
-- out of the bucket: the caller admits that many without asking, and nobody else can.
-- It takes none (but still takes back) when the full call has work to do first: a budget
-- seen for the first time, a TTL refresh or an idle sweep due, a state without its epoch
-- or in its reclaim grace (fast.lua's quiet); the caller's next acquire goes as today.
-- Unspent tokens of a lease taken in another epoch (a state since lost) are not taken
-- back: they went with the state they came from.
--
-- KEYS[1]  P:s (routing only).
-- ARGV[1]  now override ("" in production).  ARGV[2] P.  ARGV[3] the process.
-- ARGV[4]  the caller's limits and policy (batch.lua's ARGV[4]).
-- ARGV[5]  the epoch of the caller's last lease ("" if none).
-- ARGV[6]  its unspent tokens (0 if none).  ARGV[7] the tokens wanted (0: only give back).
-- Returns {taken (integer), Redis's time (seconds, text), the state's epoch ("" if none)}.

init(ARGV[2], ARGV[1], ARGV[3], false)
if not load_hot_state(nil) then return {0, num(now), ''} end  -- the next acquire makes it
load_limits_stamped(ARGV[4], false)
S.la = S.la or 0; S.lk = S.lk or 0  -- as load_state
if S.tokens > L.burst then S.tokens = L.burst end  -- as load_state
local returned = tonumber(ARGV[6]) or 0
if S.ep ~= ARGV[5] then returned = 0 end
local wants = tonumber(ARGV[7]) or 0
if not (now < (S.xp or 0) and now < (S.fi or 0) and S.ep ~= '' and now >= (S.rc or 0)) then
  wants = 0
end
local taken = lease_tokens(returned, wants)
local args = {}
if call.save_packed_anew(args, false) then redis.call('HSET', K.state, args[1], args[2]) end
return {taken, num(now), S.ep}
