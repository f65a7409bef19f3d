"""Grants: where an organization's credits are kept, and the statements that move them.

An account's credits are the ``remaining`` of its grants. A charge draws from the *live*
ones (not expired at the charge's own ``now``) in spending order: lower ``priority``
first, then the soonest ``expires_at``, never-expiring last, then the oldest; the
account's overdraft line (a grant whose ``floor`` is ``-limit``) comes after all of them.
Every movement of a grant is a row of ``grant_moves`` naming the ledger row that caused
it, written first; one statement then applies a ledger row's moves to the grants. So the
draws, refunds, expiries and repayments are each decided in SQL (window sums over the
grants in spending order), and ``audit()`` can prove each grant's ``remaining``.

The statements are plain SQL with ``:name`` parameters: the same text runs on SQLite's
raw ``sqlite3`` fast path and through SQLAlchemy on both databases. Datetimes are bound
as SQLAlchemy stores them (``bind_time``). Every body here runs with the account locked:
on PostgreSQL by ``lock_account`` (a fresh snapshot follows, so the grants read are the
committed ones), on SQLite by the writer's ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Connection, DateTime, Integer, String, TextClause, bindparam, text

from ..models import Grant
from ..schema import accounts, grant_moves, grants, ledger, subscriptions
from . import spending
from .base import Lane
from .outbox_events import add_event_in

A, G, M, L, S = accounts.name, grants.name, grant_moves.name, ledger.name, subscriptions.name

#: Live at ``:now``: a grant stops being spendable at the instant it expires.
LIVE = spending.live("g", ":now")
#: In the lane of a charge of pool ``:pool`` (NULL: general) that may fall back or not (``:fallback``).
LANE = spending.in_lane("g", ":pool", ":fallback")
#: What a charge of that lane may still take: every live grant's room above its floor.
ROOM = (
    f"(SELECT coalesce(sum({spending.room('g')}), 0) FROM {G} g"
    f" WHERE g.organization_id = :org AND {spending.has_room('g')} AND {LIVE} AND {LANE})"
)
#: What the organization can spend now, every pool counted (negative while it owes on its
#: overdraft line): its balance as a client reads it.
SPENDABLE = f"(SELECT coalesce(sum(g.remaining), 0) FROM {G} g WHERE g.organization_id = :org AND {LIVE})"
#: What a charge of lane (``:pool``, ``:fallback``) can spend now: a feature's spendable.
LANE_SPENDABLE = (
    f"(SELECT coalesce(sum(g.remaining), 0) FROM {G} g WHERE g.organization_id = :org AND {LIVE} AND {LANE})"
)

#: A refund's moves: ``:credits`` back to the grants charge ``:charge`` drew from, the
#: last drawn first (so a partial refund undoes the overdraft part first).
GIVE_BACK = f"""
INSERT INTO {M} (ledger_id, grant_id, amount)
SELECT :lid, grant_id, back FROM (
    SELECT grant_id, CASE WHEN drawn < :credits - (run - drawn) THEN drawn ELSE :credits - (run - drawn) END AS back
      FROM (SELECT m.grant_id, -m.amount AS drawn,
                   sum(-m.amount) OVER (ORDER BY {spending.reverse("g")} ROWS UNBOUNDED PRECEDING) AS run
              FROM {M} m JOIN {G} g ON g.id = m.grant_id
             WHERE m.ledger_id = :charge AND m.amount < 0) w
     WHERE run - drawn < :credits
) t
"""
#: Apply ledger row ``:lid``'s moves to its grants (the floor CHECK backs every one).
APPLY = (
    f"UPDATE {G} SET remaining = remaining + (SELECT m.amount FROM {M} m"
    f" WHERE m.ledger_id = :lid AND m.grant_id = {G}.id)"
    f" WHERE id IN (SELECT m.grant_id FROM {M} m WHERE m.ledger_id = :lid)"
)
MOVED = f"SELECT coalesce(sum(amount), 0) FROM {M} WHERE ledger_id = :lid"
#: A new grant repays what the overdraft line owes, first.
REPAY = f"""
INSERT INTO {M} (ledger_id, grant_id, amount)
SELECT :lid, o.id, CASE WHEN -o.remaining < :amount THEN -o.remaining ELSE :amount END
  FROM {G} o WHERE o.organization_id = :org AND o.overdraft AND o.remaining < 0
UNION ALL
SELECT :lid, :grant, -(CASE WHEN -o.remaining < :amount THEN -o.remaining ELSE :amount END)
  FROM {G} o WHERE o.organization_id = :org AND o.overdraft AND o.remaining < 0
