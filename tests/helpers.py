"""Small pieces many test modules share: the auth shim an app would have, and a client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent


class OrgFromHeader:
    """What an app's auth layer does: put the paying organization (``X-Org``) and the user
    (``X-User``, else ``default_user``) on request state. Test-only: never trust a client header."""

    #: The user recorded when the request names none (None: no user).
    default_user: str | None = "user_9"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            org = headers.get(b"x-org")
            if org:
                state = scope.setdefault("state", {})
                state["organization_id"] = org.decode("utf-8", "surrogateescape")
            user = headers.get(b"x-user")
            if user or (org and self.default_user):
                state = scope.setdefault("state", {})
                state["user_id"] = user.decode("utf-8", "surrogateescape") if user else self.default_user
        await self.app(scope, receive, send)


class OrgOnly(OrgFromHeader):
    """The organization, and a user only when ``X-User`` names one."""

    default_user = None


def client(app: ASGIApp) -> httpx.AsyncClient:
    """An in-process client; app exceptions become the server's 500, as behind uvicorn."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


class UvicornServer:
    """A real uvicorn serving an app in a subprocess (``workers`` processes), on a free port.

    Sync on purpose: tests drive it with real sockets and plain clients, from any thread.
    """

    def __init__(self, target: str, env: dict[str, str], log_path: Path, *, workers: int = 1, factory: bool = True):
        self.target, self.env, self.log_path, self.workers, self.factory = target, env, log_path, workers, factory
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, health: str = "/health", bound: float = 60.0) -> UvicornServer:
        command = [sys.executable, "-m", "uvicorn", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", str(self.workers), "--log-level", "warning", "--no-access-log"]
        if self.factory:
            command.append("--factory")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:  # readiness, not an assertion
            if self.proc.poll() is not None:
                raise AssertionError(f"uvicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + health, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"uvicorn did not answer within {bound} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (the lifespan's shutdown runs: queues written), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> UvicornServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """Send one HTTP/1.1 request on a fresh socket and return it unread (to hang up on)."""
    sock = socket.create_connection(("127.0.0.1", port))
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock
