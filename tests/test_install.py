"""Issue 23's definition of done, as a newcomer meets it: the package built as a wheel,
installed with the README's install line into a new virtual environment (nothing of this
checkout on its path), and the README's first sample pasted into an empty folder and served
by uvicorn answers 200 with the credit headers, then 402, with no other step."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .helpers import ROOT, free_port

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_built_wheel_serves_the_first_sample_in_a_new_venv(tmp_path: Path) -> None:
    readme = _readme()
    [install] = re.findall(r"^pip install (.+?)\s+#", readme, re.M)[:1]
    requirements = install.split()  # '"credit_guard[fastapi]"', 'uvicorn'
    assert requirements[0] == '"credit_guard[fastapi]"', install
    sample = re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)[0]

    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, ROOT, cwd=tmp_path)
    [wheel] = wheels.glob("credit_guard-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    extras = requirements[0].strip('"').removeprefix("credit_guard")  # "[fastapi]"
    _run(python, "-m", "pip", "install", "-q", f"{wheel}{extras}", *requirements[1:], cwd=tmp_path)
    # The installed package, not this checkout, is what the sample imports.
    where = _run(python, "-c", "import credit_guard; print(credit_guard.__file__)", cwd=tmp_path)
    assert str(venv) in where and str(ROOT / "src") not in where

    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text(sample)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CREDIT_GUARD_", "PYTHON"))}
    log_path = project / "uvicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [venv / "bin" / "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # readiness, not an assertion
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/openapi.json", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        answers = [httpx.post(base + "/v1/videos", json={"image_url": "a.png"}, timeout=10) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [answer.status_code for answer in answers] == [200, 200, 402], [a.text for a in answers]
    assert [(a.headers["x-credits-charged"], a.headers["x-credits-remaining"]) for a in answers[:2]] == [
        ("20", "30"),
        ("20", "10"),
    ]
    refused = answers[2]
    assert refused.headers["content-type"] == "application/problem+json"
    assert (refused.json()["required"], refused.json()["available"]) == (20, 10)
    assert refused.headers["x-credits-remaining"] == "10"
    assert (project / "credit_guard.db").exists()
