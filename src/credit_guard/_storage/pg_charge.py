"""The PostgreSQL charge: any number of charges decided in ONE statement, one round trip.

A charge is decided by the database, in arrival order (``ord``), exactly as if the
charges were sent one by one:

1. the accounts are locked, in key order (two batches cannot deadlock); the grants are
   read only after that lock (their scan takes its organization list from the locked
   rows, a value PostgreSQL computes first), and ``FOR UPDATE`` returns each grant as last
   committed, not as the statement's snapshot saw it before the wait;
2. each account's *room* is what its live grants (not expired at ``$8``) hold above their
   floor; a recursive walk accepts each charge only while the room left covers it;
3. the accepted charges, laid end to end, are cut across the grants laid end to end in
   spending order (the overlap of two intervals: a charge may span several grants);
4. one UPDATE per account and per grant drawn from, the ledger rows, the grant moves and
   the holds are written by the same statement.

A refused charge learns what was spendable at its turn (never "costs 5, you have 7"), and
whether the grants it was judged on were stale (see ``stale``): only then does the store
look again, so a 402 is one round trip too.
The keyed variant first claims the idempotency key (or takes over a dead or expired one)
and charges only if the claim succeeded; a claim whose charge is refused aborts the whole
statement (a division by zero), so the key stays free for the retry after a top-up.
"""

from __future__ import annotations

from ..schema import accounts, grant_moves, grants, holds, idempotency_keys, ledger

_CLAIM = f"""
new_charge AS (
    SELECT nextval(pg_get_serial_sequence('{ledger.name}', 'id')) AS id
), claim AS (
    INSERT INTO {idempotency_keys.name} AS k
           (organization_id, idempotency_key, fingerprint, state, charge_id, status_code,
            response_headers, response_body, body_stored, locked_until, expires_at, created_at)
    SELECT ($1::text[])[1], $9, $10, 'running', id, NULL, NULL, NULL, true,
           $11::timestamptz, $12::timestamptz, $13::timestamptz
      FROM new_charge
    ON CONFLICT (organization_id, idempotency_key) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, state = 'running', charge_id = EXCLUDED.charge_id,
           status_code = NULL, response_headers = NULL, response_body = NULL, body_stored = true,
           locked_until = EXCLUDED.locked_until, expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at
     WHERE (k.state = 'done' AND k.expires_at < $13::timestamptz)
        OR (k.state = 'running' AND k.locked_until < $13::timestamptz
            AND NOT EXISTS (SELECT 1 FROM {holds.name} h WHERE h.charge_id = k.charge_id))
 RETURNING charge_id
),"""

_SPENDING_ORDER = "overdraft, priority, (expires_at IS NULL), expires_at, id"


