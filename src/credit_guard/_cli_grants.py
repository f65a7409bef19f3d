"""The CLI's credit commands beyond a plain grant: grants, overdraft, releasing a job.

Kept apart from ``cli.py`` (which wires them in) so each module stays small.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._cli_files import CliError
from ._cli_output import print_json, shown, table

if TYPE_CHECKING:
    from ._guard import CreditGuard


def expiry(text: str) -> datetime:
    """An ``--expires-at``: ISO datetime; UTC when it names no offset."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or datetime: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def add_commands(commands: Any, command: Any) -> None:
    p = command(commands, "grants", cmd_grants, "list an organization's grants (live ones first, in spending order)")
    p.add_argument("organization_id", metavar="ORG")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command(commands, "overdraft", cmd_overdraft, "let an organization's balance go down to -CREDITS")
    p.add_argument("organization_id", metavar="ORG")
    p.add_argument("credits", metavar="CREDITS", type=priority, help="the limit (0: no overdraft)")

    p = command(commands, "release", cmd_release, "refund an async job's reservation (idempotent)")
    p.add_argument("job_id", metavar="JOB_ID")


async def cmd_grants(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        grants = await guard.list_grants(args.organization_id)
        limit, owed = await guard.get_overdraft(args.organization_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json(
            [
                {
                    "id": g.id,
                    "amount": g.amount,
                    "remaining": g.remaining,
                    "expires_at": g.expires_at.isoformat() if g.expires_at else None,
                    "priority": g.priority,
                    "reason": g.reason,
                    "pool": g.pool,
                }
                for g in grants
            ]
        )
        return 0
    rows = [
        (
            g.id,
            g.amount,
            g.remaining,
            g.expires_at.isoformat() if g.expires_at else "never",
            g.priority,
            g.pool or "general",
            g.reason or "",
        )
        for g in grants
    ]
    print(table(("ID", "AMOUNT", "REMAINING", "EXPIRES", "PRIORITY", "POOL", "REASON"), rows, right={0, 1, 2, 4}))
    if limit or owed:
        print(f"overdraft: limit {limit}, owed {owed}")
    print(f"spendable: {await guard.get_balance(args.organization_id)} ({shown(args.organization_id)})")
    return 0


async def cmd_overdraft(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        await guard.set_overdraft_limit(args.organization_id, args.credits)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"overdraft limit of {shown(args.organization_id)}: {args.credits}")
    return 0


async def cmd_release(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        done = await guard.release(args.job_id)
    except (LookupError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if done.refunded_credits:
        print(f"released job {shown(args.job_id)}: {done.refunded_credits} credits back")
    else:
        print(f"job {shown(args.job_id)} was already {done.state}: nothing moved")
    return 0
