"""When an idempotency key may be claimed: the rule, written once for both databases.

A key stands *free* when no request holds it: none yet, a finished one past its TTL, or a
running one whose lock ran out with no open hold (its process died; a running key whose
charge still has an open hold is not abandoned, whatever its lock says: its process may
only have lost the database for a while). A finished key lives until it expires, never
merely because its TTL passed mid-request. A key that is not free is answered from its
row: a replay, still running, or reused for another request. PostgreSQL's keyed charge
(``pg_charge.py``) and SQLite's (``charge.py``) take the rule from here.
"""

from __future__ import annotations

from ..schema import holds, idempotency_keys

#: The fields of a key's row a taken key is answered with (``ClaimOutcome.for_taken``).
FIELDS = ("fingerprint", "state", "charge_id", "status_code", "response_headers", "response_body", "body_stored")


def reclaimable(alias: str, now: str) -> str:
    """The key row ``alias`` exists but holds nothing any more at ``now`` (an SQL expression)."""
    return (
        f"(({alias}.state = 'done' AND {alias}.expires_at < {now})"
        f" OR ({alias}.state = 'running' AND {alias}.locked_until < {now}"
        f" AND NOT EXISTS (SELECT 1 FROM {holds.name} h WHERE h.charge_id = {alias}.charge_id)))"
    )


#: A claim's write: a new running key, or a reclaimable one taken over (``:now`` is the
#: claim's moment; the caller has decided, under the account's lock, that it stands free).
CLAIM_COLUMNS = (
    "organization_id, idempotency_key, fingerprint, state, charge_id, status_code, response_headers,"
    " response_body, body_stored, locked_until, expires_at, created_at"
)
TAKE_OVER = (
    "fingerprint = excluded.fingerprint, state = 'running', charge_id = excluded.charge_id,"
    " status_code = NULL, response_headers = NULL, response_body = NULL, body_stored = true,"
    " locked_until = excluded.locked_until, expires_at = excluded.expires_at, created_at = excluded.created_at"
)
TABLE = idempotency_keys.name

#: A finished request's key: done, with its response stored for replays. Only a running key
#: is finished (one taken over meanwhile belongs to another request now). SQLite's two
#: settlements (``charge.complete_keys_sqlite``) run it; PostgreSQL's sets the same columns
#: from arrays, in its settlement's one statement (``postgres._SETTLE_DONE``).
COMPLETE = (
    f"UPDATE {TABLE} SET state = 'done', status_code = :status_code, response_headers = :response_headers,"
    " response_body = :response_body, body_stored = :body_stored, expires_at = :expires_at"
    " WHERE organization_id = :org AND idempotency_key = :key AND state = 'running'"
)
