"""The store's outbox methods (a mixin of ``SqlStore``, kept apart so the store class
stays small): each runs one body of ``outbox.py`` in one transaction."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection

from .outbox import claim_in, delivered_in, failed_in, watch_in


class OutboxStore:
    _write: Callable[[Callable[[Connection], Any]], Coroutine[Any, Any, Any]]

    async def claim_events(self, now: datetime, lease_until: datetime, limit: int) -> list[tuple[int, str, str, int]]:
        result: list[tuple[int, str, str, int]] = await self._write(
            partial(claim_in, now=now, lease_until=lease_until, limit=limit)
        )
        return result

    async def event_delivered(self, row_id: int, now: datetime) -> None:
        await self._write(partial(delivered_in, row_id=row_id, now=now))

    async def event_failed(self, row_id: int, retry_at: datetime | None, error: str) -> None:
        await self._write(partial(failed_in, row_id=row_id, retry_at=retry_at, error=error))

    async def watch_balance(self, organization_id: str, low: int, now: datetime, falling: bool) -> str | None:
        result: str | None = await self._write(
            partial(watch_in, org=organization_id, low=low, now=now, falling=falling)
        )
        return result
