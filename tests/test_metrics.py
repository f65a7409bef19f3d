"""OpenTelemetry metrics (credit_guard.contrib.opentelemetry), read back after real requests
on both databases; the example app scraped by Prometheus; and nothing of OpenTelemetry
imported by a guard that is not instrumented."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from credit_guard import CreditGuard
from credit_guard.contrib.opentelemetry import DURATION_BUCKETS, CreditGuardMetrics, instrument, uninstrument

from .conftest import reset_postgres, seed_prices
from .helpers import ROOT, client
from .test_holds import far_future
from .test_middleware import ORG, build_app
from .test_outage import Outage
from .test_structure import imports_of, modules

RICH = {"X-API-Key": "demo-key-rich"}
POOR = {"X-API-Key": "demo-key-poor"}
FEATURE = "credit_guard.feature_key"
IMAGE = "seedream_text_to_image"
VIDEO = "kling_image_to_video"
#: What a collection holds: metric name -> {sorted attributes: value (a histogram's count)}.
Found = dict[str, dict[tuple[tuple[str, Any], ...], Any]]


class Reading:
    """An in-memory reader on a guard: what an exporter would be sent, collected on demand."""

    def __init__(self, guard: CreditGuard) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics: CreditGuardMetrics = instrument(guard, meter_provider=self.provider)
        self.points: dict[str, list[Any]] = {}

    async def collect(self) -> Found:
        """Collected from a worker thread, as an exporter's thread or a scrape does (the open
        holds gauges then count on the guard's loop, which this test leaves free meanwhile)."""
        data = await anyio.to_thread.run_sync(self.reader.get_metrics_data)
        found: Found = {}
        self.points = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        self.points.setdefault(metric.name, []).append(point)
                        value = point.count if isinstance(point, HistogramDataPoint) else point.value
                        found.setdefault(metric.name, {})[tuple(sorted((point.attributes or {}).items()))] = value
        return found


def at(found: Found, name: str, **attributes: str) -> Any:
    """The value of ``name`` with exactly these attributes (``feature``, ``outcome``,
    ``reason``, ``result`` stand for the ``credit_guard.*`` ones); 0 when never reported."""
    names = {"feature": FEATURE, "outcome": "credit_guard.outcome", "reason": "credit_guard.reason"}
    names["result"] = "credit_guard.cache.result"
    key = tuple(sorted((names[short], value) for short, value in attributes.items()))
    return found.get(name, {}).get(key, 0)


@pytest.fixture
def reading(guard: CreditGuard) -> Iterator[Reading]:
    reading = Reading(guard)
    yield reading
    uninstrument(guard)
    reading.provider.shutdown()


pytestmark = pytest.mark.anyio


async def test_charges_refunds_and_402s_are_counted_by_feature(guard: CreditGuard, reading: Reading) -> None:
    await guard.grant_credits("org_1", 17)
    async with client(build_app(guard)) as c:
        statuses = [(await c.post(path, headers=ORG)).status_code for path in ("/v1/images", "/v1/crash")]
        statuses += [(await c.post(path, headers=ORG)).status_code for path in ("/v1/upstream", "/v1/images")]
        statuses += [(await c.post("/v1/images", headers=ORG)).status_code for _ in range(2)]
    assert statuses == [200, 500, 502, 200, 200, 402]  # 17 - 5 x 3 kept = 2 left: too few for a 5th
    found = await reading.collect()

    assert at(found, "credit_guard.charges", feature=IMAGE) == 5
    assert at(found, "credit_guard.credits.charged", feature=IMAGE) == 25
    assert at(found, "credit_guard.refunds", feature=IMAGE) == 2  # the crash and the 502
    assert at(found, "credit_guard.credits.refunded", feature=IMAGE) == 10
    assert at(found, "credit_guard.refusals", feature=IMAGE, reason="insufficient_credits") == 1
    assert at(found, "credit_guard.refusals", feature=IMAGE, reason="unavailable") == 0
    assert at(found, "credit_guard.charge.duration", feature=IMAGE, outcome="charged") == 5
    assert at(found, "credit_guard.charge.duration", feature=IMAGE, outcome="insufficient_credits") == 1
    assert at(found, "credit_guard.pricing.cache", result="miss") == 1
    assert at(found, "credit_guard.pricing.cache", result="hit") == 5
    charged = max(reading.points["credit_guard.charge.duration"], key=lambda point: point.count)
    assert tuple(charged.explicit_bounds) == DURATION_BUCKETS
    assert 0 < charged.sum < 5 and charged.min > 0  # seconds, not milliseconds


