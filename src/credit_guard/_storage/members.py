"""Member caps inside an organization: the rules as SQL, written once for both databases.

A member (a user id, or an API key id: whatever the request's ``user_id`` is) may have a
cap: at most ``credits`` per UTC day, per UTC calendar month, or in all. Its row in
``credit_guard_member_limits`` counts what the member spent (``used``) in the period that
began at ``period_start``; a charge in a later period counts from 0 again. So the rules are:

* the member's use *now* (``used``): the row's ``used`` while its period is the current
  one, else 0;
* a charge fits the cap when that use plus its cost stays within ``credits``;
* the charge that spends it writes the row in the same statement (PostgreSQL: the batch's
  one statement, the row locked after the account) or transaction (SQLite: the writer's);
* a refund gives the member back what it refunds, if the charge was made in the row's
  current period (a refund of last month's charge frees nothing of this month's cap).

"Now" for the period is the app's clock when the charge was sent (``period_starts``),
passed to both databases as two instants: the day's and the month's start.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from ..models import MemberLimit
from ..schema import ledger, member_limits
from .grants import lock_account, read_datetime, run

T = member_limits
TABLE = member_limits.name
PERIODS = ("day", "month")


def period_starts(now: datetime) -> tuple[datetime, datetime]:
    """The starts of the UTC day and of the UTC calendar month ``now`` falls in."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)


def resets_at(per: str | None, now: datetime) -> datetime | None:
    """When a cap ``per`` period starts again after ``now`` (None: it never does)."""
    if per is None:
        return None
    day, month = period_starts(now)
    if per == "day":
        return day + timedelta(days=1)
    return month.replace(year=month.year + 1, month=1) if month.month == 12 else month.replace(month=month.month + 1)


def current_start(alias: str, day: str, month: str) -> str:
    """The start of the row's current period (NULL for a cap with no period)."""
    return f"(CASE {alias}.per WHEN 'day' THEN {day} WHEN 'month' THEN {month} END)"


def used_now(alias: str, day: str, month: str) -> str:
    """What the member has spent in the current period: 0 once a new one began."""
    return (
        f"(CASE WHEN {alias}.per IS NULL OR {alias}.period_start = {current_start(alias, day, month)}"
        f" THEN {alias}.used ELSE 0 END)"
    )


#: SQLite's charge: whether the member's cap refuses ``:cost`` (named parameters).
CAPPED = (
    f"EXISTS (SELECT 1 FROM {TABLE} m WHERE :cost > 0 AND m.organization_id = :org AND m.member = :user"
    f" AND {used_now('m', ':day', ':month')} + :cost > m.credits)"
)
#: SQLite's charge, once taken: the member's use grows by it (in the current period).
SPEND = (
    f"UPDATE {TABLE} SET used = {used_now(TABLE, ':day', ':month')} + :cost,"
    f" period_start = {current_start(TABLE, ':day', ':month')}, updated_at = :now"
    " WHERE organization_id = :org AND member = :user"
)
#: The cap as it stands for a refused charge: its credits, what is left now, its period.
CAP_ROW = (
    f"SELECT m.credits, m.credits - {used_now('m', ':day', ':month')}, m.per FROM {TABLE} m"
    " WHERE m.organization_id = :org AND m.member = :user"
)
#: A refund: the member gets back what its charge (made in the row's period) refunds.
GIVE_BACK = f"""
UPDATE {TABLE} SET used = CASE WHEN used > :credits THEN used - :credits ELSE 0 END, updated_at = :now
 WHERE organization_id = :org
   AND member = (SELECT c.user_id FROM {ledger.name} c WHERE c.id = :charge)
   AND since <= (SELECT c.created_at FROM {ledger.name} c WHERE c.id = :charge)
   AND (per IS NULL OR period_start <= (SELECT c.created_at FROM {ledger.name} c WHERE c.id = :charge))
"""


def set_limit_in(
    conn: Connection, dialect: str, org: str, member: str, credits: int, per: str | None, now: datetime
) -> MemberLimit:
    """Create or change a member's cap, under the account's lock (the order every charge
    takes: the account, then the member's row). A change of ``credits`` keeps what the
    member spent this period; a change of ``per`` starts counting again."""
    lock_account(conn, org, now)
    row = conn.execute(select(T).where(T.c.organization_id == org, T.c.member == member)).first()
    if row is None:
        conn.execute(
            insert(T).values(
                organization_id=org,
                member=member,
                credits=credits,
                per=per,
                period_start=None,
                used=0,
                since=now,
                updated_at=now,
            )
        )
    else:
        same = row.per == per
        conn.execute(
            update(T)
            .where(T.c.organization_id == org, T.c.member == member)
            .values(
                credits=credits,
                per=per,
                used=row.used if same else 0,
                period_start=row.period_start if same else None,
                since=row.since if same else now,
                updated_at=now,
            )
        )
    found = limits_in(conn, org, now, member)
    return found[0]


def remove_limit_in(conn: Connection, org: str, member: str, now: datetime) -> bool:
    lock_account(conn, org, now)
    return bool(conn.execute(delete(T).where(T.c.organization_id == org, T.c.member == member)).rowcount)


def limits_in(conn: Connection, org: str, now: datetime, member: str | None = None) -> list[MemberLimit]:
    """The organization's member caps (or one member's), each with its use now."""
    query = select(T).where(T.c.organization_id == org).order_by(T.c.member)
    if member is not None:
        query = query.where(T.c.member == member)
    day, month = period_starts(now)
    found = []
    for row in conn.execute(query):
        start = None if row.period_start is None else read_datetime(row.period_start)
        current = {"day": day, "month": month}.get(row.per or "")
        used = int(row.used) if row.per is None or start == current else 0
        found.append(
            MemberLimit(
                org,
                row.member,
                int(row.credits),
                row.per,
                used,
                max(int(row.credits) - used, 0),
                resets_at(row.per, now),
            )
        )
    return found


def give_back_in(conn: Connection, org: str, charge_id: int, credits: int, now: datetime) -> None:
    """A refund of ``credits`` of charge ``charge_id``: its member's cap gets them back."""
    run(conn, GIVE_BACK, org=org, charge=charge_id, credits=credits, now=now)


def left_in(conn: Connection, org: str, member: str | None, now: datetime) -> int | None:
    """What ``member`` may still spend in its current period (None: no cap)."""
    if member is None:
        return None
    day, month = period_starts(now)
    row = run(conn, CAP_ROW, org=org, user=member, day=day, month=month).first()
    return None if row is None else max(int(row[1]), 0)


def cap_row(execute: Any, org: str, member: str, now: Any, day: Any, month: Any) -> tuple[int, int, str | None] | None:
    """(credits, left, per) of the member's cap, on SQLite's raw connection or a body's."""
    row = execute(CAP_ROW, {"org": org, "user": member, "now": now, "day": day, "month": month}).fetchone()
    return None if row is None else (int(row[0]), max(int(row[1]), 0), row[2])


__all__ = [
    "CAPPED",
    "PERIODS",
    "SPEND",
    "TABLE",
    "cap_row",
    "current_start",
    "give_back_in",
    "left_in",
    "limits_in",
    "period_starts",
    "remove_limit_in",
    "resets_at",
    "set_limit_in",
    "used_now",
]
