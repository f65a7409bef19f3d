"""CreditGuard: the money path, top to bottom.

    resolve organization -> price (TTL cache) -> deduct (one atomic statement)
        -> handler runs -> failed? refund exactly once -> headers

The engine methods (``deduct_credits``, ``refund_credits`` ...) are the seed's helper
functions; ``open_charge`` and ``settle`` are the two calls the web adapters make
around a handler. Nothing here imports a web framework.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
import os
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Literal

import anyio
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import problems
from ._storage import open_store
from ._storage.base import ChargeRequest, ClaimKind, ClaimOutcome, Completion, GrantStatus, KeyClaim, UsageSettlement
from .engine import DEFAULT_DATABASE_URL, build_engine
from .engine import database_url as _database_url
from .errors import IdempotencyKeyReused, InvalidPricing, PricingNotFound, StorageUnavailable
from .events import (
    ChargeEvent,
    Event,
    H,
    HookDispatcher,
    InsufficientCreditsEvent,
    LowBalanceEvent,
    RefundEvent,
    crossed_below,
)
from .holds import HoldKeeper, utcnow
from .idempotency import (
    IDEMPOTENCY_HEADER,
    Replay,
    ResponseRecorder,
    call_fingerprint,
    key_from_headers,
    request_fingerprint,
    validate_key,
)
from .models import (
    FEATURE_KEY_MAX,
    FEATURE_KEY_RE,
    UNSTORABLE_TEXT,
    AuditIssue,
    CreditCheck,
    DeductionResult,
    FeaturePricing,
    RefundResult,
    UsageGroup,
    UsageRow,
    is_storable_text,
    validate_pricing_fields,
    validate_pricing_rows,
)
from .notify import PricingNotifier
from .pricing import PricingCache
from .problems import Problem
from .schema import MAX_BALANCE

log = logging.getLogger("credit_guard")

#: Takes the framework's request object (anything with ``.state``, ``.headers``, ``.scope``)
#: and returns the id, or None when the request has none. May be sync or async.
Resolver = Callable[[Any], "str | Awaitable[str | None] | None"]

DATABASE_URL_ENV = "CREDIT_GUARD_DATABASE_URL"
#: Column widths of the ledger (schema.py); longer values are refused or clipped up front.
ORGANIZATION_ID_MAX = 255
USER_ID_MAX = 255
REQUEST_PATH_MAX = 2048
#: The largest grant: the largest balance (a bigger one is a typo, and could not be held).
MAX_GRANT = MAX_BALANCE
#: Units a single request may reserve (seconds of video, images...): beyond it, a typo or an attack.
MAX_UNITS = 1_000_000
#: How a route computes its units from the framework's request (sync or async).
UnitsOf = Callable[[Any], "int | float | Decimal | str | Awaitable[int | float | Decimal | str]"]
#: Where a ticket lives in the ASGI scope, for ``current_ticket(request)``.
TICKET_SCOPE_KEY = "credit_guard.ticket"
IdempotencyMode = bool | Literal["required"]


#: One unit, the default: compared by identity so the common case skips the Decimal maths.
ONE = Decimal(1)


#: Digits after the point a unit count keeps (a billionth of a second of video is plenty).
UNITS_PLACES = 9
#: The longest text a unit count may be written in; checked before it is parsed.
UNITS_TEXT_MAX = 40
_UNITS_STEP = Decimal(1).scaleb(-UNITS_PLACES)


def units_value(value: object, *, allow_zero: bool = False) -> Decimal:
    """A request's units as an exact Decimal, or ValueError saying why not.

    Decimal, not float: ``0.1 * 20`` must cost 2 credits, not 3. The size and precision
    are bounded BEFORE any arithmetic: ``Decimal("1e-10000000")`` parses at once, but
    turning it into an exact fraction (as pricing does) takes seconds of CPU, which a
    request must never be able to buy. ``allow_zero``: usage may be none at all.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise ValueError(f"units must be a number, got {type(value).__name__}")
    if isinstance(value, int) and not 0 <= value <= MAX_UNITS:  # an int is exact; its str() of a huge one is not cheap
        raise ValueError(
            f"units must be a number in range, from 0 to {MAX_UNITS}, got {'a larger int' if value > 0 else value}"
        )
    if isinstance(value, str) and len(value) > UNITS_TEXT_MAX:
        raise ValueError(f"units must be a number of at most {UNITS_TEXT_MAX} characters, got {value!r:.40}...")
    text = str(value).strip()  # a Decimal of a million digits is refused by its length, like text
    if len(text) > UNITS_TEXT_MAX:
        raise ValueError(f"units must be a number of at most {UNITS_TEXT_MAX} digits, got {text:.40}...")
    try:
        if "_" in text:  # Decimal reads "1_0" as 10: a typo must not cost ten units
            raise InvalidOperation
        units = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"units must be a number, got {value!r:.40}") from None
    exponent = units.as_tuple().exponent
    span = f"from 0 to {MAX_UNITS}" if allow_zero else f"above 0 and at most {MAX_UNITS}"
    if not units.is_finite() or not isinstance(exponent, int) or units.adjusted() > 6 or units < 0 or units > MAX_UNITS:
        raise ValueError(f"units must be a number {span}, got {value!r:.40}")
    if exponent < -UNITS_PLACES:
        # Beyond a billionth of a unit: a float's is noise (0.1 + 0.2), rounded to the nearest;
        # written digits are rounded up, so a fraction asked for is still paid for.
        rounding = ROUND_HALF_EVEN if isinstance(value, float) else ROUND_CEILING
        units = units.quantize(_UNITS_STEP, rounding=rounding).normalize()
    if units == 0 and not allow_zero:
        raise ValueError(f"units must be a number {span}, got {value!r:.40}")
    return units


