"""How much a caller may do, counted across every API process: requests per key and failed requests per
client address (token buckets), and uploads and event streams one key holds at once (slots).

One interface, two stores, chosen from the settings in the app's lifespan (`open_throttle`):
- `RedisThrottle` when the broker is Redis, so that N replicas behind a load balancer give a key one
  quota, not N. Each decision is one Lua script, atomic in Redis and timed by Redis's clock. A slot is a
  member of a sorted set scored by its lease's expiry; the process that holds it renews the lease while
  the upload or stream lasts, so a crashed replica's slots free themselves within QAAS_SLOT_LEASE_S.
  While Redis does not answer, each process counts on its own in memory, as before, and tries Redis
  again a few seconds later: a limit protects the service, and is not worth refusing every request for.
- `MemoryThrottle` on the embedded default (filesystem broker, one API process).

What protects one process (QAAS_UPLOADS_IN_FLIGHT, QAAS_EVENTS_MAX_PER_PROCESS: its memory, its
connections) is counted in that process (`ProcessCap`), whatever the store."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread
import redis
from redis.exceptions import RedisError

from service.settings import Settings

log = logging.getLogger(__name__)
REDIS_RETRY_S = 5.0  # after Redis failed to answer, count in memory this long before trying it again
REDIS_TIMEOUT_S = 2.0
UNAVAILABLE = (RedisError, OSError)  # OSError: refused, reset, timed out
T = TypeVar("T")


@dataclass(frozen=True)
class Rate:
    """A token bucket per key: `per_minute` requests, refilled continuously."""

    name: str
    per_minute: int


@dataclass(frozen=True)
class Cap:
    """At most `most` slots held at once per key, across every API process."""

    name: str
    most: int


@dataclass(frozen=True)
class Slot:
    cap: Cap
    key: str
    holder: str
    shared: bool  # held in Redis (False: in this process's memory)


class Throttle(ABC):
    """Made in the app's lifespan (`open_throttle`), closed at its end."""

    @abstractmethod
    async def spend(self, rate: Rate, key: str) -> float:
        """Take one token of `key`'s bucket: 0 when there was one, else the seconds until there is."""

    @abstractmethod
    async def wait(self, rate: Rate, key: str) -> float:
        """What `spend` would answer, without taking a token."""

    @abstractmethod
    async def take(self, cap: Cap, key: str) -> Slot | None:
        """One of `key`'s slots, or None when it holds `cap.most` already. Give it back with `give`."""

    @abstractmethod
    async def give(self, slot: Slot) -> None: ...

    async def aclose(self) -> None:
        return None


class RateLimiter:
    """Token buckets in this process's memory: `per_minute` requests per key, refilled continuously.
    Buckets that refilled are dropped once there are more than `max_buckets` (keys may be client
    addresses, which a caller does not choose from a small set)."""

    def __init__(self, per_minute: int, max_buckets: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_buckets = max_buckets
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, stamp = self.buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - stamp) * self.rate)

    def acquire(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens = self._tokens(key, now)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                self._prune(now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate

    def wait(self, key: str) -> float:
        """What `acquire` would answer, without taking a token."""
        with self.lock:
            tokens = self._tokens(key, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self.buckets) <= self.max_buckets:
            return
        for key in [k for k in self.buckets if self._tokens(k, now) >= self.capacity]:
            del self.buckets[key]  # full again: the same as no bucket
        if len(self.buckets) > self.max_buckets:  # still too many: the least recently used go
            for key, _ in sorted(self.buckets.items(), key=lambda kv: kv[1][1])[: len(self.buckets) // 2]:
                del self.buckets[key]


class MemoryThrottle(Throttle):
    """Everything counted in this process: the embedded default, and Redis's stand-in while it is away."""

    def __init__(self) -> None:
        self.limiters: dict[Rate, RateLimiter] = {}
        self.held: dict[str, Counter[str]] = {}

    def _limiter(self, rate: Rate) -> RateLimiter:
        limiter = self.limiters.get(rate)
        if limiter is None:
            limiter = self.limiters[rate] = RateLimiter(rate.per_minute)
        return limiter

    async def spend(self, rate: Rate, key: str) -> float:
        return self._limiter(rate).acquire(key)

    async def wait(self, rate: Rate, key: str) -> float:
        return self._limiter(rate).wait(key)

    async def take(self, cap: Cap, key: str) -> Slot | None:
        held = self.held.setdefault(cap.name, Counter())
        if held[key] >= cap.most:
            return None
        held[key] += 1
        return Slot(cap, key, uuid.uuid4().hex, shared=False)

    async def give(self, slot: Slot) -> None:
        held = self.held.get(slot.cap.name)
        if held is not None and held[slot.key] > 0:
            held[slot.key] -= 1
            if held[slot.key] == 0:
                del held[slot.key]


# Redis's own clock, in milliseconds, so that replicas whose clocks differ still agree.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
# KEYS[1] the bucket; ARGV[1] per minute, ARGV[2] '1' to take a token. Returns the seconds to wait ('0').
_BUCKET = (
    _NOW
    + """
local capacity = tonumber(ARGV[1])
local per_ms = capacity / 60000
local tokens = capacity
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'at')
if saved[1] then
  tokens = math.min(capacity, tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * per_ms)
end
if tokens < 1 then
  return tostring((1 - tokens) / per_ms / 1000)
end
if ARGV[2] == '1' then
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / per_ms) + 1000)
end
return '0'
"""
)
# KEYS[1] the key's holders (member: holder id, score: lease expiry); ARGV[1] most, ARGV[2] holder,
# ARGV[3] lease in ms. Expired leases (a crashed process's) are dropped first. Returns 1 when taken.
_TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)
# KEYS[1] the key's holders; ARGV[1] lease in ms, ARGV[2..] this process's holders, still held.
_RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""
)


class RedisThrottle(Throttle):
    """Counted in Redis, under `<QAAS_BROKER_KEY_PREFIX>qaas:limits:<name>:<key>` (see the module docstring).
    Its calls go through a thread (a blocking client, bound to no event loop); one thread of its own
    renews the leases of the slots this process holds."""

    def __init__(self, url: str, prefix: str, lease_s: float) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self.prefix = f"{prefix}qaas:limits:"
        self.lease_ms = round(lease_s * 1000)
        self.memory = MemoryThrottle()
        self.down_until = 0.0
        self.bucket = self.client.register_script(_BUCKET)
        self.take_script = self.client.register_script(_TAKE)
        self.renew_script = self.client.register_script(_RENEW)
        self.held: dict[str, Slot] = {}  # this process's slots in Redis, by holder: their leases are renewed
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.renewer: threading.Thread | None = None

    def _key(self, name: str, key: str) -> str:
        return f"{self.prefix}{name}:{key}"

    def _up(self) -> bool:
        return time.monotonic() >= self.down_until

    def _away(self, exc: Exception) -> None:
        if self._up():
            log.warning(
                "limits: Redis did not answer (%s); each API process counts on its own for %g s", exc, REDIS_RETRY_S
            )
        self.down_until = time.monotonic() + REDIS_RETRY_S

    async def _call(self, fn: Callable[[], T]) -> T | None:
        """`fn()` in a thread; None when Redis did not answer (then, for a while, without asking it)."""
        if not self._up():
            return None
        try:
            return await anyio.to_thread.run_sync(fn)
        except UNAVAILABLE as exc:
            self._away(exc)
            return None

    async def _bucket(self, rate: Rate, key: str, take: bool) -> float | None:
        keys, args = [self._key(rate.name, key)], [str(rate.per_minute), "1" if take else "0"]
        wait = await self._call(lambda: self.bucket(keys=keys, args=args))
        return None if wait is None else float(wait)

    async def spend(self, rate: Rate, key: str) -> float:
        wait = await self._bucket(rate, key, take=True)
        return await self.memory.spend(rate, key) if wait is None else wait

    async def wait(self, rate: Rate, key: str) -> float:
        wait = await self._bucket(rate, key, take=False)
        return await self.memory.wait(rate, key) if wait is None else wait

    async def take(self, cap: Cap, key: str) -> Slot | None:
        slot = Slot(cap, key, uuid.uuid4().hex, shared=True)
        args: list[int | str] = [cap.most, slot.holder, self.lease_ms]
        taken = await self._call(lambda: self.take_script(keys=[self._key(cap.name, key)], args=args))
        if taken is None:
            return await self.memory.take(cap, key)
        if not taken:
            return None
        with self.lock:
            self.held[slot.holder] = slot
            if self.renewer is None or not self.renewer.is_alive():
                self.renewer = threading.Thread(target=self._renew_while_held, name="qaas-slot-leases", daemon=True)
                self.renewer.start()
        return slot

    async def give(self, slot: Slot) -> None:
        if not slot.shared:
            await self.memory.give(slot)
            return
        with self.lock:  # first: even if the removal below fails, its lease is no longer renewed
            self.held.pop(slot.holder, None)
        key = self._key(slot.cap.name, slot.key)
        await self._call(lambda: self.client.zrem(key, slot.holder))  # unanswered: its lease runs out instead

    def renew(self) -> None:
        """Extend the lease of every slot this process holds in Redis."""
        with self.lock:
            by_key: dict[str, list[str]] = {}
            for slot in self.held.values():
                by_key.setdefault(self._key(slot.cap.name, slot.key), []).append(slot.holder)
        for key, holders in by_key.items():
            self.renew_script(keys=[key], args=[self.lease_ms, *holders])

    def _renew_while_held(self) -> None:
        while not self.closed.wait(self.lease_ms / 3000):
            with self.lock:
                if not self.held:
                    self.renewer = None
                    return
            try:
                self.renew()
            except UNAVAILABLE as exc:
                log.warning("limits: could not renew the leases of %d slots in Redis: %s", len(self.held), exc)

    async def aclose(self) -> None:
        self.closed.set()
        if self.renewer is not None:
            await anyio.to_thread.run_sync(self.renewer.join, 5.0)
        self.client.close()


class ProcessCap:
    """Requests of one kind in flight in this API process, at most `most` (not a caller's share: what the
    process itself can hold)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.count = 0

    def take(self) -> bool:
        if self.count >= self.most:
            return False
        self.count += 1
        return True

    def give(self) -> None:
        self.count = max(0, self.count - 1)


def open_throttle(settings: Settings) -> Throttle:
    """Redis when the broker is Redis (the same server and key prefix), else this process's memory."""
    url = settings.redis_broker_url
    if url is None:
        return MemoryThrottle()
    return RedisThrottle(url, settings.broker_key_prefix, settings.slot_lease_s)