async def test_the_python_api_charges_and_a_reprice_misses_the_cache(guard: CreditGuard, reading: Reading) -> None:
    await guard.grant_credits("org_1", 100)
    assert (await guard.deduct_credits("org_1", IMAGE)).success
    assert (await guard.deduct_credits("org_1", IMAGE)).success
    (pricing,) = [p for p in await guard.list_pricing() if p.feature_key == IMAGE]
    await guard.update_pricing(pricing.id, credits=7)  # the cached price is forgotten
    assert (await guard.deduct_credits("org_1", IMAGE)).credits_deducted == 7
    found = await reading.collect()
    assert at(found, "credit_guard.charges", feature=IMAGE) == 3
    assert at(found, "credit_guard.credits.charged", feature=IMAGE) == 17
    assert at(found, "credit_guard.pricing.cache", result="miss") == 2
    assert at(found, "credit_guard.pricing.cache", result="hit") == 1
    assert "credit_guard.charge.duration" not in found  # a request's decision; the API has none


async def test_open_holds_reservations_and_sweeper_releases(guard: CreditGuard, reading: Reading) -> None:
    reading.metrics.open_counts.fresh = 0  # count again at each collection below
    await guard.grant_credits("org_1", 100)
    held = await guard.deduct_credits("org_1", IMAGE, hold=True)
    assert (await guard.reserve("org_1", VIDEO, job_id="job-1", ttl=60)).success
    found = await reading.collect()
    assert at(found, "credit_guard.holds.open") == 2  # the job's reservation is a hold too
    assert at(found, "credit_guard.reservations.open") == 1
    assert at(found, "credit_guard.charges", feature=VIDEO) == 1
    assert "credit_guard.sweeper.releases" not in found

    assert held.charge_id is not None
    guard.holds.forget(held.charge_id)  # as if its process had died
    assert await guard.release_expired_holds(now=far_future()) == 2
    found = await reading.collect()
    assert at(found, "credit_guard.sweeper.releases") == 2
    assert at(found, "credit_guard.refunds", feature=IMAGE) == at(found, "credit_guard.refunds", feature=VIDEO) == 1
    assert at(found, "credit_guard.credits.refunded", feature=VIDEO) == 20
    assert (at(found, "credit_guard.holds.open"), at(found, "credit_guard.reservations.open")) == (0, 0)


async def test_open_counts_collected_on_the_guards_own_loop_never_block_it(
    guard: CreditGuard, reading: Reading
) -> None:
    """An ``async def`` metrics route collects on the loop the count needs: it reports the
    last count and starts the next one, instead of waiting for itself."""
    await guard.grant_credits("org_1", 100)
    await guard.deduct_credits("org_1", IMAGE, hold=True)
    counts = reading.metrics.open_counts
    with anyio.fail_after(1):
        assert counts.read() is None  # nothing counted yet: no value rather than a wait
        for _ in range(100):
            await anyio.sleep(0.01)
            if counts.last is not None:
                break
    assert counts.last == (1, 0)


@pytest.fixture
async def outage_db(db_url: str) -> AsyncIterator[Outage]:
    async with Outage(db_url) as outage, CreditGuard(db_url) as direct:
        await direct.create_schema()
        if direct.engine.dialect.name == "postgresql":
            await reset_postgres(direct)
        await seed_prices(direct)
        await direct.grant_credits("org_1", 100)
        yield outage


async def test_a_database_outage_is_counted_as_a_503(outage_db: Outage) -> None:
    async with CreditGuard(outage_db.url, timeout=0.5) as guard:
        reading = Reading(guard)
        async with client(build_app(guard)) as c:
            assert (await c.post("/v1/images", headers=ORG)).status_code == 200
            await guard.flush()
            await outage_db.down()
            assert (await c.post("/v1/images", headers=ORG)).status_code == 503
            await outage_db.up()
        found = await reading.collect()
        reading.provider.shutdown()
    assert at(found, "credit_guard.refusals", feature=IMAGE, reason="unavailable") == 1
    assert at(found, "credit_guard.charge.duration", feature=IMAGE, outcome="unavailable") == 1
    assert at(found, "credit_guard.charges", feature=IMAGE) == 1
    assert at(found, "credit_guard.refusals", feature=IMAGE, reason="insufficient_credits") == 0


async def test_an_outage_served_free_is_no_refusal(outage_db: Outage) -> None:
    async with CreditGuard(outage_db.url, timeout=0.5, fail_open=True) as guard:
        reading = Reading(guard)
        async with client(build_app(guard)) as c:
            assert (await c.post("/v1/images", headers=ORG)).status_code == 200
            await outage_db.down()
            free = await c.post("/v1/images", headers=ORG)
            await outage_db.up()
        found = await reading.collect()
        reading.provider.shutdown()
    assert (free.status_code, free.headers["x-credits-charged"]) == (200, "0")
    assert at(found, "credit_guard.charge.duration", feature=IMAGE, outcome="served_free") == 1
    assert "credit_guard.refusals" not in found
    assert at(found, "credit_guard.charges", feature=IMAGE) == 1


