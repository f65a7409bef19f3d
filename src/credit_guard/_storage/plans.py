"""Plans and subscriptions: the statements that grant each period's allowance once.

A subscription's allowances are grants like any other (``writes.grant_in``: the ledger
row, the overdraft repayment, the balance cap), made with an idempotency key that names
the subscription and the period, so a period is granted at most once per organization
whatever runs the renewal and however often. Every body here locks the account first
(``grants.lock_account``; SQLite's writer holds the database's write lock), then reads
the subscription: two renewals of one organization queue, and the second finds the
period already granted.

A renewal (``renew_in``) grants every period whose start has come, in order, catching up
after a keeper that was down: for each, what is left of the ending allowance (its
``remaining``: nothing can be spent from it since it expired, and refunds of charges
made before only ever add to it) is carried up to the plan's ``rollover`` into a grant of
its own, the rest written off, then the new allowance is granted. Both expire at the new
period's end. A rollover grant is made first, so at an equal expiry it is spent first,
and it does not roll over again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from .._periods import PeriodUnit, period_index, period_start
from ..errors import PlanInUse
from ..models import Plan, Subscription
from ..schema import accounts, grants, ledger, plans, subscriptions
from .base import GrantStatus, Issued
from .grants import end_grant_in, lock_account, read_datetime, write_off_in
from .outbox_events import add_event_in
from .writes import grant_in, upsert


def plan_from_row(row: Any) -> Plan:
    rollover = None if row.rollover is None else int(row.rollover)
    return Plan(row.plan_key, row.name, int(row.credits), row.period, rollover)


def subscription_from_row(row: Any, unit: str) -> Subscription:
    anchor = read_datetime(row.anchor)
    period = int(row.period)
    start = None if period < 0 else period_start(anchor, unit, period)  # type: ignore[arg-type]
    return Subscription(
        organization_id=row.organization_id,
        plan_key=row.plan_key,
        anchor=anchor,
        period=period,
        period_start=start,
        renews_at=read_datetime(row.renews_at),
        grant_id=None if row.grant_id is None else int(row.grant_id),
        rollover_grant_id=None if row.rollover_grant_id is None else int(row.rollover_grant_id),
    )


# -- plans ----------------------------------------------------------------------------------


def define_plan_in(conn: Connection, dialect: str, plan: Plan, now: datetime) -> tuple[Plan, bool]:
    """Create or replace plan ``plan.plan_key``; whether it was new. Subscribers see an
    edit from their next period on."""
    values = {"name": plan.name, "credits": plan.credits, "period": plan.period, "rollover": plan.rollover}
    stmt = upsert(dialect)(plans).values(plan_key=plan.plan_key, created_at=now, updated_at=now, **values)
    # Locked (PostgreSQL; SQLite's writer holds the database): a subscribe reading the plan waits.
    old = conn.execute(select(plans.c.period).where(plans.c.plan_key == plan.plan_key).with_for_update()).scalar()
    existed = old is not None
    if existed and old != plan.period and _subscribed(conn, plan.plan_key):
        # Subscriptions count their periods in the plan's unit from their anchors: a new
        # unit would make every one of them wrong (months of days granted at once).
        raise PlanInUse(plan.plan_key, f"changed from {old} to {plan.period}")
    conn.execute(stmt.on_conflict_do_update(index_elements=[plans.c.plan_key], set_={**values, "updated_at": now}))
    return plan, not existed


def plan_in(conn: Connection, plan_key: str, *, share: bool = False) -> Plan | None:
    """The plan; ``share``: locked against a change of its period until the transaction ends."""
    query = select(plans).where(plans.c.plan_key == plan_key)
    row = conn.execute(query.with_for_update(read=True) if share else query).first()
    return None if row is None else plan_from_row(row)


def list_plans_in(conn: Connection) -> list[tuple[Plan, int]]:
    """Every plan, by key, with how many organizations subscribe to it."""
    rows = conn.execute(select(plans).order_by(plans.c.plan_key)).all()
    counts: dict[str, int] = {}
    for (key,) in conn.execute(select(subscriptions.c.plan_key)):
        counts[key] = counts.get(key, 0) + 1
    return [(plan_from_row(row), counts.get(row.plan_key, 0)) for row in rows]


def _subscribed(conn: Connection, plan_key: str) -> bool:
    query = select(subscriptions.c.organization_id).where(subscriptions.c.plan_key == plan_key).limit(1)
    return conn.execute(query).first() is not None


def delete_plan_in(conn: Connection, plan_key: str) -> bool | None:
    """Delete a plan: True; None when it does not exist; False while anyone subscribes."""
    if _subscribed(conn, plan_key):
        return False
    return conn.execute(delete(plans).where(plans.c.plan_key == plan_key)).rowcount > 0 or None


# -- subscriptions --------------------------------------------------------------------------


def subscription_in(conn: Connection, org: str) -> Subscription | None:
    row = conn.execute(
        select(subscriptions, plans.c.period.label("unit"))
        .join(plans, plans.c.plan_key == subscriptions.c.plan_key)
        .where(subscriptions.c.organization_id == org)
    ).first()
    return None if row is None else subscription_from_row(row, row.unit)


def subscribe_in(
    conn: Connection,
    dialect: str,
    org: str,
    plan_key: str,
    *,
    anchor: datetime | None,
    keep: bool,
    now: datetime,
    notify: bool = False,
) -> tuple[Subscription, list[Issued]] | None:
    """Subscribe ``org`` to ``plan_key`` (None: no such plan) and grant the period ``now``
    is in at once (nothing while ``anchor`` is ahead). Already on that plan (and no new
    anchor asked for): nothing changes. On another plan: that one ends now, its allowance
    and rollover written off unless ``keep`` (then they last to their own end)."""
    plan = plan_in(conn, plan_key, share=True)
    if plan is None:
        return None
    conn.execute(
        upsert(dialect)(accounts)
        .values(organization_id=org, balance=0, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=[accounts.c.organization_id])
    )
    lock_account(conn, org, now)
    current = subscription_in(conn, org)
    if current is not None:
        if current.plan_key == plan_key and anchor is None:
            return current, []
        end_subscription_in(conn, current, keep=keep, now=now, why="its plan changed")
    start = now.replace(microsecond=0) if anchor is None else anchor  # a default anchor reads well
    unit: PeriodUnit = plan.period  # type: ignore[assignment]
    first = period_index(start, unit, now)
    conn.execute(
        insert(subscriptions).values(
            organization_id=org,
            id=str(uuid.uuid4()),
            plan_key=plan_key,
            anchor=start,
            # The period before the one ``now`` is in, so the renewal below grants that one.
            period=first - 1 if first >= 0 else -1,
            renews_at=period_start(start, unit, max(first, 0)),
            grant_id=None,
            rollover_grant_id=None,
            created_at=now,
        )
    )
    issued = renew_in(conn, org, now, locked=True, notify=notify)
    subscription = subscription_in(conn, org)
    assert subscription is not None
    return subscription, issued


def unsubscribe_in(conn: Connection, org: str, *, keep: bool, now: datetime) -> Subscription | None:
    """End ``org``'s subscription (None: it had none): no period is granted after."""
    if lock_account(conn, org, now) is None:
        return None
    current = subscription_in(conn, org)
    if current is not None:
        end_subscription_in(conn, current, keep=keep, now=now, why="its subscription ended")
    return current


