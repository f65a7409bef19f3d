"""The spending rules as SQL, written once for both databases' charges.

Each database has ONE charge (``charge.py`` on SQLite, ``pg_charge.py`` on PostgreSQL),
and both build their conditions and orderings from the fragments here, so "which grants
may be spent", "how much each can still give" and "in which order" cannot drift apart:

* a grant is *live* until the instant it expires (``live``): from then on nothing may be
  drawn from it, whatever was decided before a lock wait;
* a grant's *room* is what it holds above its floor (0 for a grant, ``-limit`` for the
  account's overdraft line): ``room``, counted only where positive (``has_room``);
* a charge's *lane*: the grants it may draw from at all (``in_lane``): its pool's, and
  the general ones (the overdraft line among them) only for a general charge or a pool
  that falls back to them;
* the *spending order*: a pool's own grants before general ones (``pool IS NULL`` sorts
  false first), then lower ``priority``, then the soonest ``expires_at``, never-expiring
  after every date, then the oldest; the overdraft line after all of them (``order``). A
  refund gives back in the ``reverse`` order (the last drawn first).

Plain text fragments over a table alias (``g``), valid on SQLite and PostgreSQL alike
(a boolean sorts false first on both; ``(expires_at IS NULL)`` puts NULL after dates).
"""

from __future__ import annotations


def live(alias: str, at: str) -> str:
    """The grant ``alias`` may be drawn from at the moment ``at`` (an SQL expression)."""
    return f"({alias}.expires_at IS NULL OR {alias}.expires_at > {at})"


def room(alias: str) -> str:
    """What the grant can still give: its remaining credits above its floor."""
    return f"({alias}.remaining - {alias}.floor)"


def has_room(alias: str) -> str:
    return f"{alias}.remaining > {alias}.floor"


def in_lane(alias: str, pool: str, fallback: str) -> str:
    """The grant ``alias`` is one a charge of pool ``pool`` (an SQL expression, NULL: the
    general pool) may draw from; ``fallback`` (a boolean expression): the charge may also
    draw from general grants once its pool's are spent."""
    # Two-valued (never NULL), so that ``NOT`` of it (the audit's) means "outside the lane".
    return (
        f"(coalesce({alias}.pool = {pool}, false)"
        f" OR ({alias}.pool IS NULL AND ({pool} IS NULL OR coalesce({fallback}, false))))"
    )


def order(alias: str) -> str:
    """The spending order (an ORDER BY list): the first grant named is drawn from first."""
    return (
        f"{alias}.overdraft, ({alias}.pool IS NULL), {alias}.priority, ({alias}.expires_at IS NULL),"
        f" {alias}.expires_at, {alias}.id"
    )


def reverse(alias: str) -> str:
    """The spending order backwards: what a refund gives back to first."""
    return ", ".join(f"{column} DESC" for column in order(alias).split(", "))
