"""Kept concurrency slots (``THROTTLE_KEEP_SLOTS``): the pool's rules on a fake clock.

The pool (slotpool.py) has no clock and no I/O: each test gives it the times and the
replies it would hear, and checks exactly which lease ids it hands out, keeps and gives
back.
"""

from __future__ import annotations

import pytest

from throttle_mw.backends.redis.slotpool import KEPT_SHARE, SlotPool
from throttle_mw.settings import DEFAULT_KEEP_SLOTS_S, ConfigError, Settings

T = 1.0


def quiet_pool(at: float = 0.0, busy: int = 2) -> SlotPool:
    """A pool that heard "nobody waits" at `at`, with `busy` slots in use then."""
    pool = SlotPool(T)
    pool.heard(at, True)
    pool.busy(at, busy)
    return pool


def keep(
    pool: SlotPool,
    now: float,
    lease: str,
    cost: int,
    born: float,
    processes: int,
    concurrency: int | None,
) -> bool:
    """A lease Redis admitted at `born` (its busy slots counted by `busy` apart) finishes
    at `now`, with `processes` in the fleet and a limit of `concurrency`: kept or not.
    (`take`'s slots go back with ``pool.keep`` itself.)"""
    pool.share(processes, concurrency)
    pool.admitted(born, lease, cost, born, len(pool))
    return pool.keep(now, lease)


def take(pool: SlotPool, now: float, cost: int, queue_empty: bool) -> str | None:
    """A kept slot for a new request (the leases: the kept ones and the one taken)."""
    return pool.take(now, cost, queue_empty, len(pool))


def test_a_finished_slot_is_kept_and_taken_by_the_next_request_of_its_cost() -> None:
    pool = quiet_pool()
    assert keep(pool, 0.1, "a", 1, 0.0, processes=1, concurrency=10)
    assert "a" in pool
    assert len(pool) == 1
    assert take(pool, 0.2, 2, queue_empty=True) is None  # another cost: to Redis
    assert take(pool, 0.2, 1, queue_empty=True) == "a"
    assert len(pool) == 0
    assert pool.local_admissions == 1
    assert pool.kept == 1
    assert take(pool, 0.3, 1, queue_empty=True) is None  # none left


def test_nothing_is_taken_while_this_process_has_requests_waiting() -> None:
    pool = quiet_pool()
    assert keep(pool, 0.1, "a", 1, 0.0, 1, 10)
    assert take(pool, 0.2, 1, queue_empty=False) is None
    assert take(pool, 0.2, 1, queue_empty=True) == "a"


def test_a_slot_is_kept_until_t_after_redis_admitted_it_however_often_reused() -> None:
    pool = quiet_pool()
    pool.heard(0.9, True)
    assert keep(pool, 0.5, "a", 1, 0.0, 1, 10)
    assert pool.next_at == T
    assert take(pool, 0.95, 1, True) == "a"
    assert pool.keep(0.99, "a")  # (taken, it runs on: kept again)
    assert not keep(pool, 1.0, "b", 1, 0.0, 1, 10)  # T old at its release: to Redis
    assert take(pool, 1.0, 1, True) is None  # aged in the pool: not handed out
    assert pool.aged(0.99) == []
    assert pool.aged(1.0) == ["a"]
    assert len(pool) == 0
    assert pool.returned == 1
    assert pool.next_at is None


def test_a_reply_that_someone_waits_gives_every_kept_slot_back() -> None:
    pool = quiet_pool(busy=3)
    for lease in ("a", "b", "c"):
        assert keep(pool, 0.1, lease, 1, 0.0, 1, 10)
    assert pool.heard(0.2, True) == []
    assert pool.heard(0.3, False) == ["a", "b", "c"]
    # Until a reply says nobody waits again: nothing kept, nothing taken.
    assert not keep(pool, 0.4, "d", 1, 0.3, 1, 10)
    pool.heard(0.5, True)
    assert keep(pool, 0.6, "d", 1, 0.3, 1, 10)
    assert take(pool, 0.7, 1, True) == "d"


def test_nothing_is_kept_or_taken_once_the_last_quiet_reply_is_t_old() -> None:
    pool = quiet_pool(at=0.0)
    assert keep(pool, 0.5, "a", 1, 0.5, 1, 10)
    assert take(pool, T, 1, True) is None  # heard nothing since 0.0
    assert not keep(pool, T, "b", 1, 0.9, 1, 10)
    pool.heard(T, True)
    assert take(pool, T, 1, True) == "a"


def test_the_pool_holds_at_most_the_recent_peak_of_busy_slots() -> None:
    pool = quiet_pool(busy=2)
    pool.share(1, 100)
    assert pool.cap == 2
    assert keep(pool, 0.1, "a", 1, 0.0, 1, 100)
    assert keep(pool, 0.1, "b", 1, 0.0, 1, 100)
    assert not keep(pool, 0.1, "c", 1, 0.0, 1, 100)
    # The peak is remembered over one to two T: a new window, then one more.
    pool.busy(T, 1)
    assert pool.cap == 2
    pool.busy(2 * T, 1)
    assert pool.cap == 1
    # A window that ended long ago counts for nothing.
    pool.busy(5 * T, 0)
    assert pool.cap == 0


