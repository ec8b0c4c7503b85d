"""The two stores of the API's limits behave alike (token buckets, slots per key); Redis's keeps a held
slot while its process renews the lease, and while Redis is away each process counts on its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import anyio
import pytest

from service.settings import Settings
from service.throttle import Cap, MemoryThrottle, Rate, RedisThrottle, Throttle, open_throttle
from tests.conftest import free_port, redis_prefix


def _redis_throttle(url: str, prefix: str, lease_s: float = 30.0) -> RedisThrottle:
    return RedisThrottle(url, prefix, lease_s)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
def throttles(request: pytest.FixtureRequest) -> Iterator[tuple[Throttle, Throttle]]:
    """Two API processes' throttles: Redis's share their counts, memory's are one process's (the same twice)."""
    if request.param == "memory":
        memory = MemoryThrottle()
        yield memory, memory
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    one, two = _redis_throttle(url, prefix), _redis_throttle(url, prefix)
    yield one, two
    for throttle in (one, two):
        anyio.run(throttle.aclose)


def test_a_rate_is_one_bucket_per_key(throttles: tuple[Throttle, Throttle]) -> None:
    one, two = throttles
    rate = Rate("requests", 4)

    async def check() -> None:
        assert [await t.spend(rate, "k") for t in (one, two, one, two)] == [0, 0, 0, 0]
        assert await one.wait(rate, "k") == pytest.approx(15, abs=0.5)  # one token every 15 s
        assert await two.spend(rate, "k") == pytest.approx(15, abs=0.5)
        assert await one.spend(rate, "other") == 0
        assert await two.wait(Rate("failures", 4), "k") == 0  # another limit, another bucket

    anyio.run(check)


def test_slots_are_capped_per_key_and_given_back(throttles: tuple[Throttle, Throttle]) -> None:
    one, two = throttles
    cap = Cap("streams", 2)

    async def check() -> None:
        first, second = await one.take(cap, "k"), await two.take(cap, "k")
        assert first is not None and second is not None
        assert await one.take(cap, "k") is None and await two.take(cap, "k") is None
        assert await one.take(cap, "other") is not None
        assert await one.take(Cap("uploads", 2), "k") is not None
        await one.give(first)
        assert await two.take(cap, "k") is not None

    anyio.run(check)


@pytest.mark.services
def test_a_slot_held_longer_than_its_lease_stays_held_and_a_given_one_is_free(redis_url: str) -> None:
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    holder, other = _redis_throttle(redis_url, prefix, lease_s=1.0), _redis_throttle(redis_url, prefix, lease_s=1.0)
    cap = Cap("uploads", 1)

    async def check() -> None:
        slot = await holder.take(cap, "k")
        assert slot is not None
        await anyio.sleep(2.5)  # its process renewed the lease meanwhile
        assert await other.take(cap, "k") is None
        await holder.give(slot)
        assert await other.take(cap, "k") is not None
        await holder.aclose()
        await other.aclose()

    anyio.run(check)


def test_while_redis_is_away_each_process_counts_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    throttle = _redis_throttle(f"redis://127.0.0.1:{free_port()}/0", "x:")  # nothing listens there
    rate, cap = Rate("requests", 2), Cap("streams", 1)

    async def check() -> None:
        started = time.monotonic()
        assert [await throttle.spend(rate, "k") for _ in range(2)] == [0, 0]
        assert await throttle.spend(rate, "k") > 0
        slot = await throttle.take(cap, "k")
        assert slot is not None and not slot.shared
        assert await throttle.take(cap, "k") is None
        await throttle.give(slot)
        assert await throttle.take(cap, "k") is not None
        assert time.monotonic() - started < 3  # Redis is asked once, then left alone for a while
        await throttle.aclose()

    anyio.run(check)
    assert sum("Redis did not answer" in r.getMessage() for r in caplog.records) == 1


def test_the_store_follows_the_broker(sqlite_settings: Settings) -> None:
    assert isinstance(open_throttle(sqlite_settings), MemoryThrottle)
    redis_broker = sqlite_settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"})
    made = open_throttle(redis_broker)
    assert isinstance(made, RedisThrottle)
    anyio.run(made.aclose)
