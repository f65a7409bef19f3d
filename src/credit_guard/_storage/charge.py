"""A charge: ONE definition per database, and the one way a write body takes one.

* SQLite: ``charge_sqlite`` below, a few statements in the writer's ``BEGIN IMMEDIATE``
  transaction (which is the lock): the conditional debit, its ledger row, its draws from
  the grants, its hold. The writer calls it with raw ``sqlite3`` (the hot path), a write
  body with its SQLAlchemy connection: the same function either way.
* PostgreSQL: the one statement of ``pg_charge.py``, which decides any number of charges
  at once. The store sends it on its asyncpg pool (the hot path); a write body (a job's
  reservation, a surcharge, an idempotent Python call) sends it on its own transaction's
  connection, after taking the account's lock, so the statement's snapshot is the
  committed state and no refusal needs a second look.

Both take the spending rules (live, room, order) from ``spending.py``. ``charge_in`` is
what every write body calls; nothing else in the package writes a charge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, DateTime
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .._clock import utcnow
from ..schema import accounts, grant_moves, grants, holds, ledger
from . import keys, members, spending
from .base import ChargeOutcome, ChargeRequest, ClaimKind, ClaimOutcome, Completion, KeyClaim, MemberCapHit
from .grants import APPLY, LANE, LANE_SPENDABLE, ROOM, lock_account
from .pg_charge import capped_of, statement_args, statement_for

_SQLITE = sqlite_dialect.dialect()
#: A datetime as SQLAlchemy stores it in SQLite (text), bound explicitly: every raw
#: statement then compares like for like with what SQLAlchemy wrote, and nothing reaches
#: sqlite3's default datetime adapter (deprecated since Python 3.12: with warnings as
#: errors it raised inside the writer thread).
store_datetime: Callable[[datetime | None], Any] = DateTime(timezone=True).dialect_impl(_SQLITE).bind_processor(_SQLITE)  # type: ignore[assignment]

#: The conditional debit: it happens only if the room of the live grants in the charge's
#: lane covers the cost, and the member's cap (if it has one) does too.
DEBIT = (
    f"UPDATE {accounts.name} SET balance = balance - :cost, updated_at = :now"
    f" WHERE organization_id = :org AND {ROOM} >= :cost AND NOT {members.CAPPED}"
    f" RETURNING balance, {LANE_SPENDABLE} - :cost"
)
#: The draws: ``:cost`` over the live grants of its lane in spending order, each up to its room.
DRAW = f"""
INSERT INTO {grant_moves.name} (ledger_id, grant_id, amount)
SELECT :lid, id, -take FROM (
    SELECT id, CASE WHEN room < :cost - (run - room) THEN room ELSE :cost - (run - room) END AS take
      FROM (SELECT g.id, {spending.room("g")} AS room,
                   sum({spending.room("g")}) OVER (ORDER BY {spending.order("g")} ROWS UNBOUNDED PRECEDING) AS run
              FROM {grants.name} g
             WHERE g.organization_id = :org AND {spending.has_room("g")} AND {spending.live("g", ":now")}
               AND {LANE}) w
     WHERE run - room < :cost
) t
"""
ENTRY = (
    f"INSERT INTO {ledger.name} (organization_id, kind, amount, balance_after, feature_key, user_id,"
    " request_method, request_path, extra_of, reason, created_at, pool, pool_fallback)"
    " VALUES (:org, 'charge', :amount, :book, :feature, :user, :method, :path, :extra_of, :reason, :now,"
    " :pool, :fallback)"
)
HOLD = f"INSERT INTO {holds.name} (charge_id, expires_at) VALUES (:lid, :until)"

#: Runs one statement with named parameters: ``sqlite3.Connection.execute`` or
#: SQLAlchemy's ``Connection.exec_driver_sql``; the result has fetchone() and lastrowid.
Execute = Callable[[str, Mapping[str, Any]], Any]


def charge_sqlite(execute: Execute, request: ChargeRequest) -> ChargeOutcome:
    """SQLite's charge, inside the writer's transaction (its lock is taken): judged at the
    moment it runs, so no grant is spent after its expiry instant."""
    clock = utcnow()
    now = store_datetime(clock)
    day, month = (store_datetime(start) for start in members.period_starts(clock))
    org, cost, user = request.organization_id, request.credits, request.user_id
    lane = request.lane.params()
    debit = {"org": org, "cost": cost, "now": now, "user": user, "day": day, "month": month, **lane}
    row = execute(DEBIT, debit).fetchone()
    if row is None:
        available = execute(f"SELECT {LANE_SPENDABLE}, {ROOM}", {"org": org, "now": now, **lane}).fetchone()
        cap = members.cap_row(execute, org, user, now, day, month) if user is not None else None
        if cap is not None and int(available[1]) >= cost and cap[1] < cost:  # the cap refused it, not the balance
            return ChargeOutcome(None, int(available[0]), MemberCapHit(user or "", *cap))
        return ChargeOutcome(None, int(available[0]))
    book, spendable = int(row[0]), int(row[1])
    if user is not None and cost:
        execute(members.SPEND, {"org": org, "user": user, "cost": cost, "now": now, "day": day, "month": month})
    entry = execute(
        ENTRY,
        {
            "org": org,
            "amount": -cost,
            "book": book,
            "feature": request.feature_key,
            "user": request.user_id,
            "method": request.request_method,
            "path": request.request_path,
            "extra_of": request.extra_of,
            "reason": request.reason,
            "now": now,
            # A general charge records no lane (NULL, NULL): the common row stays as it was.
            "fallback": request.fallback if request.pool is not None else None,
            "pool": request.pool,
        },
    )
    charge_id = int(entry.lastrowid or 0)
    if cost > 0:
        execute(DRAW, {"lid": charge_id, "org": org, "cost": cost, "now": now, **lane})
        execute(APPLY, {"lid": charge_id})
    if request.hold_until is not None:
        execute(HOLD, {"lid": charge_id, "until": store_datetime(request.hold_until)})
    return ChargeOutcome(charge_id, spendable)


#: A key's row as committed, and whether it stands free at ``:now`` (``keys.py``).
KEY_ROW = (
    f"SELECT {', '.join(keys.FIELDS)}, {keys.reclaimable('k', ':now')} AS free"
    f" FROM {keys.TABLE} k WHERE organization_id = :org AND idempotency_key = :key"
)
CLAIM = (
    f"INSERT INTO {keys.TABLE} ({keys.CLAIM_COLUMNS}) VALUES (:org, :key, :fingerprint, 'running', :charge,"
    " NULL, NULL, NULL, 1, :locked_until, :expires_at, :now)"
    f" ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET {keys.TAKE_OVER}"
)


def claim_and_charge_sqlite(execute: Execute, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
    """SQLite's keyed charge, inside the writer's transaction (its lock is taken, so the
    key read here cannot change before the claim): a taken key is answered from its row;
    otherwise the charge, and only if it is taken the claim, so a refusal leaves the key
    free for the retry after a top-up."""
    org = request.organization_id
    cursor = execute(KEY_ROW, {"org": org, "key": claim.key, "now": store_datetime(claim.now)})
    row = cursor.fetchone()
    if row is not None and not row[-1]:
        # sqlite3's cursor names its columns in ``description``, SQLAlchemy's result in ``keys()``.
        names = list(cursor.keys()) if hasattr(cursor, "keys") else [column[0] for column in cursor.description]
        return ClaimOutcome.for_taken(dict(zip(names, row, strict=True)), claim.fingerprint)
    outcome = charge_sqlite(execute, request)
    if outcome.charge_id is None and request.credits > 0:
        return ClaimOutcome(ClaimKind.INSUFFICIENT, spendable=outcome.spendable, capped=outcome.capped)
    execute(
        CLAIM,
        {
            "org": org,
            "key": claim.key,
            "fingerprint": claim.fingerprint,
            "charge": outcome.charge_id,
            "locked_until": store_datetime(claim.locked_until),
            "expires_at": store_datetime(claim.expires_at),
            "now": store_datetime(claim.now),
        },
    )
    return ClaimOutcome(ClaimKind.CLAIMED, charge_id=outcome.charge_id, spendable=outcome.spendable)


def complete_keys_sqlite(execute: Execute, completions: Sequence[Completion]) -> None:
    """Finish SQLite keys (``keys.COMPLETE``) inside a settlement's transaction, raw or not."""
    for done in completions:
        execute(
            keys.COMPLETE,
            {
                "org": done.organization_id,
                "key": done.idempotency_key,
                "status_code": done.status_code,
                "response_headers": done.response_headers,
                "response_body": done.response_body,
                "body_stored": done.body_stored,
                "expires_at": store_datetime(done.expires_at),
            },
        )


