"""Pricing: the table's CRUD with validation, and the cache every charge reads it through.

The cache is a cachetools TTL cache whose misses are single-flighted.

A guarded route looks its price up on every request; the cache makes that free after
the first one. Two things cachetools does not do on its own are done here:

* a stampede guard: when many requests miss the same key at once (cold start, expiry),
  exactly one loads it and the others await that load. The in-flight entry is created
  with no ``await`` between the check and the insert, so the event loop cannot let a
  second loader slip in.
* negative caching: "no such feature" is cached too, so a misconfigured route cannot
  turn every request into a query, but only briefly (``NEGATIVE_TTL``): the usual reason
  for a miss is a price about to be created, often by another process (the CLI, the
  admin page of another worker, a SQLite app with no notifications), and a new price
  must not wait out a whole TTL. One query per key every few seconds is no load.

Not thread-safe by design: one cache belongs to one event loop, like the guard.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
from cachetools import TTLCache

from ._metrics import Metrics
from ._notify import PricingNotifier
from ._storage.base import Store
from .errors import InvalidPricing, PricingNotFound
from .models import FeaturePricing, validate_pricing_fields, validate_pricing_rows

log = logging.getLogger("credit_guard")

Loader = Callable[[str], Awaitable[FeaturePricing | None]]


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: FeaturePricing | None = None
        self.error: BaseException | None = None


#: How long "no such feature" is believed, at most (never longer than the cache's TTL).
NEGATIVE_TTL = 2.0


class PricingCache:
    def __init__(self, loader: Loader, *, ttl: float = 60.0, maxsize: int = 1024) -> None:
        self._load = loader
        self._cache: TTLCache[str, FeaturePricing] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._missing: TTLCache[str, None] = TTLCache(maxsize=maxsize, ttl=min(ttl, NEGATIVE_TTL))
        self._flights: dict[str, _Flight] = {}
        # Bumped by every invalidation, so a load that started before a write does not
        # put the stale row it read back into the cache after the write cleared it.
        self._generation = 0
        #: Told of every hit and miss (``_metrics.py``); None reports nothing.
        self.metrics: Metrics | None = None

    async def get(self, feature_key: str) -> FeaturePricing | None:
        """The pricing row for a key (active or not), or None if there is none."""
        found = self._cache.get(feature_key)
        if found is not None or feature_key in self._missing:
            if self.metrics is not None:
                self.metrics.priced(True)
            return found
        if self.metrics is not None:  # a miss: loaded here, or awaited from the load in flight
            self.metrics.priced(False)
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
                if flight.result is None:
                    self._missing[feature_key] = None
                else:
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
            self._missing.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._missing.clear()


class Pricing:
    """The pricing table: validated writes that clear the cache (here and, through the
    notifier, in every process sharing a PostgreSQL database), and cached reads."""

    def __init__(self, store: Store, *, ttl: float, maxsize: int, notify: bool, timeout: float) -> None:
        self.store = store
        self.cache = PricingCache(self._load, ttl=ttl, maxsize=maxsize)
        #: The cross-process invalidation of the cache; None where there is none (SQLite).
        self.notifier: PricingNotifier | None = None
        if notify and store.engine.url.get_backend_name() == "postgresql":
            self.notifier = PricingNotifier(store.engine.url, self.cache, engine=store.engine, timeout=timeout)

    async def _load(self, feature_key: str) -> FeaturePricing | None:
        # The first miss is the moment the cache starts to hold something worth invalidating.
        if self.notifier is not None:
            await self.notifier.ready()
        return await self.store.pricing_by_key(feature_key)

    async def active(self, feature_key: str) -> FeaturePricing | None:
        """Active pricing for a key, or None; served from the TTL cache."""
        pricing = await self.cache.get(feature_key)
        return pricing if pricing is not None and pricing.is_active else None

    async def changed(self, *feature_keys: str) -> None:
        """Forget these keys' cached prices here and, on PostgreSQL, in every process that
        shares the database. Every pricing write calls it; call it after writing the
        pricing table some other way (a migration, raw SQL)."""
        self.cache.invalidate(*feature_keys)
        if self.notifier is not None and feature_keys:
            await self.notifier.notify(*feature_keys)

    async def create(self, **fields: Any) -> FeaturePricing:
        pricing = await self.store.create_pricing(validate_pricing_fields(fields))
        await self.changed(pricing.feature_key)
        return pricing

    async def update(self, pricing_id: str, changes: Mapping[str, Any]) -> FeaturePricing:
        fields = validate_pricing_fields(changes, partial=True)
        if not fields:
            pricing = await self.store.pricing_by_id(pricing_id)
            if pricing is None:
                raise PricingNotFound(pricing_id)
            return pricing
        pricing, old_key = await self.store.update_pricing(pricing_id, fields)
        await self.changed(old_key, pricing.feature_key)
        return pricing

    async def delete(self, pricing_id: str) -> FeaturePricing:
        pricing = await self.store.delete_pricing(pricing_id)
        if pricing is None:
            raise PricingNotFound(pricing_id)
        await self.changed(pricing.feature_key)
        return pricing

    async def import_rows(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
        clean, errors = validate_pricing_rows(rows)
        if errors:
            raise InvalidPricing(
                {f"row {n}: {field}": message for n, fields in errors.items() for field, message in fields.items()}
            )
        created, updated = await self.store.import_pricing(clean, update_existing=update_existing)
        await self.changed(*(pricing.feature_key for pricing in created + updated))
        return created, updated
