"""The tables credit_guard keeps in the application's database.

``metadata`` is public so an app can hand it to its own Alembic environment
(``target_metadata = [app_metadata, credit_guard.schema.metadata]``). Every table
name starts with ``credit_guard_`` so the library can share a database with the app.

Money invariants that the database itself enforces, so no code path can break them:

* an account's balance is the sum of its grants' ``remaining`` and of its ledger;
* no grant goes below its floor: 0 for a grant, ``-overdraft limit`` for the account's
  overdraft line (a CHECK constraint backs the charge's condition), so no account goes
  below ``-limit``;
* a charge is refunded at most once (``refund_of`` is UNIQUE), whether in full (a failed
  request, an expired hold) or in part (a request that used less than it reserved);
* an over-use surcharge is taken at most once per charge (``extra_of`` is UNIQUE);
* a refund row always points at a charge, and so does a surcharge;
* a grant with an idempotency key happens once per organization and key;
* no balance passes ``MAX_BALANCE``.

Credits are kept as *grants* (``credit_guard_grants``): a charge draws from the live ones
in spending order (lower ``priority``, then the soonest ``expires_at``, never-expiring
last, then the oldest), and every draw, refund, repayment and expiry of a grant is a row
of ``credit_guard_grant_moves`` pointing at the ledger row that caused it, so a grant's
``remaining`` is always its ``amount`` plus its moves (``audit()`` checks it).

A plan (``credit_guard_plans``) grants its subscribers (``credit_guard_subscriptions``,
one plan per organization) a grant per period; each is a ledger 'grant' whose idempotency
key names the subscription and the period, so the UNIQUE pair above grants a period once.

A charge with a row in ``credit_guard_holds`` is a *hold*: its credits are taken, but the
request that took them has not finished. Settling deletes the row; the sweeper refunds
holds whose time ran out (their process died), so a crash never keeps a credit. Holds
live in their own narrow table, not as a ledger column: the ledger stays insert-only, and
settling (once per request) deletes a small row instead of rewriting a wide one and every
index on it (measured: the column cost the middleware 8% of its throughput).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
)

TABLE_PREFIX = "credit_guard_"
#: The largest balance an account may hold: JavaScript's largest exact integer, so every
#: balance a client reads (JSON, ``X-Credits-Remaining``) is exact, and far below BIGINT's
#: limit, so no sum of grants can overflow a column.
MAX_BALANCE = 2**53 - 1

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid; BIGINT would not autoincrement.
_LedgerId = BigInteger().with_variant(Integer(), "sqlite")

feature_pricing = Table(
    f"{TABLE_PREFIX}feature_pricing",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("feature_key", String(64), nullable=False, unique=True),
    Column("feature_name", String(200), nullable=False),
    Column("category", String(100), nullable=False),
    Column("credits", Integer, nullable=False),
    Column("description", Text, nullable=True),
    Column("is_active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The credit pool the feature draws from (None: the general pool), and whether it may
    # draw from general grants once its pool's are spent (``spending.in_lane``).
    Column("pool", String(64), nullable=True),
    Column("pool_fallback", Boolean, nullable=False, default=False, server_default=false()),
    CheckConstraint("credits >= 0", name="credits_non_negative"),
)

accounts = Table(
    f"{TABLE_PREFIX}accounts",
    metadata,
    Column("organization_id", String(255), primary_key=True),
    Column("balance", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"balance <= {MAX_BALANCE}", name="balance_at_most_max"),
)

ledger = Table(
    f"{TABLE_PREFIX}ledger",
    metadata,
    Column("id", _LedgerId, primary_key=True, autoincrement=True),
    Column("organization_id", String(255), nullable=False),
    # 'grant' (top-up, amount > 0), 'charge' (amount < 0), 'refund' (amount > 0) or
    # 'expiry' (what an expired grant still held, amount < 0).
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("feature_key", String(64), nullable=True),
    Column("user_id", String(255), nullable=True),
    Column("request_method", String(16), nullable=True),
    Column("request_path", String(2048), nullable=True),
    Column("reason", String(500), nullable=True),
    Column(
        "refund_of",
        _LedgerId,
        ForeignKey(f"{TABLE_PREFIX}ledger.id", ondelete="RESTRICT"),
        nullable=True,
        unique=True,
    ),
    Column(
        "extra_of",
        _LedgerId,
        ForeignKey(f"{TABLE_PREFIX}ledger.id", ondelete="RESTRICT"),
        nullable=True,
        unique=True,
    ),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # A grant's idempotency key (a payment's id, a seeding step's name): the UNIQUE pair
    # below makes the same key grant once per organization, whatever the concurrency.
    Column("idempotency_key", String(255), nullable=True),
    # A charge's lane, as its pricing row said when it was decided: the pool it drew from
    # (None: general) and whether it could fall back to general grants. A surcharge of it
    # draws from the same lane, and ``audit()`` checks its draws stayed inside it.
    Column("pool", String(64), nullable=True),
    Column("pool_fallback", Boolean, nullable=True),
    UniqueConstraint("organization_id", "idempotency_key"),
    CheckConstraint("kind IN ('grant', 'charge', 'refund', 'expiry')", name="kind_known"),
    CheckConstraint(
        "(kind = 'refund' AND refund_of IS NOT NULL AND extra_of IS NULL AND amount > 0)"
        " OR (kind = 'charge' AND refund_of IS NULL AND amount <= 0)"
        " OR (kind = 'grant' AND refund_of IS NULL AND extra_of IS NULL AND amount > 0)"
        " OR (kind = 'expiry' AND refund_of IS NULL AND extra_of IS NULL AND amount < 0)",
        name="kind_shape",
    ),
)

Index(f"ix_{TABLE_PREFIX}ledger_org_created", ledger.c.organization_id, ledger.c.created_at)
Index(f"ix_{TABLE_PREFIX}ledger_feature_created", ledger.c.feature_key, ledger.c.created_at)
grants = Table(
    f"{TABLE_PREFIX}grants",
    metadata,
    Column("id", _LedgerId, primary_key=True, autoincrement=True),
    Column("organization_id", String(255), nullable=False, index=True),
    # What was granted (0 for the overdraft line), and what is left of it now.
    Column("amount", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    # 0 for a grant; ``-limit`` for the account's overdraft line, the one grant that may go
    # negative (its debt). A CHECK, so no code path can take an account below ``-limit``.
    Column("floor", BigInteger, nullable=False, default=0),
    # The account's overdraft line (at most one: made under the account's lock).
    Column("overdraft", Boolean, nullable=False, default=False),
    Column("priority", Integer, nullable=False, default=0),
    # Never spendable from this instant on (None: never expires). Indexed for the sweep that
    # writes expired grants off (every process runs it); charges never change it.
    Column("expires_at", DateTime(timezone=True), nullable=True, index=True),
    Column("reason", String(500), nullable=True),
    # The ledger row that granted it (None for the overdraft line and pre-grant balances).
    Column("ledger_id", _LedgerId, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # What this grant paid toward the overdraft line's debt when it was made, less what
    # refunds have given back to it since: a refund of a charge the line paid for returns
    # to the grant that repaid it (and expires with it), never to the line, which never
    # expires. ``audit()`` checks it against the grant's repayment move.
    Column("repaid", BigInteger, nullable=False, default=0, server_default="0"),
    # The credit pool it belongs to (None: general): only charges of that pool's features
    # draw from it. The overdraft line is general, and a pool's grant never repays it.
    Column("pool", String(64), nullable=True),
    CheckConstraint("remaining >= floor", name="remaining_above_floor"),
    CheckConstraint("remaining <= amount", name="remaining_at_most_amount"),
    CheckConstraint("repaid >= 0", name="repaid_non_negative"),
    CheckConstraint("floor <= 0 AND amount >= 0", name="floor_and_amount"),
    CheckConstraint("overdraft OR floor = 0", name="only_overdraft_below_zero"),
    CheckConstraint("pool IS NULL OR NOT overdraft", name="overdraft_line_is_general"),
    CheckConstraint("pool IS NULL OR repaid = 0", name="pools_never_repay"),
)
grant_moves = Table(
    f"{TABLE_PREFIX}grant_moves",
    metadata,
    # The ledger row that moved credits in or out of the grant: a charge (negative), a
    # refund (positive, back to the grants the charge drew from), an expiry (negative), a
    # grant repaying the overdraft line (negative on itself, positive on the line).
    Column("ledger_id", _LedgerId, nullable=False),
    Column("grant_id", _LedgerId, nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    PrimaryKeyConstraint("ledger_id", "grant_id"),
)

reservations = Table(
    f"{TABLE_PREFIX}reservations",
    metadata,
    # An async job's credits, taken when it started and held under its id until the job's
    # completion captures them (or releases them); the sweeper releases it after its TTL.
    Column("job_id", String(255), primary_key=True),
    Column("organization_id", String(255), nullable=False),
    Column("feature_key", String(64), nullable=False),
    Column("charge_id", _LedgerId, nullable=False),
    Column("credits", BigInteger, nullable=False),
    # The price of one unit when it was reserved (a capture's units are priced at it), and
    # how many credits beyond ``credits`` a capture may still take.
    Column("unit_price", BigInteger, nullable=False),
    Column("max_overage_credits", BigInteger, nullable=False, default=0),
    # 'open', then 'captured', 'released' or 'expired'.
    Column("state", String(16), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("state IN ('open', 'captured', 'released', 'expired')", name="state_known"),
)

holds = Table(
    f"{TABLE_PREFIX}holds",
    metadata,
    # One row per charge whose request is still running; deleted when it is settled or refunded.
    # No foreign key: its check would lock the ledger row on every charge. The row is only
    # ever written by the statement that writes its charge, and audit() checks the pairing.
    Column("charge_id", _LedgerId, primary_key=True, autoincrement=False),
    # Pushed forward by the live process's heartbeat; past it, the sweeper refunds the charge.
    # Not indexed: the table only holds requests in flight, so the sweeper's scan is small,
    # while an index would cost every charge, settlement and heartbeat an extra write.
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

idempotency_keys = Table(
    f"{TABLE_PREFIX}idempotency_keys",
    metadata,
    # Keys are scoped to the organization that pays: two tenants may pick the same key.
    Column("organization_id", String(255), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    # sha256 of what the key was first used for (method, path, query, body; or feature and units).
    Column("fingerprint", String(64), nullable=False),
    # 'running' until the request completes, then 'done' with the response to replay.
    Column("state", String(16), nullable=False),
    # The charge the key paid with; refunding it deletes the key so the client may retry.
    Column("charge_id", _LedgerId, nullable=True, index=True),
    Column("status_code", Integer, nullable=True),
    Column("response_headers", Text, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("body_stored", Boolean, nullable=False, default=True),
    # A 'running' key whose lock ran out belonged to a process that died: it may be reclaimed.
    Column("locked_until", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("organization_id", "idempotency_key"),
    CheckConstraint("state IN ('running', 'done')", name="state_known"),
)

plans = Table(
    f"{TABLE_PREFIX}plans",
    metadata,
    # A subscription's credits per period: ``credits`` each period, as a grant that expires
    # at the period's end; ``rollover`` of what is left of it carries into the next period
    # (NULL: all of it, 0: none). An edit applies from each subscriber's next period.
    Column("plan_key", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("period", String(8), nullable=False),
    Column("rollover", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"credits > 0 AND credits <= {MAX_BALANCE}", name="credits_positive"),
    CheckConstraint("rollover IS NULL OR rollover >= 0", name="rollover_non_negative"),
    CheckConstraint("period IN ('day', 'week', 'month', 'year')", name="period_known"),
)

subscriptions = Table(
    f"{TABLE_PREFIX}subscriptions",
    metadata,
    # One plan per organization at a time. ``id`` is new with every subscription: the
    # allowances' idempotency keys name it and the period, so each period is granted once.
    Column("organization_id", String(255), primary_key=True),
    Column("id", String(36), nullable=False, unique=True),
    # RESTRICT: a plan with subscribers cannot be deleted.
    Column("plan_key", String(64), ForeignKey(f"{TABLE_PREFIX}plans.plan_key", ondelete="RESTRICT"), nullable=False),
    Column("anchor", DateTime(timezone=True), nullable=False),
    # The last period granted (-1: none yet, the anchor is ahead) and when the next starts.
    Column("period", Integer, nullable=False),
    Column("renews_at", DateTime(timezone=True), nullable=False, index=True),
    # The allowance of ``period`` and what rolled into it. The general expiry sweep leaves
    # the allowance to the renewal, which writes it off after carrying its rollover, so
    # a sweep that runs first can never lose a rollover.
    Column("grant_id", _LedgerId, nullable=True),
    Column("rollover_grant_id", _LedgerId, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox = Table(
    f"{TABLE_PREFIX}outbox",
    metadata,
    # Events for the app's webhook endpoint, written in the transaction of what they tell
    # (a period granted, a grant expired, a balance crossing a line): committed together or
    # not at all, so a crash loses none. Delivered at least once, each under its ``event_id``.
    Column("id", _LedgerId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("type", String(40), nullable=False),
    Column("organization_id", String(255), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # When a sender may try it (next): pushed forward by a lease while one is sending it and
    # by the backoff after a failure; NULL once delivered.
    Column("next_attempt_at", DateTime(timezone=True), nullable=True, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("last_error", String(500), nullable=True),
)

balance_alerts = Table(
    f"{TABLE_PREFIX}balance_alerts",
    metadata,
    # Where each organization's spendable balance stood when last looked at: 'ok' (at or
    # above the low line), 'low' or 'empty' (nothing spendable). An alert is a change of
    # state, made under the account's lock, so each crossing is told once across processes.
    Column("organization_id", String(255), primary_key=True),
    Column("state", String(8), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("state IN ('ok', 'low', 'empty')", name="state_known"),
)

auto_topups = Table(
    f"{TABLE_PREFIX}auto_topups",
    metadata,
    # Buy ``credits`` when the spendable balance falls below ``below``: once per crossing.
    # 'armed' until a look finds the balance below, then 'running' (one process runs the
    # app's charge, ``crossings`` counts it) and 'fired' until the balance is back at or
    # above ``below``, which arms it again. A runner that died leaves a lease that runs out.
    Column("organization_id", String(255), primary_key=True),
    # Made when the line is set (kept by a change, new after a removal): with the crossing
    # count it names each top-up's idempotency key, which must never name an earlier one.
    Column("line_id", String(32), nullable=False),
    Column("below", BigInteger, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("state", String(8), nullable=False),
    Column("crossings", Integer, nullable=False, default=0),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("last_result", String(255), nullable=True),
    Column("last_error", String(500), nullable=True),
    Column("last_run_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("below > 0 AND credits > 0", name="positive"),
    CheckConstraint("state IN ('armed', 'running', 'fired')", name="state_known"),
)

member_limits = Table(
    f"{TABLE_PREFIX}member_limits",
    metadata,
    # A member's cap inside an organization: at most ``credits`` per ``per`` period ('day',
    # 'month', UTC calendar) or in all (NULL). ``used`` counts the member's charges (net of
    # their refunds) in the period that starts at ``period_start``; a charge in a later
    # period starts it again from 0. Written by the charge that spends it, in the same
    # statement as the organization's debit, with this row locked.
    Column("organization_id", String(255), primary_key=True),
    Column("member", String(255), primary_key=True),
    Column("credits", BigInteger, nullable=False),
    Column("per", String(8), nullable=True),
    Column("period_start", DateTime(timezone=True), nullable=True),
    Column("used", BigInteger, nullable=False, default=0),
    # When the cap began counting (set, or its period changed): charges before it are not its.
    Column("since", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("credits >= 0 AND used >= 0", name="not_negative"),
    CheckConstraint("per IS NULL OR per IN ('day', 'month')", name="per_known"),
)
