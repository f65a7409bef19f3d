"""A throwaway PostgreSQL cluster the tests may stop and restart at will.

The shared server at 127.0.0.1:5432 carries every other test's database, so a test that
takes the server down for real needs a cluster of its own: ``initdb`` into a temporary
directory, ``pg_ctl start`` on a free loopback port, ``pg_ctl stop`` and ``rm -r`` at the
end. As root (the CI container) the server runs as the ``postgres`` OS user, because
PostgreSQL refuses to run as root.

Speed matters more than durability here: ``initdb --no-sync``, ``fsync=off`` and a tiny
``shared_buffers`` keep the cluster's start-up to about a second.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_USER = "postgres"


class ClusterUnavailable(Exception):
    """This machine cannot run a throwaway cluster (no initdb, no postgres user)."""


def find_bin(name: str) -> Path:
    """``name`` from the newest /usr/lib/postgresql/NN/bin (Debian, Ubuntu), else from PATH."""
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1])
    found = shutil.which(name)
    if found is None:
        raise ClusterUnavailable(f"{name} not found in /usr/lib/postgresql/*/bin nor on PATH")
    return Path(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    """One PostgreSQL server in ``root``: data in ``root/data``, its socket and log in ``root``."""

    root: Path
    port: int
    bindir: Path
    run_as: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{SERVER_USER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> Cluster:
        """initdb and start a cluster, or raise ClusterUnavailable saying why not."""
        initdb = find_bin("initdb")
        bindir = initdb.parent
        run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                server_user = pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise ClusterUnavailable(f"running as root and there is no {SERVER_USER!r} OS user") from exc
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ClusterUnavailable("running as root and runuser is missing")
            run_as = [runuser, "-u", SERVER_USER, "--"]
        # Directly under /tmp: pytest's tmp_path lives in a 0700 root directory the
        # postgres user could not enter, and the socket path must stay short.
        root = Path(tempfile.mkdtemp(prefix="cg-pg-"))
        if run_as:
            os.chown(root, server_user.pw_uid, server_user.pw_gid)
        cluster = cls(root=root, port=_free_port(), bindir=bindir, run_as=run_as)
        try:
            started = time.perf_counter()
            cluster._run(
                "initdb",
                "-D",
                str(cluster.data),
                "-U",
                SERVER_USER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            cluster.timings["initdb"] = time.perf_counter() - started
            started = time.perf_counter()
            cluster.start()
            cluster.timings["start"] = time.perf_counter() - started
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        command = [*self.run_as, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{self.server_log()}"
            )

    def server_log(self) -> str:
        try:
            return "--- server log ---\n" + self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off -c shared_buffers=16MB -c max_connections=50"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and wait until it is gone (``fast``: sessions are cut, like a restart)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop")

    def destroy(self) -> None:
        """Stop the server if it runs (immediate: nothing to keep) and remove every file."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # already gone; the directory goes anyway
        shutil.rmtree(self.root, ignore_errors=True)
