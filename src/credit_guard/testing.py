"""Testing an app that charges credits: an isolated database per test, funding, assertions.

Installed as a pytest plugin (the ``pytest11`` entry point), so its fixtures are there in
any project that has credit_guard installed:

- ``credit_guard_url``: a database of the test's own: a SQLite file in ``tmp_path``, or,
  when ``credit_guard_base_url`` gives a PostgreSQL URL, a schema of its own on it
  (``?schema=cg_test_...``, dropped after the test). It is also put in the environment as
  ``CREDIT_GUARD_DATABASE_URL``, which ``CreditGuard()`` reads when given no URL.
- ``credit_guard``: a ``CreditGuard`` on that database, tables created, not started (the
  app's lifespan starts it on the app's loop; an async test may ``async with`` it).
- ``credit_guard_base_url``: override it in a ``conftest.py`` to test on PostgreSQL
  (default: the ``CREDIT_GUARD_TEST_DATABASE_URL`` environment variable, else SQLite).
- ``credit_clock``: a ``Clock`` the test may move (grant expiry, plan periods, holds), reset
  after the test.
- ``credit_guard_factory`` (session-scoped): ``make()`` makes such guards for fixtures of any
  scope, a TestClient per module or per session.

The guard of a running app lives on the app's event loop (``with TestClient(app)`` runs
one in a thread); ``CreditKit.of(client)`` reaches it there from a synchronous test, for
FastAPI's/Starlette's ``TestClient`` and Litestar's alike. In an async test (httpx's
``AsyncClient`` over ``ASGITransport``) the app runs on the test's loop: await ``fund``
and ``set_price`` directly. The ``assert_*`` helpers read any response with
``status_code`` and ``headers`` (httpx's, which all three test clients return).

Only the standard library and pytest are imported up front: the plugin loads in every
pytest run of a project with credit_guard installed, used or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

if TYPE_CHECKING:
    from ._guard import CreditGuard

T = TypeVar("T")
BASE_URL_ENV = "CREDIT_GUARD_TEST_DATABASE_URL"
#: Set by ``credit_guard_url`` for its test: the database the app's guard should be on.
TESTING_URL_ENV = "CREDIT_GUARD_TESTING_DATABASE_URL"
_funding = itertools.count(1)


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Any: ...


# -- funding and prices, on the guard's loop ---------------------------------------------


async def fund(
    guard: CreditGuard, organization_id: str, credits: int, *, expires_at: datetime | None = None, priority: int = 0
) -> int:
    """Grant ``credits`` to ``organization_id`` (a grant of its own each call); returns the
    spendable balance after."""
    key = f"credit-guard-testing-{uuid.uuid4().hex}-{next(_funding)}"
    return await guard.grant_credits(
        organization_id, credits, reason="test funding", expires_at=expires_at, priority=priority, idempotency_key=key
    )


async def set_price(guard: CreditGuard, feature_key: str, credits: int, *, active: bool = True) -> None:
    """Create or update ``feature_key``'s price (active unless told otherwise)."""
    row = {
        "feature_key": feature_key,
        "feature_name": feature_key.replace("_", " ").title(),
        "category": "Test",
        "credits": credits,
        "is_active": active,
    }
    await guard.import_pricing([row], update_existing=True)


