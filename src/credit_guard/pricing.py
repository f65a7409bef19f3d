"""The pricing cache: a cachetools TTL cache whose misses are single-flighted.

A guarded route looks its price up on every request; the cache makes that free after
the first one. Two things cachetools does not do on its own are done here:

* a stampede guard: when many requests miss the same key at once (cold start, expiry),
  exactly one loads it and the others await that load. The in-flight entry is created
  with no ``await`` between the check and the insert, so the event loop cannot let a
  second loader slip in.
* negative caching: "no such feature" is cached too, so a misconfigured route cannot
  turn every request into a query.

Not thread-safe by design: one cache belongs to one event loop, like the guard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from cachetools import TTLCache

from .models import FeaturePricing

Loader = Callable[[str], Awaitable[FeaturePricing | None]]


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: FeaturePricing | None = None
        self.error: BaseException | None = None


class PricingCache:
    def __init__(self, loader: Loader, *, ttl: float = 60.0, maxsize: int = 1024) -> None:
        self._load = loader
        self._cache: TTLCache[str, FeaturePricing | None] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._flights: dict[str, _Flight] = {}
        # Bumped by every invalidation, so a load that started before a write does not
        # put the stale row it read back into the cache after the write cleared it.
        self._generation = 0

    async def get(self, feature_key: str) -> FeaturePricing | None:
        """The pricing row for a key (active or not), or None if there is none."""
        try:
            return self._cache[feature_key]
        except KeyError:
            pass
        flight = self._flights.get(feature_key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is None:
                return flight.result
            if not isinstance(flight.error, anyio.get_cancelled_exc_class()):
                raise flight.error
            # The loader's own request was cancelled (a client gone, a timeout): that is not
            # this waiter's failure, so load again rather than die with someone else's cancel.
            return await self.get(feature_key)
        flight = self._flights[feature_key] = _Flight()
        generation = self._generation
        try:
            flight.result = await self._load(feature_key)
            if generation == self._generation:
                self._cache[feature_key] = flight.result
            return flight.result
        except BaseException as exc:
            # Errors are shared with the waiters but never cached: the next request retries.
            flight.error = exc
            raise
        finally:
            if self._flights.get(feature_key) is flight:  # forget_loads() may have dropped it
                del self._flights[feature_key]
            flight.done.set()

    def forget_loads(self) -> None:
        """Drop loads in flight (their waiters belong to a loop that is ending) and every
        cached price: a guard started again must not trust what it learnt while nobody listened."""
        self._flights.clear()
        self.clear()

    def invalidate(self, *feature_keys: str) -> None:
        self._generation += 1
        for key in feature_keys:
            self._cache.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