def test_the_pool_holds_at_most_its_share_of_the_limit() -> None:
    pool = quiet_pool(busy=50)
    assert pool.cap == 0  # no share told yet: none kept
    pool.share(processes=4, concurrency=16)
    assert pool.cap == int(KEPT_SHARE * 16 / 4) == 2
    pool.share(processes=10, concurrency=16)
    assert pool.cap == 0  # a share below one slot: none kept
    pool.share(processes=1, concurrency=None)
    assert pool.cap == 0  # no concurrency budget (now)
    assert keep(pool, 0.1, "a", 1, 0.0, 4, 16)
    assert keep(pool, 0.1, "b", 1, 0.0, 4, 16)
    assert not keep(pool, 0.1, "c", 1, 0.0, 4, 16)
    assert not keep(pool, 0.1, "c", 1, 0.0, 10, 16)


def test_a_fleet_keeps_at_most_half_the_limit_idle() -> None:
    """Processes that each keep as much as they may hold KEPT_SHARE of the limit at most."""
    limit, processes = 12, 4
    pools = [quiet_pool(busy=limit) for _ in range(processes)]
    for p, pool in enumerate(pools):
        for n in range(limit):
            keep(pool, 0.1, f"{p}.{n}", 1, 0.0, processes, limit)
    assert sum(len(pool) for pool in pools) <= KEPT_SHARE * limit


def test_drain_gives_back_and_forget_drops_without_a_call() -> None:
    pool = quiet_pool(busy=3)
    for lease in ("a", "b", "c"):
        keep(pool, 0.1, lease, 1, 0.0, 1, 10)
    assert pool.forget("b") == ["b"]
    assert pool.forget("zz") == []
    assert pool.drain() == ["a", "c"]
    assert pool.returned == 2
    assert pool.forgotten == 1
    keep(pool, 0.2, "d", 1, 0.0, 1, 10)
    assert pool.forget() == ["d"]
    assert len(pool) == 0


def test_a_slot_forgotten_while_it_runs_is_not_kept_at_its_release() -> None:
    """Gone from Redis while a request runs on it (the heartbeat says so), or any slot
    running when the pool forgets all (a fault, a new epoch: Redis may have let it lapse
    meanwhile): released in Redis at its end, not kept; leases admitted since are kept as before."""
    pool = quiet_pool(busy=3)
    for lease in ("a", "b", "c"):
        pool.admitted(0.0, lease, 1, 0.0, 3)
    pool.share(1, 10)
    assert pool.forget("a") == []  # (running: nothing to forget now)
    assert not pool.keep(0.1, "a")
    assert pool.keep(0.1, "b")
    assert pool.forget() == ["b"]
    assert not pool.keep(0.2, "c")
    assert pool.forgotten == 1
    pool.admitted(0.3, "d", 1, 0.3, 1)  # (a lease admitted since: kept as before)
    assert pool.keep(0.4, "d")


def test_a_pool_needs_a_positive_t() -> None:
    with pytest.raises(ValueError, match="positive"):
        SlotPool(0.0)


def test_the_setting_is_for_a_concurrency_budget_alone() -> None:
    settings = Settings.from_env({"THROTTLE_CONCURRENCY": "8", "THROTTLE_KEEP_SLOTS": "1"})
    assert settings.keep_slots_s == 1.0
    # The default budget is a learned concurrency limit: kept slots follow its value.
    assert Settings.from_env({"THROTTLE_KEEP_SLOTS": "0.5"}).keep_slots_s == 0.5
    with pytest.raises(ConfigError, match="THROTTLE_KEEP_SLOTS"):
        Settings.from_env({"THROTTLE_RATE": "10", "THROTTLE_KEEP_SLOTS": "1"})
    with pytest.raises(ConfigError, match="no THROTTLE_RATE"):
        Settings.from_env(
            {"THROTTLE_RATE": "10", "THROTTLE_CONCURRENCY": "8", "THROTTLE_KEEP_SLOTS": "1"}
        )
    with pytest.raises(ConfigError, match="THROTTLE_TENANT_RATE"):
        Settings.from_env(
            {"THROTTLE_CONCURRENCY": "8", "THROTTLE_TENANT_RATE": "5", "THROTTLE_KEEP_SLOTS": "1"}
        )
    for bad in ("-1", "11", "x"):
        with pytest.raises(ConfigError, match="0 \\(off\\) to 10"):
            Settings.from_env({"THROTTLE_CONCURRENCY": "8", "THROTTLE_KEEP_SLOTS": bad})