class CreditKit:
    """``fund``, ``set_price``, ``balance`` and ``audit`` from a synchronous test, run on the
    loop where the app's guard lives (through the test client's portal)."""

    def __init__(self, guard: CreditGuard, call: Callable[[Callable[[], Awaitable[Any]]], Any]) -> None:
        self.guard = guard
        self._call = call

    @classmethod
    def of(cls, client: Any, guard: CreditGuard | None = None) -> CreditKit:
        """The kit for a started test client (inside ``with TestClient(app) as client``):
        its app's guard (``app.state.credit_guard``) unless ``guard`` is given."""
        # Litestar's client keeps its portal in ``blocking_portal`` (``portal`` is a method
        # there); Starlette's in ``portal``. Either exists only while the client is started.
        portal = getattr(client, "blocking_portal", None) or getattr(client, "portal", None)
        if not hasattr(portal, "call"):
            raise RuntimeError("CreditKit.of(client) needs a started test client: use it inside `with TestClient(app)`")
        if guard is None:
            guard = getattr(getattr(client.app, "state", None), "credit_guard", None)
        if guard is None:
            raise RuntimeError("no guard on app.state.credit_guard: pass CreditKit.of(client, guard=...)")
        _warn_if_elsewhere(guard)
        return cls(guard, portal.call)  # type: ignore[union-attr]

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        result: T = self._call(work)
        return result

    def fund(self, organization_id: str, credits: int, **options: Any) -> int:
        return self.run(lambda: fund(self.guard, organization_id, credits, **options))

    def set_price(self, feature_key: str, credits: int, *, active: bool = True) -> None:
        self.run(lambda: set_price(self.guard, feature_key, credits, active=active))

    def balance(self, organization_id: str) -> int:
        return self.run(lambda: self.guard.get_balance(organization_id))

    def audit(self) -> None:
        """Fail the test unless every balance equals its ledger and its grants."""
        problems = self.run(self.guard.audit)
        assert not problems, f"credit_guard audit found: {problems}"


class CreditGuardTestWarning(UserWarning):
    """The app's guard is not on the database the test kit made for this test."""


def _warn_if_elsewhere(guard: CreditGuard) -> None:
    """A module-level ``CreditGuard()`` built at import, before ``credit_guard_url`` set the
    variable, keeps its own URL (``./credit_guard.db`` by default): a test would then fund and
    charge a developer's real database without a word. Say so."""
    wanted = os.environ.get(TESTING_URL_ENV)
    if not wanted:
        return
    from sqlalchemy.engine import make_url

    expected = make_url(wanted).difference_update_query(["schema"]).render_as_string(hide_password=False)
    actual = guard.engine.url.render_as_string(hide_password=False)
    if actual != expected:
        warnings.warn(
            f"the app's CreditGuard uses {guard.engine.url!r}, not this test's database {wanted!r}: it was"
            " built before credit_guard_url set CREDIT_GUARD_DATABASE_URL (a module-level guard?). Build it"
            " in an app factory, or set the variable before importing the app.",
            CreditGuardTestWarning,
            stacklevel=3,
        )


# -- assertions on responses -------------------------------------------------------------