"""
#: The repaying grant remembers what it paid (its own move under its own ledger row).
REPAID = (
    f"UPDATE {G} SET repaid = coalesce((SELECT -m.amount FROM {M} m"
    f" WHERE m.ledger_id = :lid AND m.grant_id = :grant), 0) WHERE id = :grant"
)
#: How far refund ``:lid``'s move would lift the overdraft line above zero (None: no line move).
LINE_OVERFLOW = (
    f"SELECT o.id, o.remaining + m.amount FROM {G} o JOIN {M} m ON m.grant_id = o.id AND m.ledger_id = :lid"
    " WHERE o.organization_id = :org AND o.overdraft"
)
#: The grants that repaid the line and have not had it all back, newest repayment first,
#: with what each takes back of ``:over``.
_UNREPAY = f"""
SELECT id, CASE WHEN repaid < :over - (run - repaid) THEN repaid ELSE :over - (run - repaid) END AS back FROM (
    SELECT g.id, g.repaid, sum(g.repaid) OVER (ORDER BY g.id DESC ROWS UNBOUNDED PRECEDING) AS run
      FROM {G} g WHERE g.organization_id = :org AND g.repaid > 0
) w WHERE run - repaid < :over
"""
UNREPAY = f"UPDATE {G} SET repaid = repaid - :amount WHERE id = :grant"
MOVE = f"INSERT INTO {M} (ledger_id, grant_id, amount) VALUES (:lid, :grant, :amount)"
#: Add to a move this ledger row already made (a grant both drawn from and repaid back).
MOVE_MORE = (
    f"INSERT INTO {M} (ledger_id, grant_id, amount) VALUES (:lid, :grant, :amount)"
    f" ON CONFLICT (ledger_id, grant_id) DO UPDATE SET amount = {M}.amount + excluded.amount"
)
LOCK = f"UPDATE {A} SET updated_at = :now WHERE organization_id = :org RETURNING balance"
ADD_GRANT = (
    f"INSERT INTO {G} (organization_id, amount, remaining, floor, overdraft, priority, expires_at, reason,"
    " ledger_id, created_at, repaid, pool)"
    " VALUES (:org, :amount, :amount, 0, false, :priority, :expires_at, :reason, :lid, :now, 0, :pool)"
    " RETURNING id"
)
#: Expired grants still holding credits, but not a subscription's current allowance: its
#: renewal writes that off after carrying its rollover (``plans.renew_in``).
EXPIRED = (
    f"SELECT g.id, g.organization_id, g.remaining FROM {G} g"
    " WHERE g.expires_at IS NOT NULL AND g.expires_at <= :now AND g.remaining > 0 AND NOT g.overdraft"
    f" AND NOT EXISTS (SELECT 1 FROM {S} s WHERE s.grant_id = g.id)"
)

#: Parameter types: SQLAlchemy binds datetimes as it stores them (SQLite) and casts every
#: parameter on asyncpg, which would otherwise guess one type per ``$n`` from its first use.
_TYPES: dict[str, Any] = {
    **dict.fromkeys(("now", "expires_at", "day", "month"), DateTime(timezone=True)),
    **dict.fromkeys(
        ("cost", "credits", "amount", "lid", "charge", "grant", "floor", "id", "balance", "over"), BigInteger()
    ),
    "priority": Integer(),
    **dict.fromkeys(("org", "reason", "user", "pool"), String()),
    "fallback": Boolean(),
}


def sql(statement: str) -> TextClause:
    """``statement`` for SQLAlchemy, each parameter typed."""
    names = set(re.findall(r"(?<![:\w]):([a-z_]+)", statement))
    return text(statement).bindparams(*(bindparam(name, type_=_TYPES[name]) for name in sorted(names)))


_COMPILED: dict[str, TextClause] = {}


def run(conn: Connection, statement: str, **params: Any) -> Any:
    clause = _COMPILED.get(statement)
    if clause is None:
        clause = _COMPILED[statement] = sql(statement)
    return conn.execute(clause, params)


# -- bodies on a SQLAlchemy Connection (both databases) -------------------------------------


def lock_account(conn: Connection, org: str, now: datetime) -> int | None:
    """Lock the account row (the first write of every body that moves its grants)."""
    value = run(conn, LOCK, org=org, now=now).scalar()
    return None if value is None else int(value)


def spendable_in(conn: Connection, org: str, now: datetime, lane: Lane | None = None) -> int:
    """What the organization can spend now: every pool counted, or what a charge of ``lane`` can."""
    if lane is None:
        return int(run(conn, f"SELECT {SPENDABLE}", org=org, now=now).scalar() or 0)
    return int(run(conn, f"SELECT {LANE_SPENDABLE}", org=org, now=now, **lane.params()).scalar() or 0)


def pool_balances_in(conn: Connection, org: str, now: datetime) -> dict[str | None, int]:
    """What each pool's live grants hold (None: general, the overdraft line's debt counted)."""
    rows = run(
        conn,
        f"SELECT g.pool, sum(g.remaining) FROM {G} g WHERE g.organization_id = :org AND {LIVE} GROUP BY g.pool",
        org=org,
        now=now,
    ).all()
    return {row[0]: int(row[1]) for row in rows}


def room_in(conn: Connection, org: str, now: datetime, lane: Lane) -> int:
    return int(run(conn, f"SELECT {ROOM}", org=org, now=now, **lane.params()).scalar() or 0)


def give_back_in(conn: Connection, org: str, charge_id: int, credits: int, refund_id: int, now: datetime) -> None:
    """Return ``credits`` of charge ``charge_id`` to where they came from (refund ``refund_id``).

    To the grants it drew from, the last drawn first. A grant that has expired since gets
    them back as expired: not spendable, and the next ``expire_grants`` writes them off.
    The overdraft line takes back only what it still owes: the rest of its part was paid
    by the grants that repaid the line since, so it goes back to them (newest repayment
    first, each up to what it repaid) and expires with them; the line never holds
    credits, which would never expire. What no draw records (a charge from before grants)
    becomes a never-expiring grant of its own.
    """
    run(conn, GIVE_BACK, lid=refund_id, charge=charge_id, credits=credits)
    left = credits - int(run(conn, MOVED, lid=refund_id).scalar() or 0)
    line = run(conn, LINE_OVERFLOW, lid=refund_id, org=org).first()
    over = 0 if line is None else int(line[1])
    if over > 0:
        run(conn, MOVE_MORE, lid=refund_id, grant=int(line[0]), amount=-over)
        run(conn, f"DELETE FROM {M} WHERE ledger_id = :lid AND amount = 0", lid=refund_id)
        for grant_id, back in run(conn, _UNREPAY, org=org, over=over).all():
            run(conn, MOVE_MORE, lid=refund_id, grant=int(grant_id), amount=int(back))
            run(conn, UNREPAY, grant=int(grant_id), amount=int(back))
            over -= int(back)
        if over:  # impossible while every repayment is recorded: refuse rather than invent credits
            raise RuntimeError(f"refund {refund_id}: {over} credits repaid by no grant")
    run(conn, APPLY, lid=refund_id)
    if left > 0:
        reason = f"refund of charge {charge_id}, made before grants"
        add_grant_in(conn, org, left, ledger_id=refund_id, now=now, reason=reason, repay=False)


def add_grant_in(
    conn: Connection,
    org: str,
    amount: int,
    *,
    ledger_id: int | None,
    now: datetime,
    priority: int = 0,
    expires_at: datetime | None = None,
    reason: str | None = None,
    repay: bool = True,
    pool: str | None = None,
) -> int:
    """A new grant (after its ledger row); a general one repays the overdraft line's debt
    first (and remembers how much, ``repaid``), unless ``repay`` is False. A pool's grant
    never does: its credits are for that pool's features, and the line is general."""
    result = run(
        conn,
        ADD_GRANT,
        org=org,
        amount=amount,
        priority=priority,
        expires_at=expires_at,
        reason=reason,
        lid=ledger_id,
        now=now,
        pool=pool,
    )
    grant_id = int(result.scalar_one())
    if repay and pool is None and ledger_id is not None and amount > 0 and (expires_at is None or expires_at > now):
        run(conn, REPAY, lid=ledger_id, org=org, grant=grant_id, amount=amount)
        run(conn, APPLY, lid=ledger_id)
        run(conn, REPAID, lid=ledger_id, grant=grant_id)
    return grant_id