def end_subscription_in(conn: Connection, current: Subscription, *, keep: bool, now: datetime, why: str) -> None:
    org = current.organization_id
    conn.execute(delete(subscriptions).where(subscriptions.c.organization_id == org))
    if keep:
        return
    for grant_id in (current.rollover_grant_id, current.grant_id):
        if grant_id is not None:
            end_grant_in(conn, org, grant_id, now, f"grant {grant_id} ended: {why}")


# -- renewals -------------------------------------------------------------------------------


def due_in(conn: Connection, now: datetime, limit: int, org: str | None = None) -> list[str]:
    """Organizations with a period to grant (a read: no lock); only ``org``, if given."""
    query = select(subscriptions.c.organization_id).where(subscriptions.c.renews_at <= now)
    if org is not None:
        query = query.where(subscriptions.c.organization_id == org)
    return [row[0] for row in conn.execute(query.order_by(subscriptions.c.renews_at).limit(limit))]


def renew_in(conn: Connection, org: str, now: datetime, *, locked: bool = False, notify: bool = False) -> list[Issued]:
    """Grant every period of ``org``'s subscription that has started by ``now``, in order."""
    if not locked and lock_account(conn, org, now) is None:
        return []
    row = conn.execute(select(subscriptions).where(subscriptions.c.organization_id == org)).first()
    if row is None or read_datetime(row.renews_at) > now:
        return []
    plan = plan_in(conn, row.plan_key)
    assert plan is not None  # the foreign key
    unit: PeriodUnit = plan.period  # type: ignore[assignment]
    anchor, period = read_datetime(row.anchor), int(row.period)
    grant_id, rollover_id = row.grant_id, row.rollover_grant_id
    issued: list[Issued] = []
    while period_start(anchor, unit, period + 1) <= now:
        period += 1
        start, end = period_start(anchor, unit, period), period_start(anchor, unit, period + 1)
        carried = expired = 0
        if grant_id is not None:
            left = int(conn.execute(select(grants.c.remaining).where(grants.c.id == grant_id)).scalar() or 0)
            if left > 0:
                carried = left if plan.rollover is None else min(left, plan.rollover)
                write_off_in(conn, org, int(grant_id), left, now, f"grant {grant_id} expired: its period ended")
                expired = left - carried
        rollover_id = None
        if carried:
            rollover_id = _allowance(conn, org, carried, f"{row.id}:{period}:rollover", end, now, _rolled(plan, start))
        grant_id = _allowance(conn, org, plan.credits, f"{row.id}:{period}", end, now, _named(plan, start))
        issued.append(Issued(org, plan.plan_key, period, start, plan.credits, carried, expired))
        if notify:
            data = {"plan_key": plan.plan_key, "period": period, "period_start": start.isoformat()}
            data |= {"credits": plan.credits, "rollover": carried, "expired": expired}
            add_event_in(conn, "allowance.issued", org, data, now)
    conn.execute(
        update(subscriptions)
        .where(subscriptions.c.organization_id == org)
        .values(
            period=period,
            renews_at=period_start(anchor, unit, period + 1),
            grant_id=grant_id,
            rollover_grant_id=rollover_id,
        )
    )
    return issued


