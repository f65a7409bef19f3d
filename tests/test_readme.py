"""The Python samples of the README and of the docs site run as written: every ```python
block, the README's first, then each page's in the order of the site's navigation
(``mkdocs.yml``), as one program (later samples use the app and guard the first one made),
in an empty folder (the samples' SQLite file is made there). The client sample talks to the
demo, so the FastAPI example is served for it, as ``bash scripts/demo`` serves it."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, UvicornServer

pytestmark = pytest.mark.slow

DEMO = "127.0.0.1:8000"


def blocks_of(path: Path, language: str = "python") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def docs_pages() -> list[Path]:
    """The site's pages in the order of its navigation (mkdocs.yml's ``nav``)."""
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    return [ROOT / "docs" / page for page in nav]


def python_blocks() -> list[tuple[str, str]]:
    """(where, code) of every sample: the README's, then the docs pages' in nav order."""
    pages = [ROOT / "README.md", *docs_pages()]
    return [
        (f"{page.relative_to(ROOT)} python block {number}", code)
        for page in pages
        for number, code in enumerate(blocks_of(page))
    ]


def test_every_docs_page_is_in_the_navigation() -> None:
    """A page left out of mkdocs.yml's nav would have its samples never run."""
    assert sorted(docs_pages()) == sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_has_the_samples_this_test_runs() -> None:
    blocks = [code for _, code in python_blocks()]
    assert len(blocks) >= 8
    assert any("def test_" in block for block in blocks)  # the testing recipe, called below
    assert any("credit_guard.client" in block for block in blocks)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_every_python_sample_in_the_readme_and_the_docs_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    demo = DEMO
    if not _port_free(8000):  # the demo's port is taken here: serve it elsewhere, and say so
        demo = "127.0.0.1:{}".format(UvicornServer("x", {}, tmp_path / "unused.log").port)
    server = UvicornServer(
        "examples.fastapi_app.app:app",
        {"CREDIT_GUARD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"},
        tmp_path / "demo.log",
        factory=False,
    )
    server.port = int(demo.rsplit(":", 1)[1])
    server.base = f"http://{demo}"
    namespace: dict[str, Any] = {"__name__": "readme"}
    out = io.StringIO()
    with server.start(health="/api/features/pricing"), contextlib.redirect_stdout(out):
        sys.modules["readme"] = type(sys)("readme")  # FastAPI resolves annotations through the module
        tests: dict[str, Any] = {}
        try:
            for _, page_blocks in itertools.groupby(blocks, key=lambda item: item[0].split(" python block")[0]):
                # Each page goes on from the names the pages before it left, in a namespace of
                # its own: a later page that makes its own guard or app does not swap the ones
                # an earlier page's functions use.
                namespace = dict(namespace)
                for where, block in page_blocks:
                    code = block.replace(DEMO, demo)
                    try:
                        exec(compile(code, where, "exec"), namespace)
                    except Exception as exc:
                        raise AssertionError(f"{where} failed: {exc!r}\n{block}") from exc
                tests |= {name: value for name, value in namespace.items() if name.startswith("test_")}
            assert tests, "the testing recipe defines no test"
            for test in tests.values():
                test()
        finally:
            sys.modules.pop("readme", None)
    printed = out.getvalue().splitlines()
    assert "600 True" in printed  # the Python API sample's balance after its refund
    # The grants sample: the promotion (priority -1) paid the charge; the plan and pack are whole.
    assert printed[printed.index("welcome promo 45") :][:3] == [
        "welcome promo 45",
        "Pro plan, November 1000",
        "credit pack 500",
    ]
    assert "3 3" in printed and "needs 5, you have 3" in printed  # the client sample, against the demo
    assert "3500" in printed  # the plans sample: 500 rolled over, the new month's 1,000 and the pack's 2,000
    assert (tmp_path / "credit_guard.db").exists()
    assert os.getcwd() == str(tmp_path)


def test_the_first_sample_pasted_as_is_serves_a_paid_route_and_a_402(tmp_path: Path) -> None:
    """Issue 23: the first sample never created its price (500 feature-not-found). Saved as
    app.py in an empty folder and served by uvicorn, it answers 200 with the credit headers
    twice (50 credits, 20 each), then 402; its SQLite file lands in that folder."""
    import subprocess
    import time

    import httpx

    from .helpers import free_port

    (tmp_path / "app.py").write_text(blocks_of(ROOT / "README.md")[0])
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "CREDIT_GUARD_DATABASE_URL"}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"]
    with (tmp_path / "uvicorn.log").open("wb") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # readiness, not an assertion
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/openapi.json", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        answers = [httpx.post(base + "/v1/videos", json={"image_url": "a.png"}, timeout=10) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [answer.status_code for answer in answers] == [200, 200, 402], [a.text for a in answers]
    assert [answers[0].headers["x-credits-charged"], answers[1].headers["x-credits-remaining"]] == ["20", "10"]
    assert answers[2].json()["required"] == 20 and answers[2].json()["available"] == 10
    assert (tmp_path / "credit_guard.db").exists()


def test_the_testing_kit_samples_pass_under_pytest_as_written(tmp_path: Path) -> None:
    """Issue 23: the kit's samples called a ``create_app`` the README never defined and
    were never run. docs/testing.md's ```py blocks (the kit's test file, in two parts) are
    written to an empty folder as one test module and run by pytest there, with nothing
    but the installed package (its pytest plugin gives the ``credit_guard`` fixture)."""

    blocks = blocks_of(ROOT / "docs" / "testing.md", "py")
    assert blocks and "def create_app" in blocks[0]
    assert "2 passed" in run_as_test_module(tmp_path, "\n\n".join(blocks))


def test_the_plans_page_test_with_a_moving_clock_passes_under_pytest_as_written(tmp_path: Path) -> None:
    [block] = blocks_of(ROOT / "docs" / "plans.md", "py")
    assert "1 passed" in run_as_test_module(tmp_path, block)


def run_as_test_module(tmp_path: Path, code: str) -> str:
    """``code`` as a test module in an empty folder, run by pytest with nothing but the
    installed package (its plugin gives the fixtures); pytest's output."""
    import subprocess

    (tmp_path / "test_sample.py").write_text(code)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDIT_GUARD_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::DeprecationWarning:credit_guard",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