def _int_header(response: _Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None else None


def assert_charged(response: _Response, credits: int, *, remaining: int | None = None) -> None:
    """The request succeeded and kept ``credits`` (net of any refund), leaving ``remaining``."""
    from .problems import Headers

    assert 200 <= response.status_code < 400, f"expected a paid success, got {response.status_code}"
    charged = _int_header(response, Headers.CHARGED)
    refunded = _int_header(response, Headers.REFUNDED) or 0
    assert charged is not None, f"no {Headers.CHARGED} header: is the route guarded?"
    assert charged - refunded == credits, f"charged {charged} - refunded {refunded}, expected {credits}"
    if remaining is not None:
        assert _int_header(response, Headers.REMAINING) == remaining


def assert_refunded(response: _Response, credits: int) -> None:
    """The request failed (or used less) and ``credits`` went back, as its answer says.

    An exception the handler raised becomes the server's own 500, which no guard can add
    headers to: the refund happened all the same; check it with the balance."""
    from .problems import Headers

    assert _int_header(response, Headers.REFUNDED) == credits, (
        f"{Headers.REFUNDED} is {response.headers.get(Headers.REFUNDED)!r}, expected {credits}"
    )


def assert_refused(response: _Response, *, required: int | None = None, available: int | None = None) -> None:
    """A 402 for insufficient credits (with the price and the balance, when given)."""
    from .problems import Headers

    assert response.status_code == 402, f"expected 402, got {response.status_code}"
    if required is not None:
        assert _int_header(response, Headers.REQUIRED) == required
    if available is not None:
        assert _int_header(response, Headers.REMAINING) == available


# -- the pytest plugin -------------------------------------------------------------------


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to the end on a loop of its own, in a thread: a fixture may be set up
    while the test's loop (pytest-anyio, pytest-asyncio) is already running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


def isolated_url(tmp_path: Path, base_url: str | None) -> str:
    """A fresh database URL: a SQLite file under ``tmp_path``, or a new schema on ``base_url``."""
    if base_url is None:
        return f"sqlite+aiosqlite:///{tmp_path / 'credit_guard_test.db'}"
    from sqlalchemy.engine import make_url

    return (
        make_url(base_url)
        .update_query_dict({"schema": f"cg_test_{uuid.uuid4().hex[:16]}"})
        .render_as_string(hide_password=False)
    )


async def drop_isolated(url: str) -> None:
    """Drop the schema ``isolated_url`` made on PostgreSQL (a SQLite file goes with tmp_path)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from ._storage.engine import build_engine, pg_schema

    schema = pg_schema(url)
    if schema is None:
        return
    engine = build_engine(make_url(url).difference_update_query(["schema"]))
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


def _with_tables(url: str, **options: Any) -> CreditGuard:
    """A CreditGuard on ``url`` with its tables created, not started (closed again: its
    connections belong to this loop; the app's loop opens its own)."""
    from ._guard import CreditGuard

    guard = CreditGuard(url, **options)

    async def create() -> None:
        await guard.create_schema()
        await guard.close()

    _run(create())
    return guard


@pytest.fixture
def credit_guard_base_url() -> str | None:
    """None (SQLite), or a PostgreSQL URL on which each test gets a schema of its own."""
    return os.environ.get(BASE_URL_ENV) or None


@pytest.fixture
def credit_guard_url(
    tmp_path: Path, credit_guard_base_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A database of this test's own (also ``CREDIT_GUARD_DATABASE_URL`` for the test)."""
    from ._config import DATABASE_URL_ENV

    url = isolated_url(tmp_path, credit_guard_base_url)
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    monkeypatch.setenv(TESTING_URL_ENV, url)
    yield url
    _run(drop_isolated(url))


@pytest.fixture(scope="session")
def credit_guard_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., CreditGuard]]:
    """``make(base_url=..., **guard_options)``: a CreditGuard on a database of its own, tables
    created, not started, for fixtures of ANY scope (a TestClient per module or per session,
    which the function-scoped ``credit_guard`` cannot serve). ``base_url``: None for a SQLite
    file, a PostgreSQL URL for a schema of its own there (default: ``CREDIT_GUARD_TEST_DATABASE_URL``).
    Every guard made is closed, and its schema dropped, when the session ends."""
    made: list[tuple[CreditGuard, str]] = []

    def make(*, base_url: str | None = os.environ.get(BASE_URL_ENV) or None, **options: Any) -> CreditGuard:
        url = isolated_url(tmp_path_factory.mktemp("credit_guard"), base_url)
        guard = _with_tables(url, **options)
        made.append((guard, url))
        return guard

    yield make
    for guard, url in made:
        _run(guard.close())
        _run(drop_isolated(url))


class Clock:
    """The library's clock, for tests: every moment credit_guard judges by (a grant's expiry,
    a plan's period, a hold's or a key's time) comes from it, so moving it moves them all.
    It moves this process's clock only (not a server started in another process), and
    only forward in a sensible test; ``reset`` goes back to real time."""

    def now(self) -> datetime:
        from ._clock import utcnow

        return utcnow()

    def travel(self, by: timedelta) -> None:
        from ._clock import travel

        travel(by)

    def travel_to(self, when: datetime) -> None:
        """Move to ``when`` (timezone-aware), e.g. a minute after a subscription's ``renews_at``."""
        self.travel(when - self.now())

    def reset(self) -> None:
        from ._clock import reset_travel

        reset_travel()


@pytest.fixture
def credit_clock() -> Iterator[Clock]:
    """A ``Clock`` this test may move; real time again after it."""
    clock = Clock()
    yield clock
    clock.reset()


@pytest.fixture
def credit_guard(credit_guard_url: str) -> Iterator[CreditGuard]:
    """A CreditGuard on ``credit_guard_url``, tables created, not started."""
    guard = _with_tables(credit_guard_url)
    yield guard
    _run(guard.close())


__all__ = [
    "Clock",
    "CreditGuardTestWarning",
    "CreditKit",
    "assert_charged",
    "assert_refunded",
    "assert_refused",
    "credit_clock",
    "credit_guard",
    "credit_guard_base_url",
    "credit_guard_factory",
    "credit_guard_url",
    "drop_isolated",
    "fund",
    "isolated_url",
    "set_price",
]
