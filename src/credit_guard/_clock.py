"""The one clock: aware UTC datetimes, as the ledger stores them.

Every moment the library judges by (a grant's expiry, a hold's, a key's TTL) comes from
``utcnow``, never from the database's clock, so a test can move time for all of it at
once with ``travel`` (the state machine checks expiry this way).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def utcnow() -> datetime:
    return datetime.now(UTC) + _offset


def travel(by: timedelta) -> None:
    """Move this process's clock forward by ``by`` (tests only); ``reset_travel`` undoes it."""
    global _offset
    _offset += by


def reset_travel() -> None:
    global _offset
    _offset = timedelta(0)
