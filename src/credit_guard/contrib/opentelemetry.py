"""OpenTelemetry metrics for a CreditGuard (``pip install "credit_guard[otel]"``).

    from credit_guard.contrib.opentelemetry import instrument

    instrument(guard)                              # the global MeterProvider
    instrument(guard, meter_provider=provider)     # or the app's own

Once per guard, before or after ``start()``; it lasts across restarts, and
``uninstrument(guard)`` stops it. The only module of credit_guard that imports
OpenTelemetry: a guard that is not instrumented reports through the core's seam
(``_metrics.py``), which costs it one ``is None`` check per place and imports nothing.

What is reported (names and units as OpenTelemetry's conventions have them; exported to
Prometheus as ``credit_guard_charges_total``, ``credit_guard_charge_duration_seconds``...):

==================================  ============  ==========================================
credit_guard.charges                {charge}      charges taken (requests, ``deduct_credits``,
                                                  reservations), by feature key
credit_guard.credits.charged        {credit}      credits taken, overage settlements included
credit_guard.refunds                {refund}      refunds (failed requests, expired holds,
                                                  released jobs, unused reserves)
credit_guard.credits.refunded       {credit}      credits given back
credit_guard.refusals               {request}     402s (``reason=insufficient_credits``) and
                                                  503s (``reason=unavailable``), by feature key
credit_guard.charge.duration        s             how long a paid request's charge took to
                                                  decide (price lookup and charge statement),
                                                  by feature key and outcome
credit_guard.holds.open             {hold}        open holds in the database (gauge)
credit_guard.reservations.open      {reservation} open job reservations in the database (gauge)
credit_guard.sweeper.releases       {hold}        expired holds the sweeper gave back
credit_guard.pricing.cache          {lookup}      price lookups, ``credit_guard.cache.result``
                                                  ``hit`` or ``miss``
==================================  ============  ==========================================

Attributes are ``credit_guard.feature_key``, ``credit_guard.outcome``,
``credit_guard.reason`` and ``credit_guard.cache.result``: bounded sets, never an
organization or a user. The two gauges are counted by the database when metrics are
collected (a scrape), never on a request: every process reports the same database-wide
number, so aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version

from sqlalchemy import func, select

from .._guard import CreditGuard
from .._metrics import Metrics, Outcome
from ..schema import holds, reservations

try:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation, get_meter_provider
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        'credit_guard.contrib.opentelemetry needs OpenTelemetry: pip install "credit_guard[otel]"'
    ) from exc

log = logging.getLogger("credit_guard")

#: The instrumentation scope's name (the meter's).
SCOPE = "credit_guard"
FEATURE_KEY = "credit_guard.feature_key"
OUTCOME = "credit_guard.outcome"
REASON = "credit_guard.reason"
CACHE_RESULT = "credit_guard.cache.result"
#: A charge is decided in a millisecond or two; the SDK's default buckets (0, 5, 10, 25...
#: made for milliseconds) would put every one of them in the first, so these are advised.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Outcomes that answer a refusal, counted by ``credit_guard.refusals``.
REFUSALS: frozenset[Outcome] = frozenset(
    {"insufficient_credits", "member_limit_reached", "unavailable", "rate_limited"}
)


def _package_version() -> str:
    try:
        return version("credit_guard")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


class CreditGuardMetrics(Metrics):
    """One guard's OpenTelemetry instruments; the guard calls them through ``_metrics.Metrics``.

    Everything here runs on the request path except the gauges' callbacks: instruments
    are made once, and the attribute mappings are made once per feature key and reused.
    """

    def __init__(self, guard: CreditGuard, meter_provider: MeterProvider | None = None) -> None:
        meter = (meter_provider or get_meter_provider()).get_meter(SCOPE, _package_version())
        self.charges = meter.create_counter(
            "credit_guard.charges", unit="{charge}", description="Charges taken (requests, deduct_credits, jobs)"
        )
        self.credits_charged = meter.create_counter(
            "credit_guard.credits.charged", unit="{credit}", description="Credits taken, overage included"
        )
        self.refunds = meter.create_counter(
            "credit_guard.refunds",
            unit="{refund}",
            description="Refunds: failed requests, expired holds, unused reserves",
        )
        self.credits_refunded = meter.create_counter(
            "credit_guard.credits.refunded", unit="{credit}", description="Credits given back"
        )
        self.refusals = meter.create_counter(
            "credit_guard.refusals",
            unit="{request}",
            description=(
                "Paid requests refused: 402 insufficient_credits or member_limit_reached,"
                " 429 rate_limited, 503 unavailable (fail closed)"
            ),
        )
        self.charge_duration = meter.create_histogram(
            "credit_guard.charge.duration",
            unit="s",
            description="Time a paid request's charge took to decide, by outcome",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.sweeper_releases = meter.create_counter(
            "credit_guard.sweeper.releases", unit="{hold}", description="Expired holds the sweeper gave back"
        )
        self.pricing_cache = meter.create_counter(
            "credit_guard.pricing.cache", unit="{lookup}", description="Price lookups, by cache hit or miss"
        )
        self.open_counts = OpenCounts(guard)
        meter.create_observable_gauge(
            "credit_guard.holds.open",
            callbacks=[self._observe_holds],
            unit="{hold}",
            description="Open holds in the database (requests running, jobs reserved, dead processes' not yet swept)",
        )
        meter.create_observable_gauge(
            "credit_guard.reservations.open",
            callbacks=[self._observe_reservations],
            unit="{reservation}",
            description="Open job reservations in the database",
        )
        self._features: dict[str | None, Mapping[str, str]] = {None: {}}
        #: (the duration's attributes, the refusal's) of each feature key and outcome.
        self._outcomes: dict[tuple[str, str], tuple[Mapping[str, str], Mapping[str, str]]] = {}
        self._hit: Mapping[str, str] = {CACHE_RESULT: "hit"}
        self._miss: Mapping[str, str] = {CACHE_RESULT: "miss"}

    def _feature(self, feature_key: str | None) -> Mapping[str, str]:
        found = self._features.get(feature_key)
        if found is None:
            found = self._features[feature_key] = {FEATURE_KEY: feature_key or ""}
        return found

    # -- what the guard reports (``_metrics.Metrics``) -------------------------------------

    def charged(self, feature_key: str, credits: int, *, overage: bool) -> None:
        attributes = self._feature(feature_key)
        if not overage:
            self.charges.add(1, attributes)
        self.credits_charged.add(credits, attributes)

    def refunded(self, feature_key: str | None, credits: int) -> None:
        attributes = self._feature(feature_key)
        self.refunds.add(1, attributes)
        self.credits_refunded.add(credits, attributes)

    def decided(self, feature_key: str, outcome: Outcome, seconds: float) -> None:
        attributes = self._outcomes.get((feature_key, outcome))
        if attributes is None:
            attributes = self._outcomes[feature_key, outcome] = (
                {FEATURE_KEY: feature_key, OUTCOME: outcome},
                {FEATURE_KEY: feature_key, REASON: outcome},
            )
        self.charge_duration.record(seconds, attributes[0])
        if outcome in REFUSALS:
            self.refusals.add(1, attributes[1])

    def swept(self, released: int) -> None:
        self.sweeper_releases.add(released)

    def priced(self, hit: bool) -> None:
        self.pricing_cache.add(1, self._hit if hit else self._miss)

    # -- the gauges, read when metrics are collected ------------------------------------------

    def _observe_holds(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self.open_counts.read()
        return [] if counts is None else [Observation(counts[0])]

    def _observe_reservations(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self.open_counts.read()
        return [] if counts is None else [Observation(counts[1])]


class OpenCounts:
    """Open holds and open reservations, counted by the database when metrics are collected.

    Collection happens outside the request path (a Prometheus scrape, an exporter's
    thread), but the count must run on the guard's event loop, where its connections live.
    From another thread it is run there and waited for (``timeout``); on the loop's own
    thread (an ``async def`` metrics route) waiting would block the loop, so the count is
    started for the next collection and the last one is reported. Both gauges of one
    collection share one query (a count younger than ``fresh`` seconds is reused). A guard
    that is not running, or a database that does not answer, reports no value (logged).
    """

    def __init__(self, guard: CreditGuard, *, timeout: float = 2.0, fresh: float = 1.0) -> None:
        self.guard, self.timeout, self.fresh = guard, timeout, fresh
        self.last: tuple[int, int] | None = None
        #: Set by ``uninstrument``: the gauges report nothing more (their provider may live on).
        self.stopped = False
        self._at = -math.inf
        self._lock = threading.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    def read(self) -> tuple[int, int] | None:
        loop = self.guard._started_on
        if loop is None or loop.is_closed() or self.stopped:
            return None
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if not self._lock.acquire(blocking=not on_loop):
            return self.last  # another thread is counting; the loop must not wait for it
        try:
            if time.monotonic() - self._at < self.fresh:
                return self.last
            if on_loop:
                if self._refreshing is None or self._refreshing.done():
                    self._refreshing = loop.create_task(self._refresh())
                return self.last
            future = asyncio.run_coroutine_threadsafe(self.count(), loop)
            try:
                self._store(future.result(self.timeout))
            except Exception as exc:  # a gauge must never break a collection
                future.cancel()
                log.warning("credit_guard: metrics could not count open holds: %s", exc or type(exc).__name__)
                return None
            return self.last
        finally:
            self._lock.release()

    def _store(self, counts: tuple[int, int]) -> None:
        self.last, self._at = counts, time.monotonic()

    async def _refresh(self) -> None:
        try:
            self._store(await self.count())
        except Exception as exc:
            log.warning("credit_guard: metrics could not count open holds: %s", exc or type(exc).__name__)

    async def count(self) -> tuple[int, int]:
        """(open holds, open reservations), in one query on the guard's engine."""
        query = select(
            select(func.count()).select_from(holds).scalar_subquery(),
            select(func.count()).select_from(reservations).where(reservations.c.state == "open").scalar_subquery(),
        )
        async with asyncio.timeout(self.timeout), self.guard.engine.connect() as conn:
            row = (await conn.execute(query)).one()
        return int(row[0]), int(row[1])


def instrument(guard: CreditGuard, meter_provider: MeterProvider | None = None) -> CreditGuardMetrics:
    """Report ``guard``'s metrics through OpenTelemetry: ``meter_provider``, or the global one
    (``opentelemetry.metrics.set_meter_provider``; until one is set, OpenTelemetry's API
    records nothing). Call it once per guard; returns its instruments."""
    metrics = CreditGuardMetrics(guard, meter_provider)
    _plug(guard, metrics)
    return metrics


def uninstrument(guard: CreditGuard) -> None:
    """Stop reporting ``guard``'s metrics: it is back to one ``is None`` check per place, and
    its gauges observe nothing more."""
    if isinstance(guard.ledger.metrics, CreditGuardMetrics):
        guard.ledger.metrics.open_counts.stopped = True
    _plug(guard, None)


def _plug(guard: CreditGuard, metrics: Metrics | None) -> None:
    """Where the guard's services report (``_metrics.py``): the ledger (charges, refunds, and
    the request flow's decisions), the hold keeper (sweeps) and the pricing cache."""
    guard.ledger.metrics = guard.holds.metrics = guard.pricing.cache.metrics = metrics


__all__ = ["CreditGuardMetrics", "OpenCounts", "instrument", "uninstrument"]
