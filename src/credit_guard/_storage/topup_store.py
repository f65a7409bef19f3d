"""The store's auto top-up methods (a mixin of ``SqlStore``, kept apart so the store class
stays small): each runs one body of ``topups.py`` in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Connection

from ..models import AutoTopup
from .topups import claim_topup_in, finish_topup_in, remove_topup_in, set_topup_in, topup_in, topup_lines_in

T = TypeVar("T")


class TopupStore:
    dialect: str

    if TYPE_CHECKING:  # SqlStore's

        async def _read(self, work: Callable[[Connection], T]) -> T: ...
        async def _write(self, work: Callable[[Connection], T]) -> T: ...

    async def set_topup(self, organization_id: str, below: int, credits: int, now: datetime) -> AutoTopup:
        work = partial(set_topup_in, dialect=self.dialect, org=organization_id, below=below, credits=credits, now=now)
        return await self._write(work)

    async def topup(self, organization_id: str) -> AutoTopup | None:
        return await self._read(partial(topup_in, org=organization_id))

    async def remove_topup(self, organization_id: str) -> bool:
        return await self._write(partial(remove_topup_in, org=organization_id))

    async def topup_lines(self) -> dict[str, int]:
        return await self._read(topup_lines_in)

    async def claim_topup(
        self, organization_id: str, now: datetime, lease_until: datetime
    ) -> tuple[int, int, str] | None:
        return await self._write(partial(claim_topup_in, org=organization_id, now=now, lease_until=lease_until))

    async def finish_topup(
        self, organization_id: str, crossing: int, result: str | None, error: str | None, now: datetime
    ) -> None:
        work = partial(finish_topup_in, org=organization_id, crossing=crossing, result=result, error=error, now=now)
        await self._write(work)