def expiring_in(conn: Connection, now: datetime, limit: int = 1000) -> list[str]:
    """Organizations holding credits in grants expired at ``now`` (a read: no lock)."""
    return sorted({str(row[1]) for row in run(conn, EXPIRED + f" LIMIT {int(limit)}", now=now)})


def expire_in(conn: Connection, org: str, now: datetime, notify: bool = False) -> list[tuple[str, int, int, int]]:
    """Write off what the organization's expired grants still hold: one 'expiry' ledger row
    per grant. Returns ``(organization, grant id, credits, spendable after)`` per grant.
    One organization per transaction, so a month-end sweep never holds many accounts'
    locks (or SQLite's write lock) for long."""
    if lock_account(conn, org, now) is None:
        return []
    expired = run(conn, EXPIRED + " AND g.organization_id = :org ORDER BY g.id", org=org, now=now).all()
    for grant_id, _, remaining in expired:
        write_off_in(conn, org, int(grant_id), int(remaining), now, f"grant {grant_id} expired")
    spendable = spendable_in(conn, org, now)
    if notify:  # the webhook's events, in this transaction (``outbox.py``)
        for grant_id, _, remaining in expired:
            data = {"grant_id": int(grant_id), "credits": int(remaining), "balance": spendable}
            add_event_in(conn, "grant.expired", org, data, now)
    return [(org, int(grant_id), int(remaining), spendable) for grant_id, _, remaining in expired]