def _named(plan: Plan, start: datetime) -> str:
    return f"{plan.name[:400]}: allowance from {start.isoformat()}"


def _rolled(plan: Plan, start: datetime) -> str:
    return f"{plan.name[:400]}: rolled over into the period from {start.isoformat()}"


def _allowance(
    conn: Connection, org: str, credits: int, key: str, expires_at: datetime, now: datetime, reason: str
) -> int | None:
    """Grant an allowance under its period's key; its grant's id (None: the balance is at
    the maximum, so nothing was granted)."""
    outcome = grant_in(
        conn, conn.dialect.name, org, credits, reason, f"plan:{key}", expires_at=expires_at, priority=0, now=now
    )
    if outcome.status is GrantStatus.OVER_LIMIT:
        return None
    lid = conn.execute(
        select(ledger.c.id).where(ledger.c.organization_id == org, ledger.c.idempotency_key == f"plan:{key}")
    ).scalar_one()
    return int(conn.execute(select(grants.c.id).where(grants.c.ledger_id == lid)).scalar_one())


__all__ = [
    "define_plan_in",
    "delete_plan_in",
    "due_in",
    "list_plans_in",
    "plan_in",
    "renew_in",
    "subscribe_in",
    "subscription_in",
    "unsubscribe_in",
]
