"""Billing periods: where a plan's n-th period starts, counted from its anchor.

Every start is computed from the anchor itself, never from the previous start, so a
month that clamps does not drag the next ones: anchored on 31 January, the periods start
on 31 January, 28 (or 29) February, 31 March, 30 April. Days and weeks are exact
multiples of 24 hours; months and years keep the anchor's time of day, in UTC.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from typing import Literal, get_args

PeriodUnit = Literal["day", "week", "month", "year"]
PERIOD_UNITS: tuple[str, ...] = get_args(PeriodUnit)
_FIXED = {"day": timedelta(days=1), "week": timedelta(weeks=1)}
_MONTHS = {"month": 1, "year": 12}


def period_start(anchor: datetime, unit: PeriodUnit, n: int) -> datetime:
    """The start of period ``n`` (0 is the anchor's own); period ``n`` ends where ``n + 1`` starts."""
    if unit in _FIXED:
        return anchor + _FIXED[unit] * n
    months = anchor.month - 1 + _MONTHS[unit] * n
    year, month = anchor.year + months // 12, months % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_index(anchor: datetime, unit: PeriodUnit, now: datetime) -> int:
    """The period ``now`` falls in (-1 before the anchor): the largest ``n`` whose start is
    at or before ``now``."""
    if now < anchor:
        return -1
    if unit in _FIXED:
        return (now - anchor) // _FIXED[unit]
    n = ((now.year - anchor.year) * 12 + now.month - anchor.month) // _MONTHS[unit]
    while n > 0 and period_start(anchor, unit, n) > now:
        n -= 1
    while period_start(anchor, unit, n + 1) <= now:
        n += 1
    return n


def check_unit(unit: object) -> PeriodUnit:
    if unit not in PERIOD_UNITS:
        raise ValueError(f"period must be one of {', '.join(PERIOD_UNITS)}, got {unit!r:.40}")
    return unit  # type: ignore[return-value]
