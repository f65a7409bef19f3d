"""The store's plan and subscription methods (a mixin of ``SqlStore``, kept apart so the
store class stays small): each runs one body of ``plans.py`` in one transaction."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Connection

from ..models import Plan, Subscription
from .base import Issued
from .plans import (
    define_plan_in,
    delete_plan_in,
    due_in,
    list_plans_in,
    plan_in,
    renew_in,
    subscribe_in,
    subscription_in,
    unsubscribe_in,
)

T = TypeVar("T")


class PlanStore:
    dialect: str
    #: Write the webhook's events with what they tell (``Webhooks.send_to`` turns it on).
    notify: bool = False
    _write: Callable[[Callable[[Connection], Any]], Coroutine[Any, Any, Any]]
    _read: Callable[[Callable[[Connection], Any]], Coroutine[Any, Any, Any]]

    async def define_plan(self, plan: Plan, now: datetime) -> tuple[Plan, bool]:
        result: tuple[Plan, bool] = await self._write(partial(define_plan_in, dialect=self.dialect, plan=plan, now=now))
        return result

    async def plan(self, plan_key: str) -> Plan | None:
        result: Plan | None = await self._read(partial(plan_in, plan_key=plan_key))
        return result

    async def list_plans(self) -> list[tuple[Plan, int]]:
        result: list[tuple[Plan, int]] = await self._read(list_plans_in)
        return result

    async def delete_plan(self, plan_key: str) -> bool | None:
        result: bool | None = await self._write(partial(delete_plan_in, plan_key=plan_key))
        return result

    async def subscription(self, organization_id: str) -> Subscription | None:
        result: Subscription | None = await self._read(partial(subscription_in, org=organization_id))
        return result

    async def subscribe(
        self, organization_id: str, plan_key: str, *, anchor: datetime | None, keep: bool, now: datetime
    ) -> tuple[Subscription, list[Issued]] | None:
        work = partial(
            subscribe_in,
            dialect=self.dialect,
            org=organization_id,
            plan_key=plan_key,
            anchor=anchor,
            keep=keep,
            now=now,
            notify=self.notify,
        )
        result: tuple[Subscription, list[Issued]] | None = await self._write(work)
        return result

    async def unsubscribe(self, organization_id: str, *, keep: bool, now: datetime) -> Subscription | None:
        result: Subscription | None = await self._write(
            partial(unsubscribe_in, org=organization_id, keep=keep, now=now)
        )
        return result

    async def renew_if_due(self, organization_id: str, now: datetime) -> list[Issued]:
        """Grant the organization's periods that have begun (a read first: most have none)."""
        if not await self._read(partial(due_in, now=now, limit=1, org=organization_id)):
            return []
        issued: list[Issued] = await self._write(partial(renew_in, org=organization_id, now=now, notify=self.notify))
        return issued

    async def renew_due(self, now: datetime, limit: int = 500) -> list[Issued]:
        """Grant every period that has started, one organization per transaction."""
        issued: list[Issued] = []
        while True:
            orgs: list[str] = await self._read(partial(due_in, now=now, limit=limit))
            before = len(issued)
            for org in orgs:
                issued += await self._write(partial(renew_in, org=org, now=now, notify=self.notify))
            if len(orgs) < limit or len(issued) == before:  # each renewal moves renews_at past now
                return issued
