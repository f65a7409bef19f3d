"""Paired A/B: the plain guarded charge (variant 5, the middleware on PostgreSQL) of two
git revisions, served side by side and measured in alternating rounds.

    .venv/bin/python benchmarks/ab.py 1d128ea HEAD         # 10 rounds x 5 s each
    .venv/bin/python benchmarks/ab.py main . --rounds 6    # "." is the working tree

Why: a change's hidden cost is a few percent, and on a shared two-core machine one full
``run.py`` moves more than that from run to run. Two servers alive at once, the same
database, the same accounts and wrk alternating which goes first cancel the machine's
drift; what is left is the change. Each revision is checked out with ``git worktree`` in
a temporary directory (removed at the end) and serves its own ``src`` and
``benchmarks/apps.py``; the database is prepared by this checkout's schema (an older
revision runs on it: the columns added since are nullable or defaulted).

THE DATABASE IS WIPED, as by ``run.py``: ``--pg-url`` (or $CREDIT_GUARD_BENCH_POSTGRES_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.run import DEFAULT_PG_URL, VARIANTS, App, ensure_wrk, org_args, prepare, run_wrk  # noqa: E402

PLAIN = next(v for v in VARIANTS if v.number == 5)


@contextlib.contextmanager
def checkouts(revisions: Sequence[str]) -> Iterator[list[Path]]:
    """Each revision as a directory: "." is this working tree, anything else a detached
    worktree of this repository, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="credit-guard-ab-") as tmp:
        made: list[Path] = []
        roots: list[Path] = []
        try:
            for n, revision in enumerate(revisions):
                if revision == ".":
                    roots.append(ROOT)
                    continue
                where = Path(tmp) / f"{n}"
                git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(where), revision]
                subprocess.run(git, check=True)
                made.append(where)
                roots.append(where)
            yield roots
        finally:
            for where in made:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)


def measure(roots: Sequence[Path], pg_url: str, *, rounds: int, seconds: int) -> list[list[float]]:
    """Requests per second of each root's server, one list per root, a value per round."""
    asyncio.run(prepare(pg_url))
    apps = [App("middleware", {"BENCH_PG_URL": pg_url}, root=root) for root in roots]
    try:
        for app in apps:
            app.wait_ready()
        for app in apps:  # warm-up: pools, caches, generic plans
            run_wrk(app.base + "/work", connections=32, seconds=2, org_args=org_args(PLAIN))
        rps: list[list[float]] = [[] for _ in apps]
        for n in range(rounds):
            order = list(range(len(apps))) if n % 2 == 0 else list(reversed(range(len(apps))))
            for i in order:
                sample = run_wrk(apps[i].base + "/work", connections=32, seconds=seconds, org_args=org_args(PLAIN))
                if sample.non2xx or sample.socket_errors:
                    raise RuntimeError(f"{apps[i].name} at {roots[i]}: {sample}")
                rps[i].append(sample.rps)
        return rps
    finally:
        for app in apps:
            app.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the baseline revision (a commit, a branch, or . for the working tree)")
    parser.add_argument("b", help="the revision compared with it")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5, help="seconds per revision and round")
    parser.add_argument("--pg-url", default=os.environ.get("CREDIT_GUARD_BENCH_POSTGRES_URL", DEFAULT_PG_URL))
    args = parser.parse_args(argv)
    ensure_wrk()
    with checkouts([args.a, args.b]) as roots:
        a, b = measure(roots, args.pg_url, rounds=args.rounds, seconds=args.seconds)
    for name, values in ((args.a, a), (args.b, b)):
        print(
            f"{name}: req/s per round {', '.join(f'{v:,.0f}' for v in values)}; median {statistics.median(values):,.0f}"
        )
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    wins = sum(r > 1 for r in ratios)
    print(
        f"B/A (median of per-round ratios): {statistics.median(ratios):.3f}"
        f" (range {min(ratios):.3f}-{max(ratios):.3f}); B faster in {wins} of {len(ratios)} rounds"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
