"""Rate limits next to credits: ``requires_credits(key, rate="10/minute")``.

The counting is the ``limits`` library's (a moving window, slowapi's syntax: ``"10/minute"``,
``"5/second;100/hour"``), never hand-written here. A route's rate is checked once the
organization (and user) is known, the request is valid and right before its charge: a
request over it is answered ``429`` with ``Retry-After`` and ``RateLimit-*`` headers and
charges nothing; one that passes costs one window update (in process for ``memory://``,
one Redis round trip for ``redis://``, the storage many workers share). A route without a
rate pays nothing for the feature (one ``is None`` check).

The window is counted per feature and organization, or per feature, organization and
member (``rate_by="member"``: the request's user id). A storage that cannot be reached (or
does not answer within the guard's ``timeout``) is an outage like the database's: ``503``,
nothing charged, unless the guard was built with ``fail_open=True``, when the limit is
skipped and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import anyio
from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

log = logging.getLogger("credit_guard")

RateBy = Literal["organization", "member"]
RATE_BY: tuple[RateBy, ...] = ("organization", "member")
#: Namespace of every window this library counts (the storage's own prefix comes first).
_NAMESPACE = "credit_guard"


def parse_rate(rate: str) -> tuple[RateLimitItem, ...]:
    """``"10/minute"`` (or several, ``;``-separated) as ``limits`` items; ValueError if not one."""
    if not isinstance(rate, str):
        raise TypeError(f"rate must be a string like '10/minute', got {type(rate).__name__}")
    try:
        items = tuple(parse_many(rate))
    except ValueError as exc:
        raise ValueError(f"rate {rate!r:.60} is not a rate like '10/minute' or '5/second;100/hour': {exc}") from None
    if not items:
        raise ValueError(f"rate {rate!r:.60} names no limit")
    return items


@dataclass(frozen=True, slots=True)
class Exceeded:
    """A request over its rate: which limit, and when the window lets the next one in."""

    item: RateLimitItem
    retry_after: int
    reset_at: float

    @property
    def window(self) -> int:
        """The window's length in seconds."""
        return int(self.item.get_expiry())


class RateLimitUnavailable(Exception):
    """The rate limit storage could not be asked (down, or too slow): an outage."""


class RateLimits:
    """The guard's rate limiter: one ``limits`` storage (made on the loop that first needs
    it, dropped on ``close``, so a guard restarted on another loop makes a new one)."""

    def __init__(self, storage: str | Storage = "memory://", *, timeout: float = 5.0) -> None:
        if isinstance(storage, str):
            scheme = storage.partition("://")[0]
            if not scheme or "://" not in storage:
                raise ValueError(
                    f"rate_limit_storage must be a URI like 'memory://' or 'redis://host:6379', got {storage!r:.80}"
                )
            self._uri: str | None = storage if scheme.startswith("async+") else "async+" + storage
            self._storage: Storage | None = None
        else:
            self._uri, self._storage = None, storage
        self._limiter: MovingWindowRateLimiter | None = None
        self.timeout = timeout

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            assert self._uri is not None
            self._storage = storage_from_string(self._uri, wrap_exceptions=True)  # type: ignore[assignment]
        return self._storage  # type: ignore[return-value]

    def _strategy(self) -> MovingWindowRateLimiter:
        if self._limiter is None:
            self._limiter = MovingWindowRateLimiter(self.storage)
        return self._limiter

    async def hit(
        self, items: tuple[RateLimitItem, ...], feature_key: str, organization_id: str, member: str | None
    ) -> Exceeded | None:
        """Count one request against each of ``items``; the first limit it is over, or None.

        Limits are counted in order, and a request refused by a later one still counted in
        the earlier ones (as slowapi and ``limits`` do: the request was made). Raises
        ``RateLimitUnavailable`` when the storage cannot answer within ``timeout``.
        """
        limiter = self._strategy()
        who = _window_of(organization_id, member)
        try:
            with anyio.fail_after(self.timeout):
                for item in items:
                    if not await limiter.hit(item, _NAMESPACE, feature_key, *who):
                        stats = await limiter.get_window_stats(item, _NAMESPACE, feature_key, *who)
                        wait = max(1, math.ceil(stats.reset_time - time.time()))
                        return Exceeded(item, wait, stats.reset_time)
        except (StorageError, OSError, TimeoutError) as exc:
            raise RateLimitUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return None

    async def clear(self, feature_key: str, organization_id: str, rate: str, member: str | None = None) -> None:
        """Forget an organization's (or member's) window for ``rate`` (support, tests)."""
        who = _window_of(organization_id, member)
        for item in parse_rate(rate):
            await self._strategy().clear(item, _NAMESPACE, feature_key, *who)

    async def close(self) -> None:
        """Let go of a storage made from a URI: it belongs to the loop it was made on. One
        handed in is the app's to release (``release_storage``)."""
        storage, self._limiter = self._storage, None
        if self._uri is None or storage is None:
            return
        self._storage = None
        await release_storage(storage)


def _window_of(organization_id: str, member: str | None) -> tuple[str, ...]:
    """Whose window a request counts in: its organization's, or its member's there."""
    return ("org", organization_id) if member is None else ("member", organization_id, member)


async def release_storage(storage: Storage) -> None:
    """Stop what a ``limits`` storage runs on its event loop: a memory storage's expiry
    task, a Redis client's connections (``limits`` has no close of its own)."""
    timer = getattr(storage, "timer", None)
    if isinstance(timer, asyncio.Task) and not timer.done():
        timer.cancel()
    pool = getattr(getattr(getattr(storage, "bridge", None), "storage", None), "connection_pool", None)
    disconnect = getattr(pool, "disconnect", None)
    if disconnect is not None:
        with contextlib.suppress(Exception):
            result = disconnect()
            if inspect.isawaitable(result):
                await result


__all__ = ["RATE_BY", "Exceeded", "RateBy", "RateLimitUnavailable", "RateLimits", "parse_rate", "release_storage"]
