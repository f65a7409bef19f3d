"""The store's member-cap methods (a mixin of ``SqlStore``, kept apart so the store class
stays small): each runs one body of ``members.py`` in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Connection

from ..models import MemberLimit
from .members import limits_in, remove_limit_in, set_limit_in

T = TypeVar("T")


class MemberStore:
    dialect: str

    if TYPE_CHECKING:  # SqlStore's

        async def _read(self, work: Callable[[Connection], T]) -> T: ...
        async def _write(self, work: Callable[[Connection], T]) -> T: ...

    async def set_member_limit(
        self, organization_id: str, member: str, credits: int, per: str | None, now: datetime
    ) -> MemberLimit:
        work = partial(
            set_limit_in, dialect=self.dialect, org=organization_id, member=member, credits=credits, per=per, now=now
        )
        return await self._write(work)

    async def remove_member_limit(self, organization_id: str, member: str, now: datetime) -> bool:
        return await self._write(partial(remove_limit_in, org=organization_id, member=member, now=now))

    async def member_limits(self, organization_id: str, now: datetime, member: str | None = None) -> list[MemberLimit]:
        return await self._read(partial(limits_in, org=organization_id, now=now, member=member))
