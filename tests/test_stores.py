"""What keeps the Lua scripts portable across Redis-compatible stores.

The suites themselves run on Redis 7 (the default), Redis 6.2 and Valkey 9 in
CI (.ci/run, `TEST_REDIS_SERVER`); this checks the one thing they
cannot: the flag only Dragonfly reads.
"""

from __future__ import annotations

import pytest

from throttle_mw.backends.redis.scripts import ENTRY_SCRIPTS, source


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_every_script_lets_dragonfly_reach_the_keys_it_builds(name: str) -> None:
    # The scripts build key names inside Lua from one declared key. Dragonfly refuses
    # undeclared keys unless the script's first line says otherwise; Redis and Valkey
    # read that line as a comment.
    first_line = source(name).splitlines()[0]
    assert first_line == "--!df flags=allow-undeclared-keys"
