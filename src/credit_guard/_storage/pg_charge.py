"""The PostgreSQL charge: any number of charges decided in ONE statement, one round trip.

A charge is decided by the database, in arrival order (``ord``), exactly as if the
charges were sent one by one:

1. the accounts are locked, in key order (two batches cannot deadlock); the grants are
   read only after that lock (their scan takes its organization list from the locked
   rows, a value PostgreSQL computes first), and ``FOR UPDATE`` returns each grant as last
   committed, not as the statement's snapshot saw it before the wait;
2. each account's *room* is what its live grants hold above their floor; "live" is
   judged at the moment of the decision, after the lock (``at``: the app's clock when the
   statement was sent plus the time PostgreSQL has spent on it since, so a grant that
   expired while the charge waited for the lock is not spent, and a test clock still
   moves it); a recursive walk accepts each charge only while the room left covers it;
3. the accepted charges (each dated by that moment, ``created_at``), laid end to end,
   are cut across the grants laid end to end in spending order (the overlap of two
   intervals: a charge may span several grants);
4. one UPDATE per account and per grant drawn from, the ledger rows, the grant moves and
   the holds are written by the same statement. Each new value is computed from the row
   as this statement LOCKED it, never from the row as its snapshot saw it: PostgreSQL
   checks a CHECK constraint on the value an UPDATE computes from the snapshot's version
   BEFORE it notices a concurrent update and recomputes, so ``remaining - take`` on a
   version a refund has since changed failed the floor CHECK spuriously (a whole batch
   answered 503) although the recomputed value was fine.

The spending rules (live, room, order) come from ``spending.py``, as SQLite's charge's do.

A refused charge learns what was spendable at its turn (never "costs 5, you have 7"), and
whether the grants it was judged on were stale (see ``stale``): only then does the store
look again, so a 402 is one round trip too.
The keyed variant first claims the idempotency key (or takes over a dead or expired one)
and charges only if the claim succeeded; a claim whose charge is refused aborts the whole
statement (a division by zero), so the key stays free for the retry after a top-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from ..schema import accounts, grant_moves, grants, holds, idempotency_keys, ledger, member_limits
from . import keys, members, spending
from .base import ChargeRequest, KeyClaim, MemberCapHit

#: The statement's parameters, in order: the charges as arrays (``charge_columns``), then
#: the app's clock when it was sent; the keyed variant adds the keys' arrays (``KEY_COLUMNS``).
COLUMNS = (
    "org",
    "cost",
    "feature",
    "user_id",
    "method",
    "path",
    "hold_until",
    "extra_of",
    "reason",
    "pool",
    "fallback",
)
_TYPES = ("text", "bigint", "text", "text", "text", "text", "timestamptz", "bigint", "text", "text", "boolean")
SENT_AT = f"${len(COLUMNS) + 1}::timestamptz"
#: A keyed charge's claim (NULL for a charge without a key): the parameters after the clock.
KEY_COLUMNS = ("key", "fingerprint", "locked_until", "key_expires_at", "claim_now")
_KEY_TYPES = ("text", "text", "timestamptz", "timestamptz", "timestamptz")
#: The key row's fields a taken key is answered with, each ``key_<field>`` in the keyed answer.
KEY_FIELDS = keys.FIELDS

_KEYS = f"""
), k AS MATERIALIZED (
    -- The batch's keys as committed (locked after the accounts: the same gate as the grants).
    SELECT x.organization_id AS org, x.idempotency_key AS key, {", ".join("x." + f for f in KEY_FIELDS)},
           x.locked_until, x.expires_at
      FROM {idempotency_keys.name} x
     WHERE x.organization_id = ANY((SELECT array_agg(organization_id) FROM acct)::text[])
       AND (x.organization_id, x.idempotency_key) IN (SELECT org, key FROM req0 WHERE key IS NOT NULL)
       FOR UPDATE
), req AS (
    -- A key stands free when no request holds it: none yet, a finished one past its TTL, or
    -- a running one whose lock ran out with no open hold (its process died). A request whose
    -- key is taken is not charged: it is answered from the key's row.
    SELECT r.*, k.key IS NOT NULL AND NOT {keys.reclaimable("k", "r.claim_now")} AS taken
      FROM req0 r LEFT JOIN k ON k.org = r.org AND k.key = r.key
), eligible AS (
    SELECT r.ord, r.org, r.cost, r.user_id, row_number() OVER (PARTITION BY r.org ORDER BY r.ord) AS rn
      FROM req r WHERE NOT r.taken"""

_NO_KEYS = """
), req AS (
    SELECT r.*, false AS taken FROM req0 r
), eligible AS (
    SELECT r.ord, r.org, r.cost, r.user_id, row_number() OVER (PARTITION BY r.org ORDER BY r.ord) AS rn
      FROM req r"""

_CLAIMS = f"""
), claims AS (
    INSERT INTO {keys.TABLE} AS x ({keys.CLAIM_COLUMNS})
    SELECT org, key, fingerprint, 'running', charge_id, NULL, NULL, NULL, true, locked_until, key_expires_at, claim_now
      FROM decided WHERE accepted AND key IS NOT NULL
    ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET {keys.TAKE_OVER}
     WHERE {keys.reclaimable("x", "excluded.created_at")}
    RETURNING organization_id
"""

#: The keyed answer: each charge's outcome, a taken key's row, and a guard that aborts the
#: whole statement (a division by zero: nothing written) when a claim was lost to a key a
#: concurrent statement committed after this one's snapshot: the store then decides those
#: charges again, one by one, with a fresh snapshot.
_KEYED_ANSWER = f"""
SELECT d.charge_id, d.spendable, d.stale, r.taken, {", ".join(f"k.{f} AS key_{f}" for f in KEY_FIELDS)},
       d.capped, d.member_cap, d.member_left, d.member_per,
       -- (the divisor is computed, never a constant: PostgreSQL folds constants at plan time)
       (SELECT 1 / (count(*) = (SELECT count(*) FROM claims))::int
          FROM decided WHERE accepted AND key IS NOT NULL) AS claims_kept
  FROM decided d JOIN req r ON r.ord = d.ord LEFT JOIN k ON k.org = r.org AND k.key = r.key
 ORDER BY d.ord
"""


_PLAIN_ANSWER = (
    "SELECT charge_id, spendable, stale, capped, member_cap, member_left, member_per FROM decided ORDER BY ord"
)


#: Whether a charge fits its organization's room left, and its member's cap (none: fits).
_FITS = "(r.cost <= w.room - w.spent)"
_MSPENT = "coalesce((w.mspent->>r.user_id)::bigint, 0)"
_WITHIN = f"(m.member IS NULL OR r.cost = 0 OR r.cost <= m.cap - m.used - {_MSPENT})"


def _members_cte(day: str, month: str) -> str:
    return f"""), m AS MATERIALIZED (
    -- The members' caps the batch's charges touch, locked after the grants, each with its
    -- use in the current period (``members.py``); read as last committed, like the grants.
    SELECT x.organization_id AS org, x.member, x.credits AS cap, x.per,
           {members.current_start("x", day, month)} AS period, {members.used_now("x", day, month)} AS used
      FROM {member_limits.name} x
     WHERE x.organization_id = ANY((SELECT array_agg(organization_id) FROM acct)::text[])
       AND (x.organization_id, x.member) IN (SELECT org, user_id FROM req0 WHERE user_id IS NOT NULL)
       FOR UPDATE
"""


def _no_members(day: str, month: str) -> str:
    """No member named: an empty ``m`` of the same shape (the day and month still typed)."""
    return f"""), m AS (
    SELECT NULL::text AS org, NULL::text AS member, NULL::bigint AS cap, NULL::text AS per,
           {day} AS period, NULL::bigint AS used WHERE {month} IS NULL AND false
"""


_SPEND = f"""), spend AS (
    -- Each capped member's use grows by what it was charged, from the row as locked above.
    UPDATE {member_limits.name} x SET used = t.used + t.total, period_start = t.period, updated_at = now()
      FROM (SELECT m.org, m.member, min(m.used) AS used, min(m.period) AS period, sum(d.cost) AS total
              FROM decided d JOIN m ON m.org = d.org AND m.member = d.user_id
             WHERE d.accepted GROUP BY m.org, m.member) t
     WHERE x.organization_id = t.org AND x.member = t.member
"""


def charge_statement(*, keyed: bool = False, members: bool = True, pools: bool = True) -> str:
    """The statement: ``$1..$11`` are arrays (``COLUMNS``), ``$12`` the app's clock when it
    was sent; the keyed variant adds ``$13..$17`` (``KEY_COLUMNS``), NULL where a charge
    has no key. Every charge of one organization in a batch is of one lane (its pool and
    fallback: ``pg_decide`` splits a batch that mixes them), so the grants read for an
    organization are exactly its charges' lane's. A batch never names one key twice (the batcher keeps twins apart). Last,
    the starts of that clock's UTC day and month (``members.period_starts``).

    ``members=False``: for a batch whose charges name no member (no ``user_id``), so no
    cap can apply: the same statement without reading or writing the caps table (its
    relation is not even opened), which a plain charge would otherwise pay for.
    ``pools=False``: for a batch whose charges are all of the general pool: its grants are
    the organization's general ones (``pool IS NULL``, an index condition), not a match of
    every grant against the batch's lanes."""
    clock = len(COLUMNS) + 1
    first = clock + 1 + (len(KEY_COLUMNS) if keyed else 0)
    # Without members the walk is the room alone: no cap to be within, nothing to count.
    within = _WITHIN if members else "true"
    lane = (
        f"EXISTS (SELECT 1 FROM req0 l WHERE l.org = x.organization_id AND {spending.in_lane('x', 'l.pool', 'l.fallback')})"
        if pools
        else spending.in_lane("x", "NULL", "NULL")
    )
    mspent = (
        f"CASE WHEN {_FITS} AND {_WITHIN} AND m.member IS NOT NULL"
        f" THEN jsonb_set(w.mspent, ARRAY[r.user_id], to_jsonb({_MSPENT} + r.cost)) ELSE w.mspent END"
        if members
        else "w.mspent"
    )
    day, month = f"${first}::timestamptz", f"${first + 1}::timestamptz"
    columns = COLUMNS + KEY_COLUMNS if keyed else COLUMNS
    numbered = list(enumerate(_TYPES, start=1)) + (list(enumerate(_KEY_TYPES, start=clock + 1)) if keyed else [])
    arrays = ", ".join(f"${n}::{kind}[]" for n, kind in numbered)
    new_id = f"nextval(pg_get_serial_sequence('{ledger.name}', 'id'))"
    keyed_fields = ", r.key, r.fingerprint, r.locked_until, r.key_expires_at, r.claim_now" if keyed else ""
    return f"""
WITH RECURSIVE req0 AS (
    SELECT r.* FROM unnest({arrays}) WITH ORDINALITY AS r({", ".join(columns)}, ord)
), acct AS MATERIALIZED (
    SELECT organization_id, balance FROM {accounts.name}
     WHERE organization_id IN (SELECT org FROM req0)
     ORDER BY organization_id
       FOR UPDATE
{_KEYS if keyed else _NO_KEYS}
), at AS MATERIALIZED (
    -- The moment of the decision: after every account lock above was granted.
    SELECT {SENT_AT} + (clock_timestamp() - statement_timestamp()) AS now FROM (SELECT count(*) FROM acct) locked
), g AS MATERIALIZED (
    SELECT x.id, x.organization_id AS org, x.remaining, x.floor, x.overdraft, x.priority, x.expires_at, x.pool
      FROM {grants.name} x
     WHERE x.organization_id = ANY((SELECT array_agg(organization_id) FROM acct)::text[])
       AND {spending.live("x", "(SELECT now FROM at)")}
       AND ({spending.has_room("x")} OR x.remaining <> 0)
       AND {lane}
       FOR UPDATE
{_members_cte(day, month) if members else _no_members(day, month)}), totals AS (
    SELECT g.org, coalesce(sum({spending.room("g")}) FILTER (WHERE {spending.has_room("g")}), 0)::bigint AS room,
           sum(g.remaining)::bigint AS spendable
      FROM g GROUP BY g.org
), walk(org, rn, room, spent, mspent, accepted, capped) AS (
    -- Each organization's charges in arrival order: taken while the room left covers it
    -- and its member's cap (less what this batch already gave that member) does too.
    SELECT a.organization_id, 0::bigint, coalesce(t.room, 0), 0::bigint, {"'{}'::jsonb" if members else "NULL::jsonb"},
           false, false
      FROM acct a LEFT JOIN totals t ON t.org = a.organization_id
    UNION ALL
    SELECT w.org, r.rn, w.room,
           w.spent + CASE WHEN {_FITS} AND {within} THEN r.cost ELSE 0 END,
           {mspent},
           {_FITS} AND {within},
           {_FITS} AND NOT {within}
      FROM walk w JOIN eligible r ON r.org = w.org AND r.rn = w.rn + 1
      LEFT JOIN m ON m.org = r.org AND m.member = r.user_id
), decided AS MATERIALIZED (
    SELECT r.ord, r.org, r.cost, r.feature, r.user_id, r.method, r.path, r.hold_until, r.extra_of, r.reason,
           r.pool, CASE WHEN r.pool IS NOT NULL THEN r.fallback END AS fallback{keyed_fields},
           coalesce(w.accepted, false) AS accepted, coalesce(w.spent, 0) AS spent,
           coalesce(w.capped, false) AS capped, m.cap AS member_cap, m.per AS member_per,
           greatest(m.cap - m.used - coalesce((w.mspent->>r.user_id)::bigint, 0), 0) AS member_left,
           a.balance - coalesce(w.spent, 0) AS book,
           coalesce(t.spendable, 0) - coalesce(w.spent, 0) AS spendable,
           CASE WHEN w.accepted THEN {new_id} END AS charge_id,
           -- A refusal whose grants were read stale: the account row (locked, as last
           -- committed) no longer equals its grants as this statement's snapshot saw them
           -- (a grant committed while it waited for the lock: a new row, which no lock
           -- can show it). Only then is the refusal worth a second look; computed for
           -- refused charges only.
           CASE WHEN NOT coalesce(w.accepted, false) AND NOT coalesce(w.capped, false) AND NOT r.taken
                     AND a.organization_id IS NOT NULL
                THEN a.balance <> (SELECT coalesce(sum(y.remaining), 0) FROM {grants.name} y
                                    WHERE y.organization_id = r.org)
           END AS stale
      FROM req r
      LEFT JOIN eligible e ON e.ord = r.ord
      LEFT JOIN walk w ON w.org = r.org AND w.rn = e.rn
      LEFT JOIN acct a ON a.organization_id = r.org
      LEFT JOIN totals t ON t.org = r.org
      LEFT JOIN m ON m.org = r.org AND m.member = r.user_id
), gw AS (
    SELECT g.id, g.org, g.remaining AS locked, {spending.room("g")} AS groom,
           sum({spending.room("g")}) OVER (PARTITION BY g.org ORDER BY {spending.order("g")} ROWS UNBOUNDED PRECEDING) AS grun
      FROM g WHERE {spending.has_room("g")}
), draws AS MATERIALIZED (
    SELECT d.charge_id, gw.id AS grant_id, gw.locked,
           (least(d.spent, gw.grun) - greatest(d.spent - d.cost, gw.grun - gw.groom))::bigint AS take
      FROM decided d JOIN gw ON gw.org = d.org
     WHERE d.accepted AND least(d.spent, gw.grun) > greatest(d.spent - d.cost, gw.grun - gw.groom)
), debit AS (
    UPDATE {accounts.name} x SET balance = t.book, updated_at = now()
      FROM (SELECT d.org, min(a.balance) - sum(d.cost) AS book
              FROM decided d JOIN acct a ON a.organization_id = d.org WHERE d.accepted GROUP BY d.org) t
     WHERE x.organization_id = t.org
), drawn AS (
    UPDATE {grants.name} x SET remaining = t.locked - t.total
      FROM (SELECT grant_id, min(locked) AS locked, sum(take) AS total FROM draws GROUP BY grant_id) t
     WHERE x.id = t.grant_id
{_SPEND if members else ""}), moves AS (
    INSERT INTO {grant_moves.name} (ledger_id, grant_id, amount) SELECT charge_id, grant_id, -take FROM draws
), entry AS (
    INSERT INTO {ledger.name}
           (id, organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path,
            extra_of, reason, created_at, pool, pool_fallback)
    SELECT charge_id, org, 'charge', -cost, book, feature, user_id, method, path, extra_of, reason,
           (SELECT now FROM at), pool, fallback
      FROM decided WHERE accepted
), hold AS (
    INSERT INTO {holds.name} (charge_id, expires_at)
    SELECT charge_id, hold_until FROM decided WHERE accepted AND hold_until IS NOT NULL
{_CLAIMS if keyed else ""})
{_KEYED_ANSWER if keyed else _PLAIN_ANSWER}
"""


def key_columns(claims: Sequence[KeyClaim | None]) -> list[list[Any]]:
    """The keyed variant's key arrays, in ``KEY_COLUMNS`` order (None for a plain charge)."""
    return [
        [c.key if c else None for c in claims],
        [c.fingerprint if c else None for c in claims],
        [c.locked_until if c else None for c in claims],
        [c.expires_at if c else None for c in claims],
        [c.now if c else None for c in claims],
    ]


def pooled(requests: Iterable[ChargeRequest]) -> bool:
    """Whether any charge of a batch is of a credit pool. None is, most often: then the
    batch takes the general-lane statement and sends no pool arrays."""
    return any(r.pool is not None for r in requests)


def charge_columns(requests: Sequence[ChargeRequest]) -> list[list[Any] | None]:
    """The charges as the statement's arrays, in ``COLUMNS`` order. A batch of general
    charges sends no pool arrays (NULL: ``unnest`` pads every charge's pool with NULL)."""
    lanes = pooled(requests)
    return [
        [r.organization_id for r in requests],
        [r.credits for r in requests],
        [r.feature_key for r in requests],
        [r.user_id for r in requests],
        [r.request_method for r in requests],
        [r.request_path for r in requests],
        [r.hold_until for r in requests],
        [r.extra_of for r in requests],
        [r.reason for r in requests],
        [r.pool for r in requests] if lanes else None,
        [r.fallback for r in requests] if lanes else None,
    ]


def statement_args(
    requests: Sequence[ChargeRequest], claims: Sequence[KeyClaim | None] | None, now: datetime
) -> list[Any]:
    """The statement's parameters in order: the charges, the clock, the keys (keyed
    variant: ``claims`` given), the starts of the clock's day and month."""
    args: list[Any] = [*charge_columns(requests), now]
    if claims is not None:
        args += key_columns(claims)
    return [*args, *members.period_starts(now)]


def capped_of(request: ChargeRequest, row: Any) -> MemberCapHit | None:
    """The member cap that refused the charge of ``row`` (None: not refused by one)."""
    if not row["capped"]:
        return None
    return MemberCapHit(request.user_id or "", int(row["member_cap"]), int(row["member_left"]), row["member_per"])


#: Each variant, made once: (keyed, members, pools); see ``charge_statement``.
STATEMENTS = {
    (keyed, members, pools): charge_statement(keyed=keyed, members=members, pools=pools)
    for keyed in (False, True)
    for members in (False, True)
    for pools in (False, True)
}


def statement_for(requests: Sequence[ChargeRequest], *, keyed: bool) -> str:
    """The statement for a batch: without the caps table when no charge names a member, and
    reading general grants alone when every charge is of the general pool (the plain charge
    pays for neither)."""
    return STATEMENTS[keyed, any(r.user_id is not None for r in requests), pooled(requests)]


#: What a refused charge re-reads in its lane (its statement's snapshot may predate a grant).
ROOM = f"""
SELECT coalesce(sum({spending.room("g")}) FILTER (WHERE {spending.has_room("g")}), 0)::bigint,
       coalesce(sum(g.remaining), 0)::bigint
  FROM {grants.name} g
 WHERE g.organization_id = $1 AND {spending.live("g", "$2::timestamptz")}
   AND {spending.in_lane("g", "$3::text", "$4::boolean")}
"""