def write_off_in(conn: Connection, org: str, grant_id: int, credits: int, now: datetime, reason: str) -> None:
    """Take ``credits`` out of grant ``grant_id`` for good: an 'expiry' ledger row and its
    move (the account locked by the caller)."""
    balance = run(
        conn,
        f"UPDATE {A} SET balance = balance - :credits WHERE organization_id = :org RETURNING balance",
        credits=credits,
        org=org,
    ).scalar_one()
    entry = run(
        conn,
        f"INSERT INTO {L} (organization_id, kind, amount, balance_after, reason, created_at)"
        " VALUES (:org, 'expiry', :amount, :balance, :reason, :now) RETURNING id",
        org=org,
        amount=-credits,
        balance=int(balance),
        reason=reason,
        now=now,
    ).scalar_one()
    run(conn, MOVE, lid=int(entry), grant=grant_id, amount=-credits)
    run(conn, APPLY, lid=int(entry))


def end_grant_in(conn: Connection, org: str, grant_id: int, now: datetime, reason: str) -> int:
    """End grant ``grant_id`` at ``now`` (an earlier expiry stands) and write off what it
    holds; returns that. From then on it is expired like any other: a refund that comes
    back to it later is written off by the sweep, never spent."""
    run(
        conn,
        f"UPDATE {G} SET expires_at = :now WHERE id = :id AND (expires_at IS NULL OR expires_at > :now)",
        id=grant_id,
        now=now,
    )
    left = int(run(conn, f"SELECT remaining FROM {G} WHERE id = :id", id=grant_id).scalar() or 0)
    if left > 0:
        write_off_in(conn, org, grant_id, left, now, reason)
    return left


def set_overdraft_in(conn: Connection, org: str, limit: int, now: datetime) -> None:
    """The account's overdraft line at ``-limit`` (made with the account if need be).

    Raises ValueError when the organization owes more than ``limit`` (the floor CHECK).
    """
    run(
        conn,
        f"INSERT INTO {A} (organization_id, balance, created_at, updated_at) VALUES (:org, 0, :now, :now)"
        " ON CONFLICT (organization_id) DO NOTHING",
        org=org,
        now=now,
    )
    lock_account(conn, org, now)
    line = run(conn, f"SELECT id, remaining FROM {G} WHERE organization_id = :org AND overdraft", org=org).first()
    if line is None:
        run(
            conn,
            f"INSERT INTO {G} (organization_id, amount, remaining, floor, overdraft, priority, reason, created_at)"
            " VALUES (:org, 0, 0, :floor, true, 0, 'overdraft', :now)",
            org=org,
            floor=-limit,
            now=now,
        )
        return
    if int(line.remaining) < -limit:
        raise ValueError(f"{org!r} owes {-int(line.remaining)} credits: the limit cannot go below that")
    run(conn, f"UPDATE {G} SET floor = :floor WHERE id = :id", floor=-limit, id=int(line.id))


def overdraft_in(conn: Connection, org: str) -> tuple[int, int]:
    """``(limit, owed)`` of the account's overdraft line ((0, 0) without one)."""
    line = run(conn, f"SELECT floor, remaining FROM {G} WHERE organization_id = :org AND overdraft", org=org).first()
    if line is None:
        return 0, 0
    return -int(line.floor), max(0, -int(line.remaining))


def read_datetime(value: Any) -> Any:
    """A timestamp as read through ``text()``: SQLite gives SQLAlchemy's stored text, naive; UTC-aware either way."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def list_grants_in(conn: Connection, org: str, now: datetime) -> list[Grant]:
    """The organization's grants: live ones with credits left first, in spending order,
    then the spent and expired ones, newest first. The overdraft line is not a grant."""
    rows = run(
        conn,
        f"SELECT g.id, g.amount, g.remaining, g.expires_at, g.priority, g.reason, g.created_at, g.pool,"
        f" CASE WHEN g.remaining > 0 AND {LIVE} THEN 0 ELSE 1 END AS spent"
        f" FROM {G} g WHERE g.organization_id = :org AND NOT g.overdraft",
        org=org,
        now=now,
    ).all()
    items = [
        (
            int(row.spent),
            Grant(
                id=int(row.id),
                amount=int(row.amount),
                remaining=int(row.remaining),
                expires_at=read_datetime(row.expires_at),
                priority=int(row.priority),
                reason=row.reason,
                created_at=read_datetime(row.created_at),
                pool=row.pool,
            ),
        )
        for row in rows
    ]
    live = sorted(
        (grant for spent, grant in items if not spent),
        key=lambda g: (g.pool is None, g.priority, g.expires_at is None, g.expires_at or now, g.id),
    )
    done = sorted((grant for spent, grant in items if spent), key=lambda g: -g.id)
    return live + done