def claim_and_charge_in(conn: Connection, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
    """A keyed charge inside a write body's transaction, by the database's one definition
    (PostgreSQL: the keyed statement, after the account's lock, so the key it reads is
    the committed one and no claim can be lost)."""
    if conn.dialect.name != "postgresql":
        return claim_and_charge_sqlite(conn.exec_driver_sql, request, claim)
    lock_account(conn, request.organization_id, utcnow())
    args = tuple(statement_args([request], [claim], utcnow()))
    (row,) = conn.exec_driver_sql(statement_for([request], keyed=True), args).mappings().all()
    charge_id, spendable = row["charge_id"], int(row["spendable"])
    if row["taken"]:
        return ClaimOutcome.for_taken({f: row[f"key_{f}"] for f in keys.FIELDS}, claim.fingerprint)
    if charge_id is None and request.credits > 0:
        return ClaimOutcome(ClaimKind.INSUFFICIENT, spendable=spendable, capped=capped_of(request, row))
    return ClaimOutcome(ClaimKind.CLAIMED, charge_id=charge_id, spendable=spendable)


def charge_in(conn: Connection, request: ChargeRequest) -> ChargeOutcome:
    """Take a charge inside a write body's transaction, by the database's one definition."""
    if conn.dialect.name == "postgresql":
        # The lock first, in its own statement: the charge's snapshot is then taken after
        # it, so it sees every grant committed before (no refusal on stale grants).
        lock_account(conn, request.organization_id, utcnow())
        args = tuple(statement_args([request], None, utcnow()))
        (row,) = conn.exec_driver_sql(statement_for([request], keyed=False), args).mappings().all()
        charge_id = None if row["charge_id"] is None else int(row["charge_id"])
        return ChargeOutcome(charge_id, int(row["spendable"]), capped_of(request, row))
    return charge_sqlite(conn.exec_driver_sql, request)


__all__ = ["Execute", "charge_in", "charge_sqlite", "claim_and_charge_in", "claim_and_charge_sqlite", "store_datetime"]
