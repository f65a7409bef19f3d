"""Auto top-ups: the statements that decide, once per crossing, that a top-up runs.

``claim_topup_in`` looks at the spendable balance under the account's lock: below the
line and armed, it moves the row to 'running' (counting the crossing) and the caller runs
the app's charge; at or above the line, a fired row is armed again. Two processes that
look at once queue on the lock, and the second finds it running: one charge per crossing.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update

from ..models import AutoTopup
from ..schema import auto_topups
from .base import GENERAL
from .grants import lock_account, read_datetime, spendable_in
from .writes import upsert

T = auto_topups.c


def topup_from_row(row: Any) -> AutoTopup:
    when = None if row.last_run_at is None else read_datetime(row.last_run_at)
    return AutoTopup(
        row.organization_id,
        int(row.below),
        int(row.credits),
        row.state,
        int(row.crossings),
        row.last_result,
        row.last_error,
        when,
    )


def set_topup_in(conn: Connection, dialect: str, org: str, below: int, credits: int, now: datetime) -> AutoTopup:
    """Create or change the organization's auto top-up; a change arms it again."""
    values = {"below": below, "credits": credits, "state": "armed", "lease_until": None, "updated_at": now}
    conn.execute(
        upsert(dialect)(auto_topups)
        .values(organization_id=org, line_id=uuid.uuid4().hex, crossings=0, **values)
        .on_conflict_do_update(index_elements=[T.organization_id], set_=values)
    )
    found = topup_in(conn, org)
    assert found is not None
    return found


def topup_in(conn: Connection, org: str) -> AutoTopup | None:
    row = conn.execute(select(auto_topups).where(T.organization_id == org)).first()
    return None if row is None else topup_from_row(row)


def remove_topup_in(conn: Connection, org: str) -> bool:
    return bool(conn.execute(delete(auto_topups).where(T.organization_id == org)).rowcount)


def topup_lines_in(conn: Connection) -> dict[str, int]:
    """Every organization's line (``below``): what a process watches balances against."""
    return {row.organization_id: int(row.below) for row in conn.execute(select(T.organization_id, T.below))}


def claim_topup_in(conn: Connection, org: str, now: datetime, lease_until: datetime) -> tuple[int, int, str] | None:
    """``(crossing, credits, key)`` when this caller is to run the top-up; None otherwise.
    The key (``auto-topup:<line>:<crossing>``) is the same when a dead runner's crossing
    is run again, and never an earlier line's: a line removed and set again is a new line."""
    # The account's lock FIRST, then the line: read before the lock, two claimers racing on
    # PostgreSQL both saw it 'armed' and both ran the same crossing (the second one's row
    # was the snapshot from before the first one's commit).
    if lock_account(conn, org, now) is None:
        return None
    row = conn.execute(select(auto_topups).where(T.organization_id == org)).first()
    if row is None:
        return None
    spendable = spendable_in(conn, org, now, GENERAL)  # what general features spend: what a top-up buys
    where = T.organization_id == org
    if spendable >= int(row.below):
        if row.state == "fired":
            conn.execute(update(auto_topups).where(where).values(state="armed", updated_at=now))
        return None
    lease = None if row.lease_until is None else read_datetime(row.lease_until)
    if row.state == "armed":
        crossing = int(row.crossings) + 1
    elif row.state == "running" and lease is not None and lease <= now:
        crossing = int(row.crossings)  # its runner died: run it again, under the same crossing (and key)
    else:
        return None
    conn.execute(
        update(auto_topups)
        .where(where)
        .values(state="running", crossings=crossing, lease_until=lease_until, last_run_at=now, updated_at=now)
    )
    return crossing, int(row.credits), f"auto-topup:{row.line_id}:{crossing}"


def finish_topup_in(
    conn: Connection, org: str, crossing: int, result: str | None, error: str | None, now: datetime
) -> None:
    """Record a run. Its grant usually lifted the balance back over the line while the row
    was still 'running' (a look then changes nothing), so the finish arms it again itself
    when the balance is at or above the line now; else it stays 'fired' until it is."""
    lock_account(conn, org, now)
    row = conn.execute(select(T.below).where(T.organization_id == org)).first()
    above = row is not None and spendable_in(conn, org, now, GENERAL) >= int(row.below)
    conn.execute(
        update(auto_topups)
        .where(T.organization_id == org, T.crossings == crossing, T.state == "running")
        .values(
            state="armed" if above else "fired",
            lease_until=None,
            last_result=result,
            last_error=error,
            updated_at=now,
        )
    )
