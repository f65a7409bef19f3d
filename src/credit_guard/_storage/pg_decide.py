"""Sending PostgreSQL's charge statement for a batch, and reading each charge's outcome.

One round trip for the lot in the common case. The rare cases each take a second look,
on the same connection, with a fresh snapshot:

* a refusal judged on stale grants (a grant committed while the statement waited for the
  account's lock: a new row, which no lock shows): if the committed grants cover it after
  all, it is decided again;
* a key claim lost to a key a concurrent statement committed after this one's snapshot
  (the statement aborted itself, nothing written): its charges are decided again one by
  one, and the key is then seen as taken;
* a constraint the batch broke (a bug the rules should have prevented; the batch rolled
  back whole): each charge is decided again alone, and only the one that still breaks it
  fails, with IntegrityViolation.

The statement reads one lane of grants per organization (``pg_charge``): a batch in which
one organization's charges are of two lanes (a pool's feature next to a general one) is
sent as several statements, one after the other, each holding one lane per organization.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from .._clock import utcnow
from ..errors import IntegrityViolation
from .base import ChargeOutcome, ChargeRequest, ClaimKind, ClaimOutcome, KeyClaim
from .batching import Item
from .pg_charge import KEY_FIELDS, ROOM, capped_of, pooled, statement_args, statement_for

log = logging.getLogger("credit_guard")

#: What one charge comes to: a ChargeOutcome (plain), a ClaimOutcome (keyed), or the
#: IntegrityViolation it alone ran into.
Outcome = ChargeOutcome | ClaimOutcome | IntegrityViolation
#: How often a keyed charge is decided again after losing its claim before it is answered
#: as in flight (its key is being claimed and freed as fast as it is looked at).
_CLAIM_ATTEMPTS = 3


async def decide(conn: Any, items: Sequence[Item]) -> list[Outcome]:
    """Each charge of ``items`` decided on ``conn`` (asyncpg): one statement, or one per
    lane a single organization's charges mix (rare: each statement is still one batch)."""
    if not pooled(request for request, _ in items):  # all general: the common case
        return await _decide(conn, items)
    runs = one_lane_each(items)
    if len(runs) == 1:
        return await _decide(conn, items)
    outcomes: list[Outcome | None] = [None] * len(items)
    for run in runs:
        for at, outcome in zip(run, await _decide(conn, [items[i] for i in run]), strict=True):
            outcomes[at] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


def one_lane_each(items: Sequence[Item]) -> list[list[int]]:
    """``items``' positions cut into runs in which each organization's charges share one
    lane, in arrival order within each run (the n-th lane an organization shows goes to
    run n)."""
    lanes: dict[str, list[Any]] = {}
    runs: list[list[int]] = []
    for at, (request, _) in enumerate(items):
        seen = lanes.setdefault(request.organization_id, [])
        lane = request.lane
        if lane not in seen:
            seen.append(lane)
        n = seen.index(lane)
        while len(runs) <= n:
            runs.append([])
        runs[n].append(at)
    return runs


async def _decide(conn: Any, items: Sequence[Item], *, attempt: int = 1) -> list[Outcome]:
    """Each charge of ``items`` (one lane per organization) decided by one statement."""
    keyed = any(claim is not None for _, claim in items)
    requests = [request for request, _ in items]
    args = statement_args(requests, [claim for _, claim in items] if keyed else None, utcnow())
    try:
        rows = await conn.fetch(statement_for(requests, keyed=keyed), *args)
    except asyncpg.IntegrityConstraintViolationError as exc:
        if len(items) == 1:
            return [violation(exc)]
        log.error("credit_guard: a batch of %d charges broke a constraint: %s", len(items), exc)
        return [(await _decide(conn, [item]))[0] for item in items]
    except asyncpg.DivisionByZeroError:  # a claim lost: nothing was written
        if len(items) > 1:
            return [(await _decide(conn, [item]))[0] for item in items]
        if attempt < _CLAIM_ATTEMPTS:
            return await _decide(conn, items, attempt=attempt + 1)
        return [ClaimOutcome(ClaimKind.RUNNING, stored={})]
    return [await _outcome(conn, request, claim, row) for (request, claim), row in zip(items, rows, strict=True)]


async def _outcome(conn: Any, request: ChargeRequest, claim: KeyClaim | None, row: Any) -> Outcome:
    charge_id = None if row["charge_id"] is None else int(row["charge_id"])
    spendable = int(row["spendable"])
    if claim is None:
        if row["stale"]:
            return await _second_look(conn, request, None, ChargeOutcome(None, spendable))
        return ChargeOutcome(charge_id, spendable, capped_of(request, row))
    if row["taken"]:
        return ClaimOutcome.for_taken({field: row[f"key_{field}"] for field in KEY_FIELDS}, claim.fingerprint)
    if charge_id is not None:
        return ClaimOutcome(ClaimKind.CLAIMED, charge_id=charge_id, spendable=spendable)
    refused = ClaimOutcome(ClaimKind.INSUFFICIENT, spendable=spendable, capped=capped_of(request, row))
    return await _second_look(conn, request, claim, refused) if row["stale"] else refused


async def _second_look(conn: Any, request: ChargeRequest, claim: KeyClaim | None, refused: Outcome) -> Outcome:
    """A refusal judged on stale grants: decided again if the committed grants cover it."""
    lane = request.lane
    room, _ = await conn.fetchrow(ROOM, request.organization_id, utcnow(), lane.pool, lane.fallback)
    if int(room) < request.credits:
        return refused  # what was spendable at its turn
    return (await _decide(conn, [(request, claim)]))[0]


def violation(exc: BaseException) -> IntegrityViolation:
    log.error("credit_guard: PostgreSQL refused a charge (a constraint, not an outage): %s", exc, exc_info=exc)
    return IntegrityViolation(str(exc))
