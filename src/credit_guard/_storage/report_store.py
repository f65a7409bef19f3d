"""The store's reports (a mixin of ``SqlStore``, kept apart so the store class stays
small): the audit, usage, balance history and the admin page's reads, each one read
transaction over ``reports.py``'s queries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection

from ..models import AuditIssue, BalancePoint, Reservation, UsageGroup, UsageRow
from .reports import (
    activity_in,
    audit_in,
    balance_history_query,
    balance_point,
    organizations_query,
    usage_query,
    usage_row,
)

T = TypeVar("T")


class ReportStore:
    dialect: str

    if TYPE_CHECKING:  # SqlStore's

        async def _read(self, work: Callable[[Connection], T]) -> T: ...

    async def audit(self) -> list[AuditIssue]:
        """Every way the books fail to add up (``reports.audit_in``)."""
        return await self._read(audit_in)

    async def usage(
        self,
        *,
        group_by: UsageGroup = "day",
        organization_id: str | None = None,
        feature_key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        split_by: UsageGroup | None = None,
    ) -> list[UsageRow]:
        """Charges and refunds per day, feature or organization, newest day / biggest first."""
        query = usage_query(
            self.dialect,
            group_by=group_by,
            organization_id=organization_id,
            feature_key=feature_key,
            since=since,
            until=until,
            split_by=split_by,
        )
        return await self._read(lambda conn: [usage_row(row) for row in conn.execute(query)])

    async def balance_history(
        self, organization_id: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[BalancePoint]:
        """The balance at the end of each day the organization's credits moved, oldest first."""
        query = balance_history_query(self.dialect, organization_id, since, until)
        return await self._read(lambda conn: [balance_point(row) for row in conn.execute(query)])

    async def organizations(self, prefix: str, limit: int) -> list[tuple[str, int]]:
        """Accounts whose id starts with ``prefix`` (as typed: no wildcards), by id."""
        return await self._read(
            lambda conn: [(r[0], int(r[1])) for r in conn.execute(organizations_query(prefix, limit))]
        )

    async def activity(self, organization_id: str, limit: int) -> tuple[list[dict[str, Any]], list[Reservation]]:
        """An organization's latest ledger rows (newest first) and its open reservations."""
        return await self._read(partial(activity_in, organization_id=organization_id, limit=limit))
