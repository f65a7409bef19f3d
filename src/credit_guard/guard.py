"""CreditGuard: the money path, top to bottom.

    resolve organization -> price (TTL cache) -> deduct (one atomic statement)
        -> handler runs -> failed? refund exactly once -> headers

The engine methods (``deduct_credits``, ``refund_credits`` ...) are the seed's helper
functions; ``open_charge`` and ``settle`` are the two calls the web adapters make
around a handler. Nothing here imports a web framework.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from . import problems
from .engine import DEFAULT_DATABASE_URL, build_engine
from .errors import InvalidPricing, PricingNotFound, StorageUnavailable
from .models import (
    AuditIssue,
    CreditCheck,
    DeductionResult,
    FeaturePricing,
    RefundResult,
    UsageGroup,
    UsageRow,
    validate_pricing_fields,
    validate_pricing_rows,
)
from .notify import PricingNotifier
from .pricing import PricingCache
from .problems import Problem
from .store import SqlStore

log = logging.getLogger("credit_guard")

#: Takes the framework's request object (anything with ``.state``, ``.headers``, ``.scope``)
#: and returns the id, or None when the request has none. May be sync or async.
Resolver = Callable[[Any], "str | Awaitable[str | None] | None"]

DATABASE_URL_ENV = "CREDIT_GUARD_DATABASE_URL"
#: Column widths of the ledger (schema.py); longer values are refused or clipped up front.
ORGANIZATION_ID_MAX = 255
USER_ID_MAX = 255
REQUEST_PATH_MAX = 2048
#: Far above any real top-up, far below BIGINT's limit: a typo, not a grant, beyond it.
MAX_GRANT = 2**53


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
        pg_pool_size / asyncpg_pool_kwargs: the asyncpg pool that carries deductions on
            PostgreSQL (behind PgBouncer pass ``{"statement_cache_size": 0}``).
        pricing_notify: on PostgreSQL, tell every other process sharing the database about
            each pricing write (LISTEN/NOTIFY, see ``notify.py``) so none waits for its TTL.
            Turn off behind PgBouncer's transaction pooling, which cannot carry LISTEN.
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
        refund_attempts: int = 3,
        pg_pool_size: int = 10,
        asyncpg_pool_kwargs: Mapping[str, Any] | None = None,
        pricing_notify: bool = True,
    ) -> None:
        # An engine handed in belongs to the app: close() must leave it open.
        self._owns_engine = engine is None
        if engine is None:
            url = make_url(database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)
            engine = build_engine(url, connect_timeout=timeout)
        else:
            url = engine.url
        self.engine = engine
        self.store = SqlStore(engine)
        self._charger: Any = self.store
        if url.drivername == "postgresql+asyncpg":
            from .pgcharge import PgCharger

            self._charger = PgCharger(url, pool_size=pg_pool_size, timeout=timeout, **dict(asyncpg_pool_kwargs or {}))
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

    # -- lifecycle ------------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create credit_guard's tables if they are missing; safe to call on every start."""
        await self.store.create_schema()

    async def start(self) -> None:
        """Listen for other processes' pricing changes now rather than on the first price
        lookup (PostgreSQL; a no-op elsewhere). Optional, and never fails the startup."""
        if self.notifier is not None:
            await self.notifier.start()

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()
        if self._charger is not self.store:
            await self._charger.close()
        if self._owns_engine:
            await self.store.close()

    async def __aenter__(self) -> CreditGuard:
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

    async def grant_credits(self, organization_id: str, amount: int, *, reason: str | None = None) -> int:
        """Top an organization up (creating its account); returns the new balance."""
        _check_org(organization_id)
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_GRANT:
            raise ValueError(f"amount must be a positive integer up to {MAX_GRANT}, got {amount!r}")
        balance, _ = await self.store.grant(organization_id, amount, reason)
        return balance

    async def deduct_credits(
        self,
        organization_id: str,
        feature_key: str,
        user_id: str | None = None,
        *,
        request_method: str | None = None,
        request_path: str | None = None,
    ) -> DeductionResult:
        """Charge a feature's price, atomically, or say why not.

        Raises StorageUnavailable when the database cannot be reached: a deduction whose
        outcome is unknown must not be mistaken for either answer.
        """
        _check_org(organization_id)
        pricing = await self.pricing_cache.get(feature_key)
        if pricing is None:
            return DeductionResult(
                success=False, error=f"Feature pricing not found: {feature_key}", error_code="feature_not_found"
            )
        if not pricing.is_active:
            return DeductionResult(
                success=False, error=f"Feature is inactive: {feature_key}", error_code="feature_inactive"
            )
        charge_id, balance = await self._charger.deduct(
            organization_id,
            pricing.credits,
            feature_key=feature_key,
            # Clipped to their columns: a long URL must be charged, not mistaken for an outage.
            user_id=user_id[:USER_ID_MAX] if user_id else user_id,
            request_method=request_method,
            request_path=request_path[:REQUEST_PATH_MAX] if request_path else request_path,
        )
        if charge_id is None and pricing.credits == 0:
            # A free feature for an organization that has no account yet: nothing to take.
            return DeductionResult(success=True, remaining_credits=balance, credits_deducted=0, required=0)
        if charge_id is None:
            return DeductionResult(
                success=False,
                remaining_credits=balance,
                error=f"Insufficient credits. Required: {pricing.credits}, Available: {balance}",
                required=pricing.credits,
                error_code="insufficient_credits",
            )
        return DeductionResult(
            success=True,
            remaining_credits=balance,
            credits_deducted=pricing.credits,
            charge_id=charge_id,
            required=pricing.credits,
        )

    async def refund_credits(self, charge_id: int, *, reason: str | None = None) -> RefundResult:
        """Give a charge back. Idempotent: the first call refunds, every later one is a no-op."""
        return await self.store.refund(charge_id, reason)

    async def check_credits(self, organization_id: str, feature_key: str) -> CreditCheck:
        """Would the organization afford this feature now? Advice only: it reserves nothing."""
        pricing = await self.get_feature_pricing(feature_key)
        available = await self.store.balance(organization_id)
        if pricing is None:
            return CreditCheck(False, 0, available, error=f"Feature pricing not found: {feature_key}")
        return CreditCheck(available >= pricing.credits, pricing.credits, available)

    async def get_balance(self, organization_id: str) -> int:
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

    async def open_charge(self, feature_key: str, scope: Mapping[str, Any], request: Any = None) -> Ticket | Problem:
        """Charge for one request before its handler runs, or return the refusal to send.

        ``request`` is the framework's request object when the adapter has one; custom
        resolvers receive it (a Starlette HTTPConnection is built for them otherwise).
        """
        organization_id = await self.resolve_organization(scope, request)
        if not organization_id:
            log.info("credit_guard: %s %s refused: no organization", scope.get("method"), scope.get("path"))
            return problems.no_organization()
        user_id = await self.resolve_user(scope, request)
        try:
            result = await self.deduct_credits(
                organization_id,
                feature_key,
                user_id,
                request_method=scope.get("method"),
                request_path=scope.get("path"),
            )
        except StorageUnavailable:
            if self.fail_open:
                log.warning("credit_guard: database down, %r served FREE (fail_open=True)", feature_key)
                return Ticket(feature_key, organization_id, 0, None, None)
            return problems.unavailable(self.retry_after)
        if result.success:
            assert result.credits_deducted is not None
            return Ticket(
                feature_key, organization_id, result.credits_deducted, result.remaining_credits, result.charge_id
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

    async def settle(self, ticket: Ticket, *, failed: bool, reason: str | None = None) -> None:
        """Close a request's charge: keep it, or refund it if the request failed.

        A kept charge can still be refunded later (a stream that breaks after its headers
        went out); a refunded one is never refunded again, here or in the database, whose
        UNIQUE ``refund_of`` makes a retry after a lost answer harmless. A refund that
        still fails after the retries is logged with its charge id for a manual
        ``refund_credits`` (it is never silently dropped).
        """
        ticket.settled = True
        if not failed or ticket.charge_id is None or ticket.refund is not None:
            return
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
                    log.error(
                        "credit_guard: REFUND FAILED for charge %s (%s credits, org %s); "
                        "run guard.refund_credits(%s) once the database is back",
                        ticket.charge_id,
                        ticket.credits,
                        ticket.organization_id,
                        ticket.charge_id,
                    )
                    return
                await anyio.sleep(delay)
                delay *= 4

    async def resolve_organization(self, scope: Mapping[str, Any], request: Any = None) -> str | None:
        """The organization a request pays with (the same rule for every adapter and endpoint)."""
        return await self._resolve(self.organization_resolver, "organization_id", scope, request)

    async def resolve_user(self, scope: Mapping[str, Any], request: Any = None) -> str | None:
        return await self._resolve(self.user_resolver, "user_id", scope, request)

    async def _resolve(self, resolver: Resolver | None, key: str, scope: Mapping[str, Any], request: Any) -> str | None:
        if resolver is None:
            state = scope.get("state")
            if isinstance(state, Mapping):
                value = state.get(key)
            else:
                value = getattr(getattr(request, "state", None), key, None)
        else:
            if request is None:
                from starlette.requests import HTTPConnection

                request = HTTPConnection(dict(scope) if not isinstance(scope, dict) else scope)
            value = resolver(request)
            if inspect.isawaitable(value):
                value = await value
        return str(value) if value not in (None, "") else None


def _check_org(organization_id: object) -> None:
    if not isinstance(organization_id, str) or not organization_id or len(organization_id) > ORGANIZATION_ID_MAX:
        raise ValueError(
            f"organization_id must be a non-empty string of at most {ORGANIZATION_ID_MAX} characters,"
            f" got {organization_id!r:.80}"
        )
