"""store.lua's texts of Redis's clock (call.time_text): the same as NUMBER_FORMAT's.

A time read from TIME (and that time plus whole seconds) is written from TIME's own
digits instead of formatted with %.17g; these tests run store.lua's num() in a real
redis-server (EVAL) on times of every kind and compare each text with
string.format(NUMBER_FORMAT, x), the text the scripts wrote before.
"""

from __future__ import annotations

import redis

from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import scripts

#: After store.lua, in the same chunk (its locals `now`, `now_text`, num in scope): num()
#: of `now` as start() makes it from TIME's texts, and of now plus a few offsets, each
#: against string.format. Returns {mismatches (x, ours, expected)..., made, tried}.
_CHECK = """
local bad, made, tried = {}, 0, 0
local function check(s, us)
  local texts = {string.format('%d', s), string.format('%d', us)}
  now = s + us / US_PER_S
  call.time_s = s; call.time_us = us; call.time_texts = texts
  call.time_dec = nil; now_text = nil
  for _, x in ipairs({now, now + 1, now + 30, now + 86400, now + 2.5, now - 7}) do
    call.last_number = false
    local ours, expected = num(x), string.format(NUMBER_FORMAT, x)
    tried = tried + 1
    if call.time_dec then made = made + 1 end
    if ours ~= expected and #bad < 30 then
      bad[#bad + 1] = string.format('%.17g', x) .. ' ' .. ours .. ' ' .. expected
    end
  end
end
local edges = {0, 1, 9, 10, 99, 100, 999, 1000, 99999, 100000, 500000, 999990, 999999}
for _, s in ipairs({1073741824, 1764953857, 2147483646, 2147483647, 1000000000, 999999999}) do
  for _, us in ipairs(edges) do check(s, us) end
end
math.randomseed(tonumber(ARGV[1]))
for _ = 1, tonumber(ARGV[2]) do
  check(math.random(1073741824, 2147483647), math.random(0, 999999))
  check(math.random(1700000000, 1800000000), math.random(0, 999999))
end
bad[#bad + 1] = tostring(made)
bad[#bad + 1] = tostring(tried)
return bad
"""


def _run(client: redis.Redis, seed: int, rounds: int) -> tuple[list[str], int, int]:
    text = "\n".join([scripts.constants_lua(), scripts._part("store"), _CHECK])
    found = client.eval(text, 0, seed, rounds)
    out = [x.decode() if isinstance(x, bytes) else str(x) for x in found]
    return out[:-2], int(out[-2]), int(out[-1])


def test_times_of_redis_clock_are_written_as_number_format_writes_them(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    try:
        for seed in (1, 2, 3):
            bad, made, tried = _run(client, seed, 20_000)
            assert bad == []
            # (Not a test of the fallback alone: most times are made from TIME's digits.)
            assert made > 0.8 * tried
    finally:
        client.close()
