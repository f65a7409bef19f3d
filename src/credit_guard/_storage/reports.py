"""The read-only reports: what ``audit()`` checks and what ``usage_report()`` sums.

Queries only (SQLAlchemy Core, every dialect); ``SqlStore`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, case, cast, func, literal, null, select, text
from sqlalchemy import Date as SqlDate
from sqlalchemy.sql.elements import ColumnElement

from ..models import AuditIssue, BalancePoint, UsageGroup, UsageRow
from ..schema import accounts, grant_moves, grants, holds, ledger, member_limits, reservations
from . import spending


def audit_queries() -> dict[str, Select[Any]]:
    """Each way the books can fail to add up, as a query of the rows that fail it (the
    list, with why each holds, is in docs/architecture.md: "What audit() proves")."""
    sums = (
        select(ledger.c.organization_id, func.sum(ledger.c.amount).label("total"))
        .group_by(ledger.c.organization_id)
        .subquery()
    )
    total = func.coalesce(sums.c.total, 0)
    mismatched = (
        select(accounts.c.organization_id, accounts.c.balance, total.label("total"))
        .select_from(accounts.outerjoin(sums, sums.c.organization_id == accounts.c.organization_id))
        .where(accounts.c.balance != total)
    )
    orphans = (
        select(sums.c.organization_id, sums.c.total)
        .select_from(sums.outerjoin(accounts, sums.c.organization_id == accounts.c.organization_id))
        .where(accounts.c.organization_id.is_(None))
    )
    charge = ledger.alias("charge")
    bad_refunds = (
        select(ledger.c.organization_id, ledger.c.id)
        .select_from(ledger.outerjoin(charge, charge.c.id == ledger.c.refund_of))
        .where(
            ledger.c.kind == "refund",
            (charge.c.id.is_(None))
            | (charge.c.kind != "charge")
            | (charge.c.organization_id != ledger.c.organization_id)
            # A partial refund (unused reserve) may be smaller than its charge, never larger.
            | (literal(0) - charge.c.amount < ledger.c.amount),
        )
    )
    bad_extras = (
        select(ledger.c.organization_id, ledger.c.id)
        .select_from(ledger.outerjoin(charge, charge.c.id == ledger.c.extra_of))
        .where(
            ledger.c.extra_of.isnot(None),
            (charge.c.id.is_(None))
            | (charge.c.kind != "charge")
            | (charge.c.extra_of.isnot(None))
            | (charge.c.organization_id != ledger.c.organization_id),
        )
    )
    refund = ledger.alias("refund")
    bad_holds = (
        select(holds.c.charge_id, charge.c.organization_id)
        .select_from(
            holds.outerjoin(charge, charge.c.id == holds.c.charge_id).outerjoin(
                refund, refund.c.refund_of == holds.c.charge_id
            )
        )
        .where((charge.c.id.is_(None)) | (charge.c.kind != "charge") | (refund.c.id.isnot(None)))
    )
    moved = (
        select(grant_moves.c.grant_id, func.sum(grant_moves.c.amount).label("moved"))
        .group_by(grant_moves.c.grant_id)
        .subquery()
    )
    bad_grants = (
        select(grants.c.organization_id, grants.c.id, grants.c.remaining, grants.c.amount)
        .select_from(grants.outerjoin(moved, moved.c.grant_id == grants.c.id))
        .where(grants.c.remaining != grants.c.amount + func.coalesce(moved.c.moved, 0))
    )
    # A grant never holds more than it was granted (the overdraft line, granted 0, never
    # holds credits): what a refund gives back beyond the line's debt belongs to the
    # grants that repaid it. Credits that outlived their grant would show here.
    over_granted = select(grants.c.organization_id, grants.c.id, grants.c.remaining, grants.c.amount).where(
        grants.c.remaining > grants.c.amount
    )
    repay = grant_moves.alias("repay")
    repaid_move = (
        select(literal(0) - repay.c.amount)
        .where(repay.c.ledger_id == grants.c.ledger_id, repay.c.grant_id == grants.c.id, repay.c.amount < 0)
        .scalar_subquery()
    )
    # What a grant still counts as repaid is never more than it repaid when it was made.
    bad_repaid = select(grants.c.organization_id, grants.c.id, grants.c.repaid).where(
        (grants.c.repaid < 0) | (grants.c.repaid > func.coalesce(repaid_move, 0))
    )
    row_moves = (
        select(grant_moves.c.ledger_id, func.sum(grant_moves.c.amount).label("moved"))
        .group_by(grant_moves.c.ledger_id)
        .subquery()
    )
    made = (
        select(grants.c.ledger_id, func.sum(grants.c.amount).label("made"))
        .where(grants.c.ledger_id.isnot(None))
        .group_by(grants.c.ledger_id)
        .subquery()
    )
    # Every ledger row that touched the grants moved exactly its amount through them: what
    # it drew, gave back, repaid or wrote off, plus the grant it created.
    unmoved = (
        select(ledger.c.organization_id, ledger.c.id, ledger.c.amount)
        .select_from(
            ledger.outerjoin(row_moves, row_moves.c.ledger_id == ledger.c.id).outerjoin(
                made, made.c.ledger_id == ledger.c.id
            )
        )
        .where(
            (row_moves.c.ledger_id.isnot(None)) | (made.c.ledger_id.isnot(None)),
            func.coalesce(row_moves.c.moved, 0) + func.coalesce(made.c.made, 0) != ledger.c.amount,
        )
    )
    kept = (
        select(grants.c.organization_id, func.sum(grants.c.remaining).label("kept"))
        .group_by(grants.c.organization_id)
        .subquery()
    )
    unkept = (
        select(accounts.c.organization_id, accounts.c.balance, func.coalesce(kept.c.kept, 0).label("kept"))
        .select_from(accounts.outerjoin(kept, kept.c.organization_id == accounts.c.organization_id))
        .where(accounts.c.balance != func.coalesce(kept.c.kept, 0))
    )
    # A member's cap counts exactly its member's charges (net of their refunds) since it
    # began counting and in its current period: what the charge statements added and the
    # refunds gave back.
    counted = ledger.alias("counted")
    given_back = (
        select(func.coalesce(func.sum(refund.c.amount), 0)).where(refund.c.refund_of == counted.c.id).scalar_subquery()
    )
    in_cap = (
        select(func.coalesce(func.sum(literal(0) - counted.c.amount - given_back), 0))
        .where(
            counted.c.organization_id == member_limits.c.organization_id,
            counted.c.user_id == member_limits.c.member,
            counted.c.kind == "charge",
            counted.c.created_at >= member_limits.c.since,
            member_limits.c.per.is_(None)
            | (member_limits.c.period_start.isnot(None) & (counted.c.created_at >= member_limits.c.period_start)),
        )
        .scalar_subquery()
    )
    bad_caps = select(
        member_limits.c.organization_id, member_limits.c.member, member_limits.c.used, in_cap.label("counted")
    ).where(member_limits.c.used != in_cap)
    # Every charge drew only from its lane (``spending.in_lane``, the charges' own rule):
    # its pool's grants, and general ones only for a general charge or a pool falling back.
    drawn, lane = grants.alias("g"), ledger.alias("l")
    out_of_lane = (
        select(
            lane.c.organization_id,
            lane.c.id,
            lane.c.pool,
            drawn.c.id.label("grant_id"),
            drawn.c.pool.label("grant_pool"),
        )
        .select_from(
            grant_moves.join(lane, lane.c.id == grant_moves.c.ledger_id).join(
                drawn, drawn.c.id == grant_moves.c.grant_id
            )
        )
        .where(
            lane.c.kind == "charge",
            grant_moves.c.amount < 0,
            text("NOT " + spending.in_lane("g", "l.pool", "l.pool_fallback")),
        )
    )
    return {
        "out_of_lane": out_of_lane,
        "bad_caps": bad_caps,
        "over_granted": over_granted,
        "bad_repaid": bad_repaid,
        "unmoved": unmoved,
        "bad_grants": bad_grants,
        "unkept": unkept,
        "mismatched": mismatched,
        "orphans": orphans,
        "bad_refunds": bad_refunds,
        "bad_extras": bad_extras,
        "bad_holds": bad_holds,
    }


#: How each audit query's rows read as issues, in the order they are reported.
_ISSUES: list[tuple[str, Callable[[Any], AuditIssue]]] = [
    (
        "mismatched",
        lambda r: AuditIssue(r.organization_id, "balance differs from ledger", int(r.balance), int(r.total)),
    ),
    ("orphans", lambda r: AuditIssue(r.organization_id, "ledger rows without an account", None, int(r.total))),
    ("bad_refunds", lambda r: AuditIssue(r.organization_id, f"refund {r.id} does not mirror its charge")),
    ("bad_extras", lambda r: AuditIssue(r.organization_id, f"surcharge {r.id} does not point at a charge")),
    ("bad_holds", lambda r: AuditIssue(r.organization_id or "?", f"hold {r.charge_id} is not an open charge")),
    (
        "bad_grants",
        lambda r: AuditIssue(
            r.organization_id, f"grant {r.id} holds {r.remaining}, not its amount {r.amount} plus its moves"
        ),
    ),
    ("unkept", lambda r: AuditIssue(r.organization_id, "balance differs from its grants", int(r.balance), int(r.kept))),
    (
        "over_granted",
        lambda r: AuditIssue(r.organization_id, f"grant {r.id} holds {r.remaining}, more than its amount {r.amount}"),
    ),
    (
        "bad_repaid",
        lambda r: AuditIssue(r.organization_id, f"grant {r.id} counts {r.repaid} as repaid, more than it repaid"),
    ),
    (
        "unmoved",
        lambda r: AuditIssue(r.organization_id, f"ledger row {r.id} ({r.amount}) is not what it moved in grants"),
    ),
    (
        "bad_caps",
        lambda r: AuditIssue(
            r.organization_id, f"member {r.member!r} has used {r.used} of its cap, its charges say {r.counted}"
        ),
    ),
    (
        "out_of_lane",
        lambda r: AuditIssue(
            r.organization_id,
            f"charge {r.id} of pool {r.pool or 'general'} drew from grant {r.grant_id} of pool {r.grant_pool or 'general'}",
        ),
    ),
]


def audit_in(conn: Connection) -> list[AuditIssue]:
    """Every account whose balance is not the sum of its ledger or of its grants, and
    every malformed refund, overage row, hold or grant."""
    queries = audit_queries()
    return [read(row) for name, read in _ISSUES for row in conn.execute(queries[name])]


def usage_query(
    dialect: str,
    *,
    group_by: UsageGroup,
    organization_id: str | None,
    feature_key: str | None,
    since: datetime | None,
    until: datetime | None,
    split_by: UsageGroup | None = None,
) -> Select[Any]:
    """Charges and refunds per day, feature or organization (and, with ``split_by``, per a
    second of those inside each: a chart's series), newest day / biggest first."""
    key = _usage_key(dialect, group_by, "group_by")
    split = None if split_by is None else _usage_key(dialect, split_by, "split_by")
    if split_by == group_by:
        raise ValueError(f"split_by must differ from group_by ({group_by!r})")
    is_charge = ledger.c.kind == "charge"
    # An overage row (usage beyond the reserve) adds credits to its charge, not a charge.
    is_first_charge = and_(is_charge, ledger.c.extra_of.is_(None))
    is_refund = ledger.c.kind == "refund"
    query = (
        select(
            key.label("key"),
            (split if split is not None else null()).label("split"),
            func.sum(case((is_first_charge, 1), else_=0)).label("charges"),
            func.sum(case((is_charge, -ledger.c.amount), else_=0)).label("credits_charged"),
            func.sum(case((is_refund, 1), else_=0)).label("refunds"),
            func.sum(case((is_refund, ledger.c.amount), else_=0)).label("credits_refunded"),
        )
        .where(ledger.c.kind.in_(("charge", "refund")))
        .group_by(key, *(() if split is None else (split,)))
    )
    if organization_id is not None:
        query = query.where(ledger.c.organization_id == organization_id)
    if feature_key is not None:
        query = query.where(ledger.c.feature_key == feature_key)
    if since is not None:
        query = query.where(ledger.c.created_at >= since)
    if until is not None:
        query = query.where(ledger.c.created_at < until)
    charged = func.sum(case((is_charge, -ledger.c.amount), else_=0))
    query = query.order_by(key.desc()) if group_by == "day" else query.order_by(charged.desc(), key)
    return query if split is None else query.order_by(charged.desc(), split)


def _usage_key(dialect: str, group: str, name: str) -> ColumnElement[Any]:
    if group == "day":
        return _day(dialect, ledger.c.created_at)
    if group == "feature":
        return ledger.c.feature_key
    if group == "org":
        return ledger.c.organization_id
    raise ValueError(f"{name} must be day, feature or org, not {group!r}")


def _day(dialect: str, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The UTC calendar day of a timestamp, as the database computes it."""
    return cast(func.timezone("UTC", column), SqlDate) if dialect == "postgresql" else func.date(column)


def balance_history_query(
    dialect: str, organization_id: str, since: datetime | None, until: datetime | None
) -> Select[Any]:
    """An organization's balance at the end of each day it moved, oldest day first: the
    ``balance_after`` of its last ledger row that day (ids follow the account's row lock,
    so the highest id of a day is the last movement of that day)."""
    day = _day(dialect, ledger.c.created_at)
    last = select(func.max(ledger.c.id)).where(ledger.c.organization_id == organization_id)
    if since is not None:
        last = last.where(ledger.c.created_at >= since)
    if until is not None:
        last = last.where(ledger.c.created_at < until)
    last = last.group_by(day)
    return (
        select(day.label("day"), ledger.c.balance_after)
        .where(ledger.c.id.in_(last.scalar_subquery()))
        .order_by(ledger.c.id)
    )


def usage_row(row: Any) -> UsageRow:
    return UsageRow(
        key=str(row.key),
        split=None if row.split is None else str(row.split),
        charges=int(row.charges or 0),
        credits_charged=int(row.credits_charged or 0),
        refunds=int(row.refunds or 0),
        credits_refunded=int(row.credits_refunded or 0),
    )


def balance_point(row: Any) -> BalancePoint:
    day = row.day if isinstance(row.day, date) else date.fromisoformat(str(row.day))
    return BalancePoint(day=day, balance=int(row.balance_after))


def organizations_query(prefix: str, limit: int) -> Select[Any]:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return (
        select(accounts.c.organization_id, accounts.c.balance)
        .where(accounts.c.organization_id.like(escaped + "%", escape="\\"))
        .order_by(accounts.c.organization_id)
        .limit(limit)
    )


def activity_in(conn: Connection, organization_id: str, limit: int) -> tuple[list[dict[str, Any]], list[Any]]:
    from .reservations import reservation_from_row

    rows = conn.execute(
        select(
            ledger.c.id,
            ledger.c.kind,
            ledger.c.amount,
            ledger.c.balance_after,
            ledger.c.feature_key,
            ledger.c.reason,
            ledger.c.created_at,
        )
        .where(ledger.c.organization_id == organization_id)
        .order_by(ledger.c.id.desc())
        .limit(limit)
    )
    entries = [dict(row._mapping) for row in rows]
    open_jobs = conn.execute(
        select(reservations)
        .where(reservations.c.organization_id == organization_id, reservations.c.state == "open")
        .order_by(reservations.c.created_at)
    )
    return entries, [reservation_from_row(row) for row in open_jobs]