def charge_statement(*, claim: bool = False) -> str:
    """The statement: ``$1..$7`` are arrays (organization, cost, feature, user, method,
    path, hold until), ``$8`` the moment expiry is judged at; the keyed variant adds the
    key's ``$9..$13`` and takes one charge."""
    new_id = "(SELECT charge_id FROM claim)" if claim else f"nextval(pg_get_serial_sequence('{ledger.name}', 'id'))"
    answer = (
        """SELECT (SELECT charge_id FROM decided WHERE accepted) AS charge_id,
       (SELECT spendable FROM decided) AS balance_after,
       EXISTS (SELECT 1 FROM claim) AS claimed,
       CASE WHEN EXISTS (SELECT 1 FROM claim)
            THEN 1 / (SELECT count(*)::int FROM decided WHERE accepted) END AS abort_if_short"""
        if claim
        else "SELECT charge_id, spendable, stale FROM decided ORDER BY ord"
    )
    return f"""
WITH RECURSIVE {_CLAIM if claim else ""} req AS (
    SELECT r.*, row_number() OVER (PARTITION BY r.org ORDER BY r.ord) AS rn
      FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
           WITH ORDINALITY AS r(org, cost, feature, user_id, method, path, hold_until, ord)
     {"WHERE EXISTS (SELECT 1 FROM claim)" if claim else ""}
), acct AS MATERIALIZED (
    SELECT organization_id, balance FROM {accounts.name}
     WHERE organization_id IN (SELECT org FROM req)
     ORDER BY organization_id
       FOR UPDATE
), g AS MATERIALIZED (
    SELECT id, organization_id AS org, remaining, floor, overdraft, priority, expires_at
      FROM {grants.name}
     WHERE organization_id = ANY((SELECT array_agg(organization_id) FROM acct)::text[])
       AND (expires_at IS NULL OR expires_at > $8::timestamptz)
       AND (remaining > floor OR remaining <> 0)
       FOR UPDATE
), totals AS (
    SELECT org, coalesce(sum(remaining - floor) FILTER (WHERE remaining > floor), 0)::bigint AS room,
           sum(remaining)::bigint AS spendable
      FROM g GROUP BY org
), walk(org, rn, room, spent, accepted) AS (
    SELECT a.organization_id, 0::bigint, coalesce(t.room, 0), 0::bigint, false
      FROM acct a LEFT JOIN totals t ON t.org = a.organization_id
    UNION ALL
    SELECT w.org, r.rn, w.room,
           w.spent + CASE WHEN r.cost <= w.room - w.spent THEN r.cost ELSE 0 END,
           r.cost <= w.room - w.spent
      FROM walk w JOIN req r ON r.org = w.org AND r.rn = w.rn + 1
), decided AS MATERIALIZED (
    SELECT r.ord, r.org, r.cost, r.feature, r.user_id, r.method, r.path, r.hold_until,
           coalesce(w.accepted, false) AS accepted, coalesce(w.spent, 0) AS spent,
           a.balance - coalesce(w.spent, 0) AS book,
           coalesce(t.spendable, 0) - coalesce(w.spent, 0) AS spendable,
           CASE WHEN w.accepted THEN {new_id} END AS charge_id,
           -- A refusal whose grants were read stale: the account row (locked, as last
           -- committed) no longer equals its grants as this statement's snapshot saw them
           -- (a grant or refund committed while it waited for the lock). Only then is the
           -- refusal worth a second look; computed for refused charges only.
           CASE WHEN NOT coalesce(w.accepted, false) AND a.organization_id IS NOT NULL
                THEN a.balance <> (SELECT coalesce(sum(x.remaining), 0) FROM {grants.name} x
                                    WHERE x.organization_id = r.org)
           END AS stale
      FROM req r
      LEFT JOIN walk w ON w.org = r.org AND w.rn = r.rn
      LEFT JOIN acct a ON a.organization_id = r.org
      LEFT JOIN totals t ON t.org = r.org
), gw AS (
    SELECT id, org, remaining - floor AS groom,
           sum(remaining - floor) OVER (PARTITION BY org ORDER BY {_SPENDING_ORDER} ROWS UNBOUNDED PRECEDING) AS grun
      FROM g WHERE remaining > floor
), draws AS MATERIALIZED (
    SELECT d.charge_id, gw.id AS grant_id,
           (least(d.spent, gw.grun) - greatest(d.spent - d.cost, gw.grun - gw.groom))::bigint AS take
      FROM decided d JOIN gw ON gw.org = d.org
     WHERE d.accepted AND least(d.spent, gw.grun) > greatest(d.spent - d.cost, gw.grun - gw.groom)
), debit AS (
    UPDATE {accounts.name} a SET balance = a.balance - t.total, updated_at = now()
      FROM (SELECT org, sum(cost) AS total FROM decided WHERE accepted GROUP BY org) t
     WHERE a.organization_id = t.org
), drawn AS (
    UPDATE {grants.name} x SET remaining = x.remaining - t.total
      FROM (SELECT grant_id, sum(take) AS total FROM draws GROUP BY grant_id) t
     WHERE x.id = t.grant_id
), moves AS (
    INSERT INTO {grant_moves.name} (ledger_id, grant_id, amount) SELECT charge_id, grant_id, -take FROM draws
), entry AS (
    INSERT INTO {ledger.name}
           (id, organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path)
    SELECT charge_id, org, 'charge', -cost, book, feature, user_id, method, path FROM decided WHERE accepted
), hold AS (
    INSERT INTO {holds.name} (charge_id, expires_at)
    SELECT charge_id, hold_until FROM decided WHERE accepted AND hold_until IS NOT NULL
)
{answer}
"""


CHARGE_MANY = charge_statement()
CLAIM_AND_CHARGE = charge_statement(claim=True)
#: What a refused charge re-reads (its statement's snapshot may predate a grant).
ROOM = f"""
SELECT coalesce(sum(remaining - floor) FILTER (WHERE remaining > floor), 0)::bigint,
       coalesce(sum(remaining), 0)::bigint
  FROM {grants.name}
 WHERE organization_id = $1 AND (expires_at IS NULL OR expires_at > $2::timestamptz)
"""
