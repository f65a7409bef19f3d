"""Writing an event into the outbox, in the transaction of what it tells (``outbox.py``
delivers it). Apart so that any write body may add one without an import cycle."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from ..schema import outbox


def add_event_in(conn: Connection, kind: str, org: str, data: dict[str, Any], now: datetime) -> str:
    """An event in the outbox, in the caller's transaction; its id."""
    event_id = str(uuid.uuid4())
    body = {"id": event_id, "type": kind, "created": now.isoformat(), "organization_id": org, "data": data}
    conn.execute(
        insert(outbox).values(
            event_id=event_id,
            type=kind,
            organization_id=org,
            payload=json.dumps(body, separators=(",", ":")),
            created_at=now,
            next_attempt_at=now,
            attempts=0,
        )
    )
    return event_id