async def test_uninstrument_stops_every_report(guard: CreditGuard, reading: Reading) -> None:
    await guard.grant_credits("org_1", 100)
    async with client(build_app(guard)) as c:
        assert (await c.post("/v1/images", headers=ORG)).status_code == 200
        uninstrument(guard)
        assert (await c.post("/v1/images", headers=ORG)).status_code == 200
    found = await reading.collect()
    assert at(found, "credit_guard.charges", feature=IMAGE) == 1
    assert "credit_guard.holds.open" not in found
    assert guard.ledger.metrics is guard.holds.metrics is guard.pricing.cache.metrics is None


# -- the example app, scraped by Prometheus ---------------------------------------------------


async def empty_tables(db_url: str) -> None:
    """The example seeds its own prices and grants: the tables are only made and emptied."""
    async with CreditGuard(db_url) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)


@pytest.fixture
def metered_example(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    anyio.run(empty_tables, db_url)
    monkeypatch.setenv("CREDIT_GUARD_DATABASE_URL", db_url)
    monkeypatch.setenv("CREDIT_GUARD_METRICS", "prometheus")
    module: Any = importlib.reload(importlib.import_module("examples.fastapi_app.app"))
    try:
        with TestClient(module.app) as example:
            yield example
    finally:
        module.metrics_provider.shutdown()  # its collector leaves prometheus_client's registry
        monkeypatch.delenv("CREDIT_GUARD_METRICS")
        importlib.reload(module)  # the example as other tests expect it: no metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_example_app_serves_its_charges_to_prometheus(metered_example: TestClient) -> None:
    assert metered_example.post("/v1/images", json={"prompt": "a red fox"}, headers=RICH).status_code == 200
    assert metered_example.post("/v1/images", json={"prompt": "a red fox"}, headers=POOR).status_code == 402
    scrape = metered_example.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    found = samples(scrape.text)

    def value(name: str, **labels: str) -> float | None:
        """The sample, whatever scope labels the exporter adds."""
        for (sample, pairs), number in found.items():
            if sample == name and set(labels.items()) <= set(pairs):
                return number
        return None

    feature = {"credit_guard_feature_key": IMAGE}
    assert value("credit_guard_charges_total", **feature) == 1
    assert value("credit_guard_credits_charged_total", **feature) == 5
    assert value("credit_guard_refusals_total", **feature, credit_guard_reason="insufficient_credits") == 1
    assert value("credit_guard_charge_duration_seconds_count", **feature, credit_guard_outcome="charged") == 1
    assert value("credit_guard_reservations_open") == 0
    assert value("credit_guard_holds_open") in (0, 1)  # the request's hold, unless already settled
    assert "credit_guard_refunds_total" not in {name for name, _ in found}


# -- what an app that does not ask for metrics pays: nothing ------------------------------------

UNINSTRUMENTED = """
import asyncio, sys

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware


async def images(request):
    return PlainTextResponse("ok")


def paying(app):
    async def with_org(scope, receive, send):
        scope.setdefault("state", {})["organization_id"] = "org_1"
        await app(scope, receive, send)
    return with_org


async def main(url):
    guard = CreditGuard(url)
    await guard.create_schema()
    async with guard:
        await guard.create_pricing(feature_key="img", feature_name="Image", category="Images", credits=5)
        await guard.grant_credits("org_1", 10)
        app = Starlette(routes=[Route("/v1/images", images, methods=["POST"])])
        app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /v1/images": "img"})
        transport = httpx.ASGITransport(app=paying(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/images")
        assert (r.status_code, r.headers["x-credits-charged"]) == (200, "5"), r
    assert "credit_guard._metrics" in sys.modules
    print(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry"))


asyncio.run(main(sys.argv[1]))
"""


def test_a_guard_without_metrics_never_imports_opentelemetry(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(UNINSTRUMENTED))
    done = subprocess.run(
        [sys.executable, str(script), f"sqlite+aiosqlite:///{tmp_path / 'credits.db'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_only_the_contrib_module_imports_opentelemetry() -> None:
    importers = sorted(
        name
        for name, tree in modules().items()
        if any(module.split(".")[0] == "opentelemetry" for module in imports_of(name, tree))
    )
    assert importers == ["credit_guard.contrib.opentelemetry"]
