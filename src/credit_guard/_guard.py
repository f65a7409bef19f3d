"""CreditGuard: the facade an app holds, its configuration and its lifecycle.

The money rules live in ``_ledger.py``, pricing in ``_pricing.py``, holds in
``_holds.py``, hooks in ``_hooks.py``, the web request flow in ``_flow.py``; this module
wires them over one store and starts and stops what runs on an event loop. Nothing here
imports a web framework.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from limits.aio.storage import Storage

from ._accounts_api import AccountsApi
from ._config import (
    DATABASE_URL_ENV,
    ConnectionBudget,
    IdempotencyMode,
    Resolver,
    check_idempotency,
    check_max_overage,
)
from ._grants import Grants
from ._holds import HoldKeeper
from ._hooks import HookDispatcher
from ._hooks_api import HooksApi
from ._ledger import Ledger
from ._members_api import MembersApi
from ._plans_api import PlansApi
from ._pricing import Pricing
from ._ratelimit import RateLimits
from ._reservations import Reservations
from ._storage import open_store
from ._storage.engine import DEFAULT_DATABASE_URL, build_engine, parse_database_url
from ._topups import AutoTopups, fan_out
from ._webhooks import Webhooks
from .models import (
    AuditIssue,
    DeductionResult,
    FeaturePricing,
    RefundResult,
    UsageGroup,
    UsageRow,
)

log = logging.getLogger("credit_guard")


class CreditGuard(AccountsApi, PlansApi, HooksApi, MembersApi):
    """Pay-per-use credits in front of an ASGI app: the one object an app holds.

    A thin facade: it wires the services (``pricing``, ``ledger``, ``grants``,
    ``reservations``, ``holds``, ``hooks``)
    over one store, runs them on an event loop (``start``/``close``, any number of times,
    on any loop) and offers the Python API, each method a call into one service.

    Every argument is in the README's Configuration table. The ones that decide safety:
    ``fail_open`` (serve free during an outage: off, an outage must not become free
    service), ``allow_unpriced`` (serve unknown or inactive features free: off),
    ``charge_client_errors`` (keep the charge of a 4xx: off, users pay for results),
    ``hold_timeout`` (how long a crashed process keeps credits before the sweeper gives
    them back; live requests keep theirs alive) and ``max_connections`` (the one budget
    of database connections per process, see ``ConnectionBudget``). Resolvers
    (``organization_resolver``, ``user_resolver``) default to ``request.state``; never a
    client-chosen header unless you write that resolver yourself.
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
        rate_limit_storage: str | Storage = "memory://",
    ) -> None:
        check_idempotency(idempotency)
        if hold_timeout <= 0 or (sweep_interval is not None and sweep_interval <= 0):
            raise ValueError("hold_timeout and sweep_interval must be positive")
        check_max_overage(max_overage)
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
            else parse_database_url(database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)
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
            url=url,
            **dict(asyncpg_pool_kwargs or {}),
        )
        #: The event loop ``start()`` ran on; paid requests are refused on any other (see ``started``).
        self._started_on: asyncio.AbstractEventLoop | None = None
        # What the request flow reads (``_flow.py``).
        self.organization_resolver = organization_resolver
        self.user_resolver = user_resolver
        self.allow_unpriced = allow_unpriced
        self.fail_open = fail_open
        self.retry_after = retry_after
        self.idempotency = idempotency
        self.idempotency_max_body = idempotency_max_body
        self.idempotency_max_request_body = idempotency_max_request_body
        self.max_overage = max_overage
        self.charge_client_errors = charge_client_errors
        # The services, each with one job.
        self.pricing = Pricing(
            self.store, ttl=pricing_ttl, maxsize=pricing_cache_size, notify=pricing_notify, timeout=timeout
        )
        self.hooks = HookDispatcher(timeout=hook_timeout)
        self.holds = HoldKeeper(
            self.store,
            hold_timeout=hold_timeout,
            sweep_interval=sweep_interval if sweep_interval is not None else hold_timeout / 4,
            settle_delay=settle_delay,
        )
        self.holds.sweeping = sweep
        self.ledger = Ledger(
            self.store,
            self.pricing,
            self.holds,
            self.hooks,
            idempotency_ttl=idempotency_ttl,
            refund_attempts=refund_attempts,
            low_balance_threshold=low_balance_threshold,
        )
        self.grants = Grants(self.store, self.hooks, low_balance_threshold=low_balance_threshold)
        self.reservations = Reservations(self.ledger, max_overage=max_overage)
        self.holds.also_sweep = self.renew_and_expire
        self.ledger.renew = self.renew_now
        #: Signed webhooks from the outbox (off until ``webhooks.send_to(url, secret=...)``).
        self.webhooks = Webhooks(self.store, low_balance_threshold=low_balance_threshold)
        self.topups = AutoTopups(self.store)
        #: Routes' ``rate=`` limits (``_ratelimit.py``): memory, or ``redis://`` for many workers.
        self.rate_limits = RateLimits(rate_limit_storage, timeout=timeout)
        self.ledger.watch = self.grants.watch = fan_out(self.webhooks.moved, self.topups.moved)

    # -- lifecycle ------------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create credit_guard's tables if they are missing; safe to call on every start,
        from any number of processes at once."""
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
        self._started_on = loop
        log.info("credit_guard: started on %s", describe_database(self.engine.url))
        await self.holds.start()
        self.hooks.start()
        await self.webhooks.start()
        await self.topups.start()
        if self.pricing.notifier is not None:
            await self.pricing.notifier.start()

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
        await self.webhooks.close()
        await self.topups.close()
        await self.hooks.close()
        if self.pricing.notifier is not None:
            await self.pricing.notifier.close()
        self.pricing.cache.forget_loads()
        await self.rate_limits.close()
        await self.store.close()

    async def __aenter__(self) -> CreditGuard:
        """``async with CreditGuard(...) as guard``: started on entry, closed on exit."""
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def idempotency_ttl(self) -> float:
        """Seconds a key (and its stored response) is kept, counted from the answer."""
        return self.ledger.idempotency_ttl

    @idempotency_ttl.setter
    def idempotency_ttl(self, seconds: float) -> None:
        self.ledger.idempotency_ttl = seconds

    # -- pricing (``_pricing.py``) ----------------------------------------------------------

    async def get_feature_pricing(self, feature_key: str) -> FeaturePricing | None:
        """Active pricing for a key, or None; served from the TTL cache."""
        return await self.pricing.active(feature_key)

    async def create_pricing(
        self,
        *,
        feature_key: str,
        feature_name: str,
        category: str,
        credits: int,
        description: str | None = None,
        is_active: bool = True,
        pool: str | None = None,
        pool_fallback: bool = False,
    ) -> FeaturePricing:
        """Add a feature's price. Raises InvalidPricing or DuplicateFeature; writes nothing then.

        ``pool``: the credit pool its charges draw from (grants given with the same
        ``pool``), None for the general pool; ``pool_fallback``: once the pool's grants are
        spent, draw from general ones (the overdraft line among them) too."""
        return await self.pricing.create(
            feature_key=feature_key,
            feature_name=feature_name,
            category=category,
            credits=credits,
            description=description,
            is_active=is_active,
            pool=pool,
            pool_fallback=pool_fallback,
        )

    async def list_pricing(self, *, category: str | None = None, is_active: bool | None = None) -> list[FeaturePricing]:
        return await self.store.list_pricing(category=category, is_active=is_active)

    async def get_pricing(self, pricing_id: str) -> FeaturePricing | None:
        """A pricing row by id, active or not (the admin's view; not cached)."""
        return await self.store.pricing_by_id(pricing_id)

    async def update_pricing(self, pricing_id: str, **changes: Any) -> FeaturePricing:
        """Change some fields of a pricing row. Raises PricingNotFound, InvalidPricing, DuplicateFeature."""
        return await self.pricing.update(pricing_id, changes)

    async def delete_pricing(self, pricing_id: str) -> FeaturePricing:
        """Delete a pricing row; past ledger rows keep their feature key. Raises PricingNotFound."""
        return await self.pricing.delete(pricing_id)

    async def import_pricing(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool = False
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
        """Add many prices at once, all or nothing (seeding an environment); returns (created, updated).

        Every row is validated before anything is written: InvalidPricing then names each
        bad field as ``"row N: field"`` (rows count from 1). A key that already exists
        raises DuplicateFeature unless ``update_existing``, which overwrites the fields the
        row gives and leaves the others as they are.
        """
        return await self.pricing.import_rows(rows, update_existing=update_existing)

    async def pricing_changed(self, *feature_keys: str) -> None:
        """Forget these keys' cached prices here and in every process sharing a PostgreSQL
        database; call it after writing the pricing table some other way (raw SQL)."""
        await self.pricing.changed(*feature_keys)

    # -- credits (``_ledger.py``) -----------------------------------------------------------

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

        Raises StorageUnavailable when the database cannot be reached: a charge whose
        outcome is unknown must not be mistaken for either answer.
        """
        return await self.ledger.deduct(
            organization_id,
            feature_key,
            user_id,
            units=units,
            idempotency_key=idempotency_key,
            hold=hold,
            request_method=request_method,
            request_path=request_path,
        )

    async def refund_credits(self, charge_id: int, *, reason: str | None = None) -> RefundResult:
        """Give a charge back. Idempotent: the first call refunds, every later one is a no-op.

        A refund also closes the charge's hold, frees the idempotency key it paid for and
        gives back an overage taken for its usage. A charge refunds once: after a usage
        settlement refunded its unused part, the rest stays charged ("already refunded").
        """
        return await self.ledger.refund(charge_id, reason=reason)

    async def settle_charge(
        self,
        charge_id: int,
        *,
        used_credits: int | None = None,
        max_overage_credits: int = 0,
        reason: str | None = None,
        max_extra: int | None = None,
    ) -> tuple[int, int]:
        """Close a hold as kept, optionally at what was really used; returns (refunded, overage charged).

        Holds only (``deduct_credits(..., hold=True)``): a plain charge is final, and
        settling it changes nothing and returns (0, 0). With ``used_credits`` below the
        charge, the difference is refunded; above it, up to ``max_overage_credits`` more is
        taken (never beyond the balance). Exactly once: settling a hold that is already
        settled or refunded changes nothing and returns (0, 0). (``max_extra``: the old
        name of ``max_overage_credits``, deprecated.)
        """
        if max_extra is not None:
            warnings.warn("max_extra is deprecated: pass max_overage_credits", DeprecationWarning, stacklevel=2)
            max_overage_credits = max_extra
        return await self.ledger.settle(
            charge_id, used_credits=used_credits, max_overage_credits=max_overage_credits, reason=reason
        )

    async def release_expired_holds(self, now: datetime | None = None) -> int:
        """One sweep: refund every hold whose time ran out (a dead process's), and forget
        expired idempotency keys. Returns how many holds were released. The guard runs
        this on its own every ``sweep_interval``; ``credit-guard sweep`` runs it from cron."""
        return await self.ledger.release_expired_holds(now)

    async def open_holds(self, organization_id: str | None = None) -> list[int]:
        """Charge ids still held (their requests running, or their process dead and not yet swept)."""
        return await self.ledger.open_holds(organization_id)

    async def flush(self) -> None:
        """Write queued settlements and let queued hooks run now (tests, shutdown)."""
        await self.holds.flush()
        await self.hooks.drain()

    async def usage_report(
        self,
        *,
        group_by: UsageGroup = "day",
        organization_id: str | None = None,
        feature_key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        split_by: UsageGroup | None = None,
    ) -> list[UsageRow]:
        """Counts and credits charged and refunded, from the ledger; ``until`` is exclusive.

        ``split_by`` groups each group again (``group_by="day", split_by="feature"``: one
        row per day and feature, the series of a usage chart); the second value is ``row.split``.
        """
        return await self.ledger.usage(
            group_by=group_by,
            organization_id=organization_id,
            feature_key=feature_key,
            since=since,
            until=until,
            split_by=split_by,
        )

    async def audit(self) -> list[AuditIssue]:
        """Every way the books fail to add up; [] when each balance is the sum of its ledger."""
        return await self.ledger.audit()


def describe_database(url: URL) -> str:
    """The database a guard uses, as a log line may name it: the password hidden, and a
    SQLite file as its absolute path (the default, ``credit_guard.db``, lands in whatever
    directory the process was started from: say which)."""
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return f"SQLite file {os.path.abspath(url.database)}"
    return url.render_as_string(hide_password=True)