def cost_of(unit_price: int, units: Decimal) -> int:
    """Credits for ``units`` at ``unit_price``, rounded up: a fraction of a unit is paid for."""
    numerator, denominator = units.as_integer_ratio()  # exact: no 28-digit rounding
    return -(-unit_price * numerator // denominator)


@dataclass(slots=True)
class Ticket:
    """One request's charge, from deduction to settlement. Lives for one request only."""

    feature_key: str
    organization_id: str
    credits: int
    remaining: int | None
    charge_id: int | None
    refund: RefundResult | None = None
    settled: bool = False
    #: Price of one unit; ``credits`` is ``unit_price * units`` rounded up.
    unit_price: int = 0
    units: Decimal = Decimal(1)
    #: What the handler reported it really used (``report_usage``); None keeps the reserve.
    used_units: Decimal | None = None
    #: How far above the reserve, as a fraction of it, reported usage may still be charged.
    max_overage: float = 0.0
    idempotency_key: str | None = None
    #: Records the response for replay (idempotent requests only).
    recorder: ResponseRecorder | None = None
    user_id: str | None = None
    #: Extra credits taken or refunded when usage was settled.
    adjustment: int = 0
    #: Keep the charge when the app answers 4xx (by default a client error is refunded).
    charge_client_errors: bool = False

    def fails(self, status: int) -> bool:
        """Whether an answer with this status is refunded: a 5xx always; a 4xx unless the
        route charges client errors (users pay for results, not for being told no)."""
        return status >= 500 or (status >= 400 and not self.charge_client_errors)

    def report_usage(self, units: int | float | Decimal | str) -> None:
        """Say what the request really used (seconds of video rendered, images made...).

        At settlement, unused credits of the reserve go back, and use beyond it is charged
        up to ``max_overage`` of the reserve (and what the balance holds), exactly once.
        Raises ValueError for anything but a number from 0 to MAX_UNITS.
        """
        self.used_units = units_value(units, allow_zero=True)

    def headers(self) -> list[tuple[str, str]]:
        """The credit headers the response carries, reflecting a refund if one happened."""
        if self.refund is not None and self.refund.refunded:
            return [
                (problems.HEADER_REFUNDED, str(self.refund.credits_refunded)),
                (problems.HEADER_REMAINING, str(self.refund.remaining_credits)),
            ]
        out = [(problems.HEADER_CHARGED, str(self.credits))]
        if self.remaining is not None:
            out.append((problems.HEADER_REMAINING, str(self.remaining)))
        return out


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """The database connections one guard opens per process, by use."""

    #: PostgreSQL's LISTEN connection for other processes' pricing changes.
    listener: int
    #: SQLAlchemy's pool: refunds, settlements, sweeps, admin and reads on PostgreSQL;
    #: the readers on SQLite.
    sqlalchemy: int
    #: PostgreSQL's asyncpg pool: every charge, and the batched settlement.
    asyncpg: int = 0
    #: SQLite's one writing connection (``_storage/sqlite.py``).
    writer: int = 0

    @property
    def total(self) -> int:
        return self.listener + self.sqlalchemy + self.asyncpg + self.writer

    @classmethod
    def of(cls, max_connections: int, url: URL, *, listens: bool, asyncpg: int | None = None) -> ConnectionBudget:
        if url.get_backend_name() == "sqlite":
            return cls(0, max(1, max_connections - 1), writer=1)
        listener = 1 if listens else 0
        rest = max_connections - listener
        # The charges want the connections: SQLAlchemy's work (refunds, settlements with
        # stored responses, sweeps, admin) is rare and short. Measured: 6 of 10 for asyncpg
        # cost the decorator 0.10 of its ratio to the one-statement limit (10 connections).
        sqlalchemy = max(1, rest // 5)
        return cls(listener, sqlalchemy, asyncpg if asyncpg is not None else max(1, rest - sqlalchemy))


class CreditGuard:
    """Pay-per-use credits in front of an ASGI app; one instance per app and event loop.

    Args:
        database_url: SQLAlchemy async URL. ``sqlite+aiosqlite:///file.db`` (the default,
            or ``$CREDIT_GUARD_DATABASE_URL``) or ``postgresql+asyncpg://user@host/db``.
        engine: an existing AsyncEngine to share with the app instead of a URL.
        organization_resolver / user_resolver: where a request's org and user come from;
            by default ``request.state.organization_id`` / ``request.state.user_id``.
            Never a client-chosen header unless you write that resolver yourself.
        pricing_ttl / pricing_cache_size: the pricing cache. Writes through this guard
            invalidate it at once; other processes see a change at once on PostgreSQL
            (``pricing_notify``) and within ``pricing_ttl`` on SQLite.
        allow_unpriced: let routes whose feature is unknown or inactive run free (logged)
            instead of refusing them.
        fail_open: when the database is unreachable, run handlers free (logged) instead of
            answering 503. Off by default: an outage must not become free service.
        retry_after: seconds in the 503's ``Retry-After``.
        timeout: seconds to wait for the database before failing closed.
        max_connections: the most database connections this guard opens per process (see
            ``ConnectionBudget``): on PostgreSQL one listener for pricing changes, a fifth
            of the rest for SQLAlchemy (refunds, settlements, admin) and the rest for the
            asyncpg pool that carries the charges (12: 1 + 2 + 9); on SQLite the readers'
            pool and one writing connection. 4 workers x 12 = 48 leaves half of
            PostgreSQL's default ``max_connections=100`` to the app. An ``engine`` the app
            passes in keeps its own pool.
        asyncpg_pool_kwargs: options for that asyncpg pool (behind PgBouncer pass
            ``{"statement_cache_size": 0}``).
        pg_pool_size: deprecated; the asyncpg pool's size (default: from ``max_connections``).
        pricing_notify: on PostgreSQL, tell every other process sharing the database about
            each pricing write (LISTEN/NOTIFY, see ``notify.py``) so none waits for its TTL.
            Turn off behind PgBouncer's transaction pooling, which cannot carry LISTEN.
        hold_timeout: seconds after which a charge whose process died is refunded by the
            sweeper (``holds.py``). Live requests keep their holds alive, so this bounds
            how long a crash keeps credits, not how long a request may run.
        sweep_interval: seconds between two sweeps (default: a quarter of hold_timeout).
            ``sweep=False`` leaves sweeping to another process or ``credit-guard sweep``.
        settle_delay: how long settlements gather before one batched UPDATE writes them.
        idempotency: honour ``Idempotency-Key`` on every paid route (True), require it
            ("required"), or only where a route opts in (False, the default).
        idempotency_ttl: seconds a key (and its stored response) is kept.
        idempotency_max_body: bytes of response body stored for replay; a longer body is
            replayed as status and headers with ``Idempotent-Body-Omitted: true``.
        idempotency_max_request_body: the middleware holds an idempotent request's body in
            memory to fingerprint it; a larger one is refused with 413 (nothing charged).
        max_overage: default for routes: how far above its reserve (0.5 = 50%) a request's
            reported usage may still be charged.
        low_balance_threshold: fire ``on_low_balance`` hooks when a charge takes a balance
            below this many credits.
        hook_timeout: seconds a hook may run before it is abandoned (and logged).
        charge_client_errors: keep the charge when the app answers 4xx (a 404, a 422 for a
            bad body, a 401/403 from its auth). Off by default: users pay for results, so a
            4xx is refunded exactly like a 5xx. A route may choose otherwise.
    """

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        engine: AsyncEngine | None = None,
        organization_resolver: Resolver | None = None,
        user_resolver: Resolver | None = None,
        pricing_ttl: float = 60.0,
        pricing_cache_size: int = 1024,
        allow_unpriced: bool = False,
        fail_open: bool = False,
        retry_after: int = 5,
        timeout: float = 5.0,
        refund_attempts: int = 4,
        max_connections: int = 12,
        pg_pool_size: int | None = None,
        asyncpg_pool_kwargs: Mapping[str, Any] | None = None,
        pricing_notify: bool = True,
        hold_timeout: float = 120.0,
        sweep_interval: float | None = None,
        sweep: bool = True,
        settle_delay: float = 0.05,
        idempotency: IdempotencyMode = False,
        idempotency_ttl: float = 24 * 3600.0,
        idempotency_max_body: int = 1024 * 1024,
        idempotency_max_request_body: int = 10 * 1024 * 1024,
        max_overage: float = 0.0,
        low_balance_threshold: int | None = None,
        hook_timeout: float = 5.0,
        charge_client_errors: bool = False,
    ) -> None:
        if idempotency not in (True, False, "required"):
            raise ValueError(f"idempotency must be True, False or 'required', got {idempotency!r}")
        if hold_timeout <= 0 or (sweep_interval is not None and sweep_interval <= 0):
            raise ValueError("hold_timeout and sweep_interval must be positive")
        if not 0 <= max_overage <= 100:
            raise ValueError(f"max_overage must be a share of the reserve from 0 to 100, got {max_overage!r}")
        if not isinstance(max_connections, int) or max_connections < 3:
            raise ValueError(f"max_connections must be an integer of at least 3, got {max_connections!r}")
        if pg_pool_size is not None:
            warnings.warn(
                "pg_pool_size is deprecated: pass max_connections, the one budget for every connection",
                DeprecationWarning,
                stacklevel=2,
            )
        # An engine handed in belongs to the app: close() must leave it open.
        self._owns_engine = engine is None
        url = (
            engine.url
            if engine is not None
            else _database_url(database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)
        )
        #: How the connections of this process are shared out (see ``max_connections``).
        self.connection_budget = budget = ConnectionBudget.of(
            max_connections, url, listens=pricing_notify, asyncpg=pg_pool_size
        )
        if engine is None:
            engine = build_engine(url, connect_timeout=timeout, pool_size=budget.sqlalchemy)
        self.engine = engine
        self.store = open_store(
            engine,
            owns_engine=self._owns_engine,
            timeout=timeout,
            pg_pool_size=budget.asyncpg,
            **dict(asyncpg_pool_kwargs or {}),
        )
        #: The event loop ``start()`` ran on; paid requests are refused on any other (see ``started``).
        self._started_on: asyncio.AbstractEventLoop | None = None
        self.pricing_cache = PricingCache(self._load_pricing, ttl=pricing_ttl, maxsize=pricing_cache_size)
        #: The cross-process invalidation of the pricing cache; None where there is none (SQLite).
        self.notifier: PricingNotifier | None = None
        if pricing_notify and url.get_backend_name() == "postgresql":
            self.notifier = PricingNotifier(url, self.pricing_cache, engine=engine, timeout=timeout)
        self.organization_resolver = organization_resolver
        self.user_resolver = user_resolver
        self.allow_unpriced = allow_unpriced
        self.fail_open = fail_open
        self.retry_after = retry_after
        self.refund_attempts = max(1, refund_attempts)
        self.idempotency = idempotency
        self.idempotency_ttl = idempotency_ttl
        self.idempotency_max_body = idempotency_max_body
        self.idempotency_max_request_body = idempotency_max_request_body
        self.max_overage = max_overage
        self.low_balance_threshold = low_balance_threshold
        self.charge_client_errors = charge_client_errors
        self.hooks = HookDispatcher(timeout=hook_timeout)
        self.holds = HoldKeeper(
            self.store,
            hold_timeout=hold_timeout,
            sweep_interval=sweep_interval if sweep_interval is not None else hold_timeout / 4,
            settle_delay=settle_delay,
            on_refund=self._refunded,
        )
        self.holds.sweeping = sweep

    # -- lifecycle ------------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create credit_guard's tables if they are missing; safe to call on every start."""
        await self.store.create_schema()

    async def start(self) -> None:
        """Run the guard on this event loop: the hold keeper (heartbeat, batched settlement,
        sweeper of expired holds), the hook workers and the listener for other processes'
        pricing changes. Call it in the app's lifespan (or use ``async with guard:``).

        Paid requests are refused (a 500 problem saying so, nothing charged) until it has
        run on the loop that serves them: a guard that was never started could not settle
        what it charges. Idempotent. Never fails the startup: a database that is down is
        retried in the background. ``start`` may follow ``close`` any number of times, on
        the same loop or a new one (a test client per test module): nothing that belongs
        to an event loop is made before ``start`` or kept after ``close``.
        """
        loop = asyncio.get_running_loop()
        if self._started_on is loop:
            return
        if self._started_on is not None and not self._started_on.is_closed():
            log.warning(
                "credit_guard: started on a second event loop without close(); the first one's tasks are dropped"
            )
        self._started_on = loop
        await self.holds.start()
        self.hooks.start()
        if self.notifier is not None:
            await self.notifier.start()

    @property
    def started(self) -> bool:
        """Whether ``start()`` ran on the running event loop (and ``close()`` did not follow)."""
        try:
            return self._started_on is asyncio.get_running_loop()
        except RuntimeError:
            return False

    async def close(self) -> None:
        """Settle what is queued, let pending hooks finish (bounded), close connections.

        The guard is then as if new: ``start()`` runs it again, on this loop or another.
        An engine passed in by the app stays open (it is the app's).
        """
        self._started_on = None
        await self.holds.close()
        await self.hooks.close()
        if self.notifier is not None:
            await self.notifier.close()
        self.pricing_cache.forget_loads()
        await self.store.close()

    async def __aenter__(self) -> CreditGuard:
        """``async with CreditGuard(...) as guard``: started on entry, closed on exit."""
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- pricing --------------------------------------------------------------------------

    async def get_feature_pricing(self, feature_key: str) -> FeaturePricing | None:
        """Active pricing for a key, or None; served from the TTL cache."""
        pricing = await self.pricing_cache.get(feature_key)
        return pricing if pricing is not None and pricing.is_active else None

    async def create_pricing(
        self,
        *,
        feature_key: str,
        feature_name: str,
        category: str,
        credits: int,
        description: str | None = None,
        is_active: bool = True,
    ) -> FeaturePricing:
        """Add a feature's price. Raises InvalidPricing or DuplicateFeature; writes nothing then."""
        fields = validate_pricing_fields(
            {
                "feature_key": feature_key,
                "feature_name": feature_name,
                "category": category,
                "credits": credits,
                "description": description,
                "is_active": is_active,
            }
        )
        pricing = await self.store.create_pricing(fields)
        await self.pricing_changed(pricing.feature_key)
        return pricing

    async def pricing_changed(self, *feature_keys: str) -> None:
        """Forget these keys' cached prices here and, on PostgreSQL, in every process that
        shares the database. Every pricing write calls it; call it after writing the
        pricing table some other way (a migration, raw SQL)."""
        self.pricing_cache.invalidate(*feature_keys)
        if self.notifier is not None and feature_keys:
            await self.notifier.notify(*feature_keys)

    async def _load_pricing(self, feature_key: str) -> FeaturePricing | None:
        # The first miss is the moment the cache starts to hold something worth invalidating.
        if self.notifier is not None:
            await self.notifier.ready()
        return await self.store.pricing_by_key(feature_key)

    async def list_pricing(self, *, category: str | None = None, is_active: bool | None = None) -> list[FeaturePricing]:
        return await self.store.list_pricing(category=category, is_active=is_active)

    async def get_pricing(self, pricing_id: str) -> FeaturePricing | None:
        """A pricing row by id, active or not (the admin's view; not cached)."""
        return await self.store.pricing_by_id(pricing_id)

    async def update_pricing(self, pricing_id: str, **changes: Any) -> FeaturePricing:
        """Change some fields of a pricing row. Raises PricingNotFound, InvalidPricing, DuplicateFeature."""
        fields = validate_pricing_fields(changes, partial=True)
        if not fields:
            pricing = await self.store.pricing_by_id(pricing_id)
            if pricing is None:
                raise PricingNotFound(pricing_id)
            return pricing
        pricing, old_key = await self.store.update_pricing(pricing_id, fields)
        await self.pricing_changed(old_key, pricing.feature_key)
        return pricing

    async def delete_pricing(self, pricing_id: str) -> FeaturePricing:
        """Delete a pricing row; past ledger rows keep their feature key. Raises PricingNotFound."""
        pricing = await self.store.delete_pricing(pricing_id)
        if pricing is None:
            raise PricingNotFound(pricing_id)
        await self.pricing_changed(pricing.feature_key)
        return pricing

    async def import_pricing(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool = False
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
        """Add many prices at once, all or nothing (seeding an environment); returns (created, updated).

        Every row is validated before anything is written: InvalidPricing then names each
        bad field as ``"row N: field"`` (rows count from 1). A key that already exists
        raises DuplicateFeature unless ``update_existing``, which overwrites the fields the
        row gives and leaves the others as they are.
        """
        clean, errors = validate_pricing_rows(rows)
        if errors:
            raise InvalidPricing(
                {f"row {n}: {field}": message for n, fields in errors.items() for field, message in fields.items()}
            )
        created, updated = await self.store.import_pricing(clean, update_existing=update_existing)
        await self.pricing_changed(*(pricing.feature_key for pricing in created + updated))
        return created, updated

    # -- money ----------------------------------------------------------------------------

    async def grant_credits(
        self, organization_id: str, amount: int, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> int:
        """Top an organization up (creating its account); returns the new balance.

        ``idempotency_key`` (a payment's or webhook event's id, a seeding step's name):
        the same key grants once per organization, whatever the concurrency or the number
        of processes, and every later call grants nothing and returns the current
        balance. Reusing a key for another amount raises IdempotencyKeyReused.

        Raises ValueError for a bad argument, and when the grant would take the balance
        past ``MAX_BALANCE`` (nothing is written then).
        """
        _check_org(organization_id)
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_GRANT:
            raise ValueError(f"amount must be a positive integer up to {MAX_GRANT}, got {amount!r:.40}")
        if reason is not None and (not isinstance(reason, str) or not is_storable_text(reason)):
            raise ValueError(f"reason must be text without NUL characters or unpaired surrogates, got {reason!r:.80}")
        _check_key(idempotency_key)
        outcome = await self.store.grant(organization_id, amount, reason[:500] if reason else reason, idempotency_key)
        if outcome.status is GrantStatus.OVER_LIMIT:
            raise ValueError(
                f"granting {amount} would take {organization_id!r:.80}'s balance ({outcome.balance}) past the maximum"
                f" of {MAX_BALANCE} credits; nothing was granted"
            )
        if outcome.status is GrantStatus.ALREADY_GRANTED:
            if outcome.amount != amount:
                raise IdempotencyKeyReused(idempotency_key or "")
            log.info(
                "credit_guard: grant %r to %s was already made; not granted again", idempotency_key, organization_id
            )
        return outcome.balance

    async def deduct_credits(
        self,
        organization_id: str,
        feature_key: str,
        user_id: str | None = None,
        *,
        units: int | float | Decimal | str = 1,
        idempotency_key: str | None = None,
        hold: bool = False,
        request_method: str | None = None,
        request_path: str | None = None,
    ) -> DeductionResult:
        """Charge a feature's price (times ``units``, rounded up), atomically, or say why not.

        ``idempotency_key``: a retry with the same key charges nothing and returns the
        first call's result with ``replayed=True``; the key is freed if that charge is
        refunded. Reusing it for another feature or units raises IdempotencyKeyReused.
        ``hold``: the charge is a hold (for work that may die): settle it with
        ``settle_charge`` or refund it. This guard keeps it alive while its process runs;
        if the process dies first, a sweeper gives it back after ``hold_timeout``.

        Raises StorageUnavailable when the database cannot be reached: a deduction whose
        outcome is unknown must not be mistaken for either answer.
        """
        _check_key(idempotency_key)
        result, outcome = await self._deduct(
            organization_id,
            feature_key,
            user_id,
            units=units_value(units),
            idempotency=(idempotency_key, call_fingerprint(feature_key, units_value(units).normalize()), True)
            if idempotency_key is not None
            else None,
            hold=hold,
            request_method=request_method,
            request_path=request_path,
        )
        if outcome is None or outcome.kind in (ClaimKind.CLAIMED, ClaimKind.INSUFFICIENT):
            return result
        assert idempotency_key is not None and outcome.stored is not None
        if outcome.kind is ClaimKind.MISMATCH:
            raise IdempotencyKeyReused(idempotency_key)
        stored = json.loads(bytes(outcome.stored["response_body"] or b"{}")) if outcome.kind is ClaimKind.REPLAY else {}
        return DeductionResult(
            success=True,
            remaining_credits=stored.get("remaining_credits"),
            credits_deducted=stored.get("credits_deducted"),
            charge_id=stored.get("charge_id") or outcome.stored["charge_id"],
            required=stored.get("credits_deducted"),
            replayed=True,
        )

    async def _deduct(
        self,
        organization_id: str,
        feature_key: str,
        user_id: str | None,
        *,
        units: Decimal,
        idempotency: tuple[str, str, bool] | None,
        hold: bool,
        request_method: str | None,
        request_path: str | None,
        checked: bool = False,
    ) -> tuple[DeductionResult, ClaimOutcome | None]:
        """The one deduction every path takes; ``idempotency`` is (key, fingerprint, finish_now).

        ``checked``: the web path has already refused ids the ledger cannot hold (as 401s).
        """
        if not checked:
            _check_org(organization_id)
            if user_id is not None and (not isinstance(user_id, str) or not is_storable_text(user_id)):
                raise ValueError(
                    f"user_id must be text without NUL characters or unpaired surrogates, got {user_id!r:.80}"
                )
        # A key no pricing row can have (NUL, a URL's junk) is answered without a query:
        # the database would fail on some of them, and that must not read as an outage.
        valid = isinstance(feature_key, str) and _valid_feature_key(feature_key)
        pricing = await self.pricing_cache.get(feature_key) if valid else None
        if pricing is None:
            return DeductionResult(
                success=False, error=f"Feature pricing not found: {feature_key}", error_code="feature_not_found"
            ), None
        if not pricing.is_active:
            return DeductionResult(
                success=False, error=f"Feature is inactive: {feature_key}", error_code="feature_inactive"
            ), None
        credits = pricing.credits if units is ONE else cost_of(pricing.credits, units)
        # Clipped to their columns: a long URL must be charged, not mistaken for an outage.
        user_id = user_id[:USER_ID_MAX] if user_id else user_id
        request_path = _storable(request_path[:REQUEST_PATH_MAX]) if request_path else request_path
        hold_until = self.holds.hold_until() if hold else None
        outcome: ClaimOutcome | None = None
        request = ChargeRequest(
            organization_id, credits, feature_key, user_id, request_method, request_path, hold_until=hold_until
        )
        if idempotency is None:
            charged = await self.store.charge(request)
            charge_id, balance = charged.charge_id, charged.balance
        else:
            key, fingerprint, finish_now = idempotency
            now = utcnow()
            claim = KeyClaim(
                key,
                fingerprint,
                now,
                locked_until=hold_until or self.holds.hold_until(),
                expires_at=now + timedelta(seconds=self.idempotency_ttl),
                finish_now=finish_now,
            )
            outcome = await self.store.claim_and_charge(request, claim)
            if outcome.kind not in (ClaimKind.CLAIMED, ClaimKind.INSUFFICIENT):
                return DeductionResult(success=False, error=f"idempotency key {outcome.kind.value}"), outcome
            charge_id, balance = outcome.charge_id, outcome.balance
        if charge_id is None and credits == 0:
            # A free feature for an organization that has no account yet: nothing to take.
            return DeductionResult(success=True, remaining_credits=balance, credits_deducted=0, required=0), outcome
        if charge_id is None:
            self.hooks.emit(InsufficientCreditsEvent(organization_id, feature_key, credits, balance))
            return DeductionResult(
                success=False,
                remaining_credits=balance,
                error=f"Insufficient credits. Required: {credits}, Available: {balance}",
                required=credits,
                error_code="insufficient_credits",
            ), outcome
        if hold:
            self.holds.track(charge_id)
        self._charged(organization_id, feature_key, credits, balance, charge_id, user_id)
        return DeductionResult(
            success=True,
            remaining_credits=balance,
            credits_deducted=credits,
            charge_id=charge_id,
            required=credits,
            unit_price=pricing.credits,
        ), outcome

    def _charged(
        self,
        organization_id: str,
        feature_key: str,
        credits: int,
        balance: int,
        charge_id: int | None,
        user_id: str | None,
        *,
        surcharge: bool = False,
    ) -> None:
        if self.hooks.wants(ChargeEvent):
            self.hooks.emit(ChargeEvent(organization_id, feature_key, credits, balance, charge_id, user_id, surcharge))
        threshold = self.low_balance_threshold
        if threshold is not None and crossed_below(threshold, balance, credits):
            self.hooks.emit(LowBalanceEvent(organization_id, balance, threshold, feature_key))

    def _refunded(self, result: RefundResult, charge_id: int, reason: str | None) -> None:
        self.holds.forget(charge_id)
        if result.refunded and result.organization_id is not None:
            self.hooks.emit(
                RefundEvent(
                    result.organization_id,
                    result.feature_key,
                    result.credits_refunded,
                    result.remaining_credits,
                    charge_id,
                    result.refund_id,
                    reason,
                )
            )

    async def refund_credits(self, charge_id: int, *, reason: str | None = None) -> RefundResult:
        """Give a charge back. Idempotent: the first call refunds, every later one is a no-op.

        A refund also closes the charge's hold, frees the idempotency key it paid for and
        gives back a surcharge taken for its usage. A charge refunds once: after a usage
        settlement refunded its unused part, the rest stays charged ("already refunded").
        """
        result = await self.store.refund(charge_id, reason)
        self._refunded(result, charge_id, reason)
        return result

    async def settle_charge(
        self, charge_id: int, *, used_credits: int | None = None, max_extra: int = 0, reason: str | None = None
    ) -> tuple[int, int]:
        """Close a hold as kept, optionally at what was really used; returns (refunded, extra charged).

        Holds only (``deduct_credits(..., hold=True)``): a plain charge is final, and
        settling it changes nothing and returns (0, 0).

        With ``used_credits`` below the charge, the difference is refunded; above it, up to
        ``max_extra`` more is taken (never beyond the balance). Exactly once: settling a
        hold that is already settled or refunded changes nothing and returns (0, 0).
        """
        if used_credits is not None and (used_credits < 0 or max_extra < 0):
            raise ValueError("used_credits and max_extra must not be negative")
        self.holds.forget(charge_id)
        if used_credits is None:
            await self.store.settle_holds([charge_id])
            return 0, 0
        moved = await self.store.settle_usage(charge_id, used_credits, max_extra, reason or "settled at reported usage")
        self._usage_settled(charge_id, moved, None)
        return moved.refunded, moved.extra

    async def release_expired_holds(self, now: datetime | None = None) -> int:
        """One sweep: refund every hold whose time ran out (a dead process's), and forget
        expired idempotency keys. Returns how many holds were released. The guard runs
        this on its own every ``sweep_interval``; ``credit-guard sweep`` runs it from cron."""
        return await self.holds.sweep(now)

    async def open_holds(self, organization_id: str | None = None) -> list[int]:
        """Charge ids still held (their requests running, or their process dead and not yet swept)."""
        return await self.store.open_holds(organization_id)

    async def flush(self) -> None:
        """Write queued settlements and let queued hooks run now (tests, shutdown)."""
        await self.holds.flush()
        await self.hooks.drain()

    # -- hooks ----------------------------------------------------------------------------

    def on_charge(self, hook: H) -> H:
        """Register ``async def hook(event: ChargeEvent)``; usable as a decorator."""
        return self.hooks.add(ChargeEvent, hook)

    def on_refund(self, hook: H) -> H:
        """Register ``async def hook(event: RefundEvent)``."""
        return self.hooks.add(RefundEvent, hook)

    def on_insufficient_credits(self, hook: H) -> H:
        """Register ``async def hook(event: InsufficientCreditsEvent)`` (each 402)."""
        return self.hooks.add(InsufficientCreditsEvent, hook)

    def on_low_balance(self, hook: H) -> H:
        """Register ``async def hook(event: LowBalanceEvent)``; needs ``low_balance_threshold``."""
        if self.low_balance_threshold is None:
            raise ValueError("on_low_balance needs CreditGuard(low_balance_threshold=...)")
        return self.hooks.add(LowBalanceEvent, hook)

    def emit(self, event: Event) -> None:
        self.hooks.emit(event)

    async def check_credits(self, organization_id: str, feature_key: str) -> CreditCheck:
        """Would the organization afford this feature now? Advice only: it reserves nothing."""
        _check_org(organization_id)
        pricing = await self.get_feature_pricing(feature_key)
        available = await self.store.balance(organization_id)
        if pricing is None:
            return CreditCheck(False, 0, available, error=f"Feature pricing not found: {feature_key}")
        return CreditCheck(available >= pricing.credits, pricing.credits, available)

    async def get_balance(self, organization_id: str) -> int:
        """The organization's balance (0 when it has no account). ValueError for a malformed id."""
        _check_org(organization_id)
        return await self.store.balance(organization_id)

    async def usage_report(
        self,
        *,
        group_by: UsageGroup = "day",
        organization_id: str | None = None,
        feature_key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        """Counts and credits charged and refunded, from the ledger; ``until`` is exclusive."""
        return await self.store.usage(
            group_by=group_by, organization_id=organization_id, feature_key=feature_key, since=since, until=until
        )

    async def audit(self) -> list[AuditIssue]:
        """Every way the books fail to add up; [] when each balance is the sum of its ledger."""
        return await self.store.audit()

    # -- the two calls the web adapters make around a handler ------------------------------

    def idempotency_key_of(self, scope: Mapping[str, Any], mode: IdempotencyMode | None = None) -> bytes | None:
        """The raw Idempotency-Key of a request when the route honours keys, else None.

        Adapters call it to know whether they must read the body (for the fingerprint)
        before ``open_charge``.
        """
        if not (self.idempotency if mode is None else mode):
            return None
        return key_from_headers(scope.get("headers") or ())

    async def open_charge(
        self,
        feature_key: str,
        scope: Mapping[str, Any],
        request: Any = None,
        *,
        units: UnitsOf | None = None,
        idempotency: IdempotencyMode | None = None,
        body: bytes | None = None,
        max_overage: float | None = None,
        charge_client_errors: bool | None = None,
    ) -> Ticket | Problem | Replay:
        """Charge for one request before its handler runs, or return what to answer instead:
        a refusal (Problem) or an idempotent replay of the first response (Replay).

        ``request`` is the framework's request object when the adapter has one; custom
        resolvers and ``units`` receive it (a Starlette HTTPConnection is built otherwise).
        ``body`` is the request body, needed only when an Idempotency-Key is honoured.
        """
        if not self.started:
            log.error(
                "credit_guard: refused %s %s: the CreditGuard was not started on this event loop; "
                "call `await guard.start()` in the app's lifespan",
                scope.get("method"),
                scope.get("path"),
            )
            return problems.not_started()
        organization_id = await self.paying_organization(scope, request)
        if isinstance(organization_id, Problem):
            return organization_id
        user_id = await self.resolve_user(scope, request)
        if user_id is not None and not is_storable_text(user_id):
            log.warning(
                "credit_guard: %s %s refused: user id %r %s",
                scope.get("method"),
                scope.get("path"),
                user_id[:80],
                UNSTORABLE_TEXT,
            )
            return problems.no_organization(f"The user id this request resolved to {UNSTORABLE_TEXT}.")
        count = ONE
        if units is not None:
            try:
                value = units(request if request is not None else _connection(scope))
                if inspect.isawaitable(value):
                    value = await value
                count = units_value(value)
            except (ValueError, TypeError, LookupError) as exc:
                why = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
                log.info("credit_guard: %s %s refused: bad units: %s", scope.get("method"), scope.get("path"), why)
                return problems.invalid_request({"units": why or type(exc).__name__}, status=422)
        mode = self.idempotency if idempotency is None else idempotency
        key: str | None = None
        fingerprint = ""
        if mode:
            raw_key = key_from_headers(scope.get("headers") or ())
            if raw_key is None and mode == "required":
                return problems.invalid_request({IDEMPOTENCY_HEADER: "this route requires an Idempotency-Key header"})
            if raw_key is not None:
                key = validate_key(raw_key)
                if key is None:
                    return problems.invalid_request({IDEMPOTENCY_HEADER: "must be 1 to 255 visible ASCII characters"})
                fingerprint = request_fingerprint(
                    str(scope.get("method", "")),
                    str(scope.get("path", "")),
                    scope.get("query_string") or b"",
                    body or b"",
                    user_id,
                )
        try:
            for attempt in range(2):
                result, outcome = await self._deduct(
                    organization_id,
                    feature_key,
                    user_id,
                    units=count,
                    idempotency=(key, fingerprint, False) if key is not None else None,
                    hold=True,
                    request_method=scope.get("method"),
                    request_path=scope.get("path"),
                    checked=True,
                )
                if attempt or outcome is None or outcome.kind is not ClaimKind.RUNNING:
                    break
                assert key is not None
                await self._await_finished_response(organization_id, key)
        except StorageUnavailable:
            if self.fail_open:
                log.warning("credit_guard: database down, %r served FREE (fail_open=True)", feature_key)
                return Ticket(feature_key, organization_id, 0, None, None)
            return problems.unavailable(self.retry_after)
        if outcome is not None and outcome.kind not in (ClaimKind.CLAIMED, ClaimKind.INSUFFICIENT):
            assert key is not None and outcome.stored is not None
            if outcome.kind is ClaimKind.REPLAY:
                log.info("credit_guard: replayed %r for %s (not charged again)", key, organization_id)
                return Replay.from_stored(outcome.stored)
            if outcome.kind is ClaimKind.RUNNING:
                return problems.idempotency_conflict(key, retry_after=1)
            return problems.idempotency_mismatch(key)
        if result.success:
            assert result.credits_deducted is not None
            return Ticket(
                feature_key,
                organization_id,
                result.credits_deducted,
                result.remaining_credits,
                result.charge_id,
                unit_price=result.unit_price or 0,
                units=count,
                max_overage=self.max_overage if max_overage is None else max_overage,
                idempotency_key=key,
                recorder=ResponseRecorder(self.idempotency_max_body) if key is not None else None,
                user_id=user_id,
                charge_client_errors=self.charge_client_errors
                if charge_client_errors is None
                else charge_client_errors,
            )
        if result.error_code == "insufficient_credits":
            assert result.required is not None and result.remaining_credits is not None
            return problems.insufficient_credits(feature_key, result.required, result.remaining_credits)
        if self.allow_unpriced:
            log.warning("credit_guard: %s; served free (allow_unpriced=True)", result.error)
            return Ticket(feature_key, organization_id, 0, None, None)
        log.error("credit_guard: refused %s %s: %s", scope.get("method"), scope.get("path"), result.error)
        if result.error_code == "feature_inactive":
            return problems.feature_inactive(feature_key)
        return problems.feature_not_found(feature_key)

    async def settle(
        self, ticket: Ticket, *, failed: bool, reason: str | None = None, status: int | None = None
    ) -> None:
        """Close a request's charge: keep it, or refund it if the request failed.

        Kept: the hold is queued for the batched settlement (no round trip here), with
        the recorded response when the request carried an idempotency key. If the handler
        reported its usage, the difference is settled now, exactly once.

        Refunded: a refunded charge is never refunded again, here or in the database,
        whose UNIQUE ``refund_of`` makes a retry after a lost answer harmless. A refund
        that still fails after the retries is logged with its charge id; the hold it
        still is will be released by the sweeper, so the credits come back either way.
        """
        if failed:
            if ticket.refund is None and ticket.charge_id is not None:
                await self._refund_retrying(ticket, reason)
            elif ticket.charge_id is None and ticket.idempotency_key is not None and not ticket.settled:
                # A free request failed: its key must not replay the failure.
                try:
                    await self.store.release_key(ticket.organization_id, ticket.idempotency_key)
                except StorageUnavailable:
                    pass  # the key's lock runs out and it is reclaimed then
            ticket.settled = True
            return
        if ticket.settled:
            return
        ticket.settled = True
        completion = None
        if ticket.idempotency_key is not None:
            recorder = ticket.recorder
            if recorder is None or recorder.status is None:
                # The adapter never saw the bytes on the wire (a handler returning a plain
                # value, serialised later by its framework): replay status only.
                recorder = ResponseRecorder(0, status=status or 200, overflow=True)
            completion = Completion(
                ticket.organization_id,
                ticket.idempotency_key,
                # The TTL runs from the answer, so a long request's key does not die young.
                expires_at=utcnow() + timedelta(seconds=self.idempotency_ttl),
                **recorder.stored(),
            )
        charge_id = ticket.charge_id
        if charge_id is not None and ticket.used_units is not None:
            used = cost_of(ticket.unit_price, ticket.used_units)
            if used != ticket.credits and await self._settle_usage(ticket, used):
                self.holds.forget(charge_id)
                charge_id = None  # closed by the usage settlement: nothing left to batch
        self.holds.settle_later(charge_id, completion)

    async def _settle_usage(self, ticket: Ticket, used: int) -> bool:
        """Settle at the reported usage now; False when the database could not be reached
        (the hold then goes to the batch and is kept at its reserve)."""
        assert ticket.charge_id is not None
        max_extra = math.floor(ticket.credits * ticket.max_overage)
        try:
            moved = await self.store.settle_usage(
                ticket.charge_id, used, max_extra, f"used {ticket.used_units} of {ticket.units} units"
            )
        except StorageUnavailable:
            log.error(
                "credit_guard: could not settle charge %s at its usage (%s credits); it stays charged at %s",
                ticket.charge_id,
                used,
                ticket.credits,
            )
            return False
        ticket.adjustment = moved.extra - moved.refunded
        self._usage_settled(ticket.charge_id, moved, ticket.user_id)
        if used > ticket.credits + moved.extra:
            log.warning(
                "credit_guard: charge %s used %s credits, %s reserved; %s beyond max_overage went unpaid",
                ticket.charge_id,
                used,
                ticket.credits,
                used - ticket.credits - moved.extra,
            )
        return True

    def _usage_settled(self, charge_id: int, moved: UsageSettlement, user_id: str | None) -> None:
        if moved.organization_id is None or moved.balance is None:
            return
        if moved.refunded:
            self.hooks.emit(
                RefundEvent(
                    moved.organization_id,
                    moved.feature_key,
                    moved.refunded,
                    moved.balance,
                    charge_id,
                    moved.refund_id,
                    "unused reserve",
                )
            )
        if moved.extra:
            self._charged(
                moved.organization_id,
                moved.feature_key or "",
                moved.extra,
                moved.balance,
                charge_id,
                user_id or moved.user_id,
                surcharge=True,
            )

    async def _refund_retrying(self, ticket: Ticket, reason: str | None) -> None:
        assert ticket.charge_id is not None
        delay = 0.05
        for attempt in range(1, self.refund_attempts + 1):
            try:
                ticket.refund = await self.refund_credits(ticket.charge_id, reason=reason)
                log.info(
                    "credit_guard: refunded charge %s (%s credits) to %s: %s",
                    ticket.charge_id,
                    ticket.credits,
                    ticket.organization_id,
                    reason,
                )
                return
            except StorageUnavailable:
                if attempt == self.refund_attempts:
                    # Not this process's to keep alive any more: the sweeper gives it back.
                    self.holds.forget(ticket.charge_id)
                    log.error(
                        "credit_guard: REFUND FAILED for charge %s (%s credits, org %s); the sweeper "
                        "releases it after hold_timeout, or run guard.refund_credits(%s)",
                        ticket.charge_id,
                        ticket.credits,
                        ticket.organization_id,
                        ticket.charge_id,
                    )
                    return
                await anyio.sleep(delay)
                delay *= 4

    async def _await_finished_response(self, organization_id: str, key: str) -> None:
        """Before answering a retry 409: its first request may have just finished, with the
        response to replay still in a settlement batch (a client retrying a lost answer
        does so at once). This process's batch is written now; another process's lands
        within a couple of ``settle_delay``, so wait that long (capped) and look again."""
        if self.holds.has_completion(organization_id, key):
            await self.holds.flush()
        else:
            await anyio.sleep(min(2 * self.holds.settle_delay + 0.05, 0.25))

    async def resolve_organization(self, scope: Mapping[str, Any], request: Any = None) -> str | None:
        """The organization a request pays with (the same rule for every adapter and endpoint)."""
        return await self._resolve(self.organization_resolver, "organization_id", scope, request)

    async def paying_organization(self, scope: Mapping[str, Any], request: Any = None) -> str | Problem:
        """The resolved organization, or the 401 to answer: none, or an id no account can
        have (longer than the ledger's column; a resolver that trusts a client header can
        produce one). Logged, since it may as well be the app's own misconfiguration."""
        organization_id = await self.resolve_organization(scope, request)
        if not organization_id:
            log.info("credit_guard: %s %s refused: no organization", scope.get("method"), scope.get("path"))
            return problems.no_organization()
        if len(organization_id) > ORGANIZATION_ID_MAX:
            log.warning(
                "credit_guard: %s %s refused: organization id of %d characters (at most %d)",
                scope.get("method"),
                scope.get("path"),
                len(organization_id),
                ORGANIZATION_ID_MAX,
            )
            return problems.no_organization(
                f"The organization id this request resolved to is longer than {ORGANIZATION_ID_MAX} characters."
            )
        if not is_storable_text(organization_id):
            # NUL or a lone surrogate: the database cannot store it, and must not be asked to
            # (its error would read as an outage: a 503, or free service under fail_open).
            log.warning(
                "credit_guard: %s %s refused: organization id %r %s",
                scope.get("method"),
                scope.get("path"),
                organization_id[:80],
                UNSTORABLE_TEXT,
            )
            return problems.no_organization(f"The organization id this request resolved to {UNSTORABLE_TEXT}.")
        return organization_id

    async def resolve_user(self, scope: Mapping[str, Any], request: Any = None) -> str | None:
        return await self._resolve(self.user_resolver, "user_id", scope, request)

    async def _resolve(self, resolver: Resolver | None, key: str, scope: Mapping[str, Any], request: Any) -> str | None:
        if resolver is None:
            state = scope.get("state")
            if type(state) is dict or isinstance(state, Mapping):
                value = state.get(key)
            else:
                value = getattr(getattr(request, "state", None), key, None)
        else:
            value = resolver(request if request is not None else _connection(scope))
            if inspect.isawaitable(value):
                value = await value
        return str(value) if value not in (None, "") else None


def _connection(scope: Mapping[str, Any]) -> Any:
    """A Starlette HTTPConnection for callbacks when the adapter has no request object."""
    from starlette.requests import HTTPConnection

    return HTTPConnection(dict(scope) if not isinstance(scope, dict) else scope)


def current_ticket(request: Any) -> Ticket | None:
    """The charge of the request being handled (to ``report_usage``), or None.

    Accepts the framework's request object or the ASGI scope itself.
    """
    scope = request if type(request) is dict or isinstance(request, Mapping) else getattr(request, "scope", {})
    state = scope.get("state")
    ticket = state.get(TICKET_SCOPE_KEY) if type(state) is dict or isinstance(state, Mapping) else None
    return ticket if isinstance(ticket, Ticket) else None


def _check_org(organization_id: object) -> None:
    if (
        not isinstance(organization_id, str)
        or not organization_id
        or len(organization_id) > ORGANIZATION_ID_MAX
        or not is_storable_text(organization_id)
    ):
        raise ValueError(
            f"organization_id must be a non-empty string of at most {ORGANIZATION_ID_MAX} characters,"
            f" without NUL characters or unpaired surrogates, got {organization_id!r:.80}"
        )


@functools.lru_cache(maxsize=4096)
def _valid_feature_key(feature_key: object) -> bool:
    """Whether a pricing row could have this key (routes use a handful: cached)."""
    return (
        isinstance(feature_key, str)
        and len(feature_key) <= FEATURE_KEY_MAX
        and bool(FEATURE_KEY_RE.fullmatch(feature_key))
    )


def _storable(text: str) -> str:
    """``text`` as the database can store it: a percent-decoded path may hold NUL or a lone
    surrogate, which must be charged and recorded (escaped), not mistaken for an outage."""
    if is_storable_text(text):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _check_key(idempotency_key: object) -> None:
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or validate_key(idempotency_key.encode("utf-8")) != idempotency_key
    ):
        raise ValueError(f"idempotency_key must be 1 to 255 visible ASCII characters, got {idempotency_key!r:.80}")