def test_unset_it_is_the_default_t_for_a_concurrency_budget_alone_and_off_elsewhere() -> None:
    # Unset: kept slots for a concurrency budget alone, fixed or learned (the default
    # budget), and simply not applied (no error) where they cannot be: with a rate, the
    # fleet's or a tenant's. Set, its values mean what they meant; 0 and off turn it off.
    assert Settings.from_env({}).keep_slots_s == DEFAULT_KEEP_SLOTS_S  # learned limit
    assert DEFAULT_KEEP_SLOTS_S > 0
    assert Settings.from_env({"THROTTLE_CONCURRENCY": "8"}).keep_slots_s == DEFAULT_KEEP_SLOTS_S
    assert Settings.from_env({"THROTTLE_CONCURRENCY": "auto"}).keep_slots_s == (
        DEFAULT_KEEP_SLOTS_S
    )
    assert Settings.from_env({"THROTTLE_RATE": "10"}).keep_slots_s == 0.0
    assert (
        Settings.from_env({"THROTTLE_RATE": "10", "THROTTLE_CONCURRENCY": "8"}).keep_slots_s == 0.0
    )
    assert (
        Settings.from_env({"THROTTLE_CONCURRENCY": "8", "THROTTLE_TENANT_RATE": "5"}).keep_slots_s
        == 0.0
    )
    assert Settings.from_env({"THROTTLE_TENANT_RATE": "5"}).keep_slots_s == 0.0
    for off in ("0", " off ", "OFF", "0.0"):
        assert Settings.from_env({"THROTTLE_KEEP_SLOTS": off}).keep_slots_s == 0.0
    assert Settings.from_env({}, keep_slots_s=0).keep_slots_s == 0.0
    # Off needs no concurrency budget: it is what a rate budget does anyway.
    assert Settings.from_env({"THROTTLE_RATE": "10", "THROTTLE_KEEP_SLOTS": "0"}).keep_slots_s == 0
    assert Settings.from_env({"THROTTLE_ENABLED": "false"}).keep_slots_s == 0.0


def test_slots_age_in_order_of_their_admission_not_of_their_keeping() -> None:
    """A slot kept later may have been admitted earlier (a longer request ran on it): it
    ages first, at T after its admission, whatever was kept before it. (A queue in the
    order kept, aged from its front, would hold it until the front's turn.)"""
    pool = quiet_pool(busy=3)
    assert keep(pool, 0.6, "late", 1, 0.5, 1, 10)  # admitted at 0.5: ages at 1.5
    assert keep(pool, 0.7, "early", 1, 0.0, 1, 10)  # admitted at 0.0: ages at 1.0
    assert pool.next_at == 1.0
    assert pool.aged(0.99) == []
    assert pool.aged(1.0) == ["early"]
    assert pool.next_at == 1.5
    assert pool.aged(1.49) == []
    assert pool.aged(1.5) == ["late"]
    assert pool.next_at is None
    assert pool.returned == 2


def test_a_slot_running_when_it_ages_is_not_given_back_by_aging_but_at_its_release() -> None:
    """The slot that ages first is taken: aging then gives nothing back (it is not kept,
    it runs a request) and looks next at the next slot's age; its release is not kept."""
    pool = quiet_pool(busy=3)
    assert keep(pool, 0.5, "b", 1, 0.5, 1, 10)  # ages at 1.5
    assert keep(pool, 0.6, "a", 1, 0.0, 1, 10)  # ages at 1.0
    pool.heard(0.9, True)
    assert take(pool, 0.9, 1, True) == "a"
    assert pool.aged(1.0) == []
    assert pool.next_at == 1.5
    assert not pool.keep(1.1, "a")  # T old at its release: to Redis, forgotten
    assert not pool.keep(1.2, "a")
    assert pool.kept == 2
    assert pool.aged(1.5) == ["b"]


def test_the_slot_kept_last_is_taken_first_but_never_an_aged_one_or_of_another_cost() -> None:
    """Take pops the slot kept last (the others stay idle and age out, one call each);
    if that one is of another cost, or aged but not yet given back (the timer due), it
    stays kept and another is taken."""
    pool = quiet_pool(busy=4)
    assert keep(pool, 0.1, "one", 1, 0.1, 1, 10)  # ages at 1.1
    assert keep(pool, 0.2, "two", 1, 0.2, 1, 10)  # ages at 1.2
    assert keep(pool, 0.3, "cost2", 2, 0.3, 1, 10)
    assert take(pool, 0.4, 1, True) == "two"
    assert pool.keep(0.5, "two")
    assert keep(pool, 0.6, "old", 1, 0.0, 1, 10)  # kept last, ages at 1.0
    pool.heard(1.0, True)
    assert take(pool, 1.0, 1, True) == "two"  # "old" is aged, "one" kept before "two"
    assert take(pool, 1.0, 2, True) == "cost2"
    assert take(pool, 1.0, 1, True) == "one"
    assert take(pool, 1.0, 1, True) is None
    assert pool.aged(1.0) == ["old"]
    assert len(pool) == 0
