"""The outbox: events for the app's webhook endpoint, and the balance states behind alerts.

An event row is written by the transaction of what it tells (``add_event_in``), so the
event exists if and only if that happened, whatever dies after. Senders claim due rows
with a lease (one conditional UPDATE: two senders never claim one row at once; a sender
killed mid-delivery leaves a lease that runs out, and the row is sent again, under the
same ``event_id``), then mark each delivered or put it off with a backoff.

A balance alert is a change of an organization's state (``watch_in``: 'ok', 'low',
'empty'), decided under the account's lock from the spendable balance at that moment,
so each crossing is one event however many processes look at once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from ..schema import balance_alerts, outbox
from .base import GENERAL
from .grants import lock_account, spendable_in
from .outbox_events import add_event_in

#: (old state, new state) -> the event it is. Empty -> low tells nothing: still short.
_CROSSINGS = {
    ("ok", "low"): "balance.low",
    ("ok", "empty"): "balance.empty",
    ("low", "empty"): "balance.empty",
    ("low", "ok"): "balance.recovered",
    ("empty", "ok"): "balance.recovered",
}


def claim_in(conn: Connection, now: datetime, lease_until: datetime, limit: int) -> list[tuple[int, str, str, int]]:
    """Claim up to ``limit`` due events until ``lease_until``: ``(id, event id, payload,
    attempts)``, oldest first. The condition is checked again on each row as it is
    updated, so a row another sender claimed first is skipped."""
    due = select(outbox.c.id).where(outbox.c.next_attempt_at <= now).order_by(outbox.c.id).limit(limit)
    rows = conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(due.scalar_subquery()), outbox.c.next_attempt_at <= now)
        .values(next_attempt_at=lease_until, attempts=outbox.c.attempts + 1)
        .returning(outbox.c.id, outbox.c.event_id, outbox.c.payload, outbox.c.attempts)
    ).all()
    return sorted((int(r.id), r.event_id, r.payload, int(r.attempts)) for r in rows)


def delivered_in(conn: Connection, row_id: int, now: datetime) -> None:
    conn.execute(
        update(outbox).where(outbox.c.id == row_id).values(delivered_at=now, next_attempt_at=None, last_error=None)
    )


def failed_in(conn: Connection, row_id: int, retry_at: datetime | None, error: str) -> None:
    """Put a delivery off until ``retry_at`` (None: given up; the row stays, undelivered)."""
    conn.execute(update(outbox).where(outbox.c.id == row_id).values(next_attempt_at=retry_at, last_error=error[:500]))


def watch_in(conn: Connection, org: str, low: int, now: datetime, falling: bool) -> str | None:
    """Where ``org``'s spendable balance stands against ``low``; the event written if it
    crossed a line since the last look. An organization looked at for the first time was
    'ok' if its balance fell (a charge, an expiry): it had been above; after a rise (its
    first grant) there is nothing to tell yet."""
    if lock_account(conn, org, now) is None:
        return None
    spendable = spendable_in(conn, org, now, GENERAL)  # general credits: a pool's are not the balance watched
    state = "empty" if spendable <= 0 else "low" if spendable < low else "ok"
    old = conn.execute(select(balance_alerts.c.state).where(balance_alerts.c.organization_id == org)).scalar()
    if old is None:
        conn.execute(insert(balance_alerts).values(organization_id=org, state=state, updated_at=now))
    elif old != state:
        conn.execute(
            update(balance_alerts).where(balance_alerts.c.organization_id == org).values(state=state, updated_at=now)
        )
    kind = _CROSSINGS.get((old or ("ok" if falling else state), state))
    if kind is not None:
        add_event_in(conn, kind, org, {"balance": spendable, "threshold": low}, now)
    return kind
