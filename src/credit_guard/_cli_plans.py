"""The CLI's plan commands: ``plans list|set|remove``, ``subscribe`` and ``unsubscribe``.

Kept apart from ``cli.py`` (which wires them in) so each module stays small.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._cli_files import CliError
from ._cli_grants import expiry
from ._cli_output import print_json, shown, table
from ._periods import PERIOD_UNITS
from .errors import PlanInUse, PlanNotFound
from .models import Plan, Subscription

if TYPE_CHECKING:
    from ._guard import CreditGuard


def rollover(text: str) -> int | None:
    """``--rollover``: a count of credits, or ``all``."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or 'all': {text!r}") from None


def add_commands(commands: Any, command: Any) -> None:
    group = commands.add_parser("plans", help="list, set or remove subscription plans")
    actions = group.add_subparsers(dest="plans_command", required=True, metavar="ACTION")

    p = command(actions, "list", cmd_plans_list, "list plans with their subscribers")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command(actions, "set", cmd_plans_set, "create a plan, or change it from each subscriber's next period")
    p.add_argument("plan_key", metavar="KEY")
    p.add_argument("--credits", required=True, type=int, help="credits granted each period")
    p.add_argument("--period", choices=PERIOD_UNITS, default="month", help="default: month")
    p.add_argument(
        "--rollover",
        type=rollover,
        default=0,
        metavar="N|all",
        help="unused credits carried into the next period (default 0: they reset)",
    )
    p.add_argument("--name", help="shown to people (default: the key)")

    p = command(actions, "remove", cmd_plans_remove, "delete a plan nobody subscribes to")
    p.add_argument("plan_key", metavar="KEY")

    p = command(commands, "subscribe", cmd_subscribe, "put an organization on a plan (its period granted at once)")
    p.add_argument("organization_id", metavar="ORG")
    p.add_argument("plan_key", metavar="PLAN")
    p.add_argument("--anchor", type=expiry, metavar="ISO", help="the first period's start (default: now)")
    p.add_argument("--keep", action="store_true", help="on a plan change, keep the old plan's credits to their end")

    p = command(commands, "unsubscribe", cmd_unsubscribe, "end an organization's plan (no period granted after)")
    p.add_argument("organization_id", metavar="ORG")
    p.add_argument("--expire", action="store_true", help="write off the period under way now (default: keep it)")


def describe(plan: Plan) -> str:
    carried = "all unused credits roll over" if plan.rollover is None else f"up to {plan.rollover} roll over"
    if plan.rollover == 0:
        carried = "unused credits reset"
    return f"plan {plan.plan_key}: {plan.credits} credits a {plan.period}, {carried}"


def describe_subscription(sub: Subscription) -> str:
    if sub.period_start is None:
        return f"{shown(sub.organization_id)} on plan {sub.plan_key} from {sub.renews_at.isoformat()}"
    return (
        f"{shown(sub.organization_id)} on plan {sub.plan_key}: period {sub.period} from"
        f" {sub.period_start.isoformat()}, renews {sub.renews_at.isoformat()}"
    )


async def cmd_plans_list(guard: CreditGuard, args: argparse.Namespace) -> int:
    plans = await guard.store.list_plans()
    if args.json:
        print_json([{**plan.to_dict(), "subscribers": count} for plan, count in plans])
        return 0
    rows = [
        (p.plan_key, p.credits, p.period, "all" if p.rollover is None else p.rollover, count, p.name)
        for p, count in plans
    ]
    print(table(("PLAN", "CREDITS", "PERIOD", "ROLLOVER", "SUBSCRIBERS", "NAME"), rows, right={1, 3, 4}))
    return 0


async def cmd_plans_set(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        plan = await guard.define_plan(
            args.plan_key, credits=args.credits, period=args.period, rollover=args.rollover, name=args.name
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(describe(plan))
    return 0


async def cmd_plans_remove(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        await guard.delete_plan(args.plan_key)
    except (ValueError, PlanNotFound, PlanInUse) as exc:
        raise CliError(str(exc)) from None
    print(f"removed plan {args.plan_key}")
    return 0


async def cmd_subscribe(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        sub = await guard.subscribe(
            args.organization_id, args.plan_key, anchor=args.anchor, on_change="keep" if args.keep else "expire"
        )
    except (ValueError, PlanNotFound) as exc:
        raise CliError(str(exc)) from None
    print(describe_subscription(sub))
    return 0


async def cmd_unsubscribe(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        sub = await guard.unsubscribe(args.organization_id, on_change="expire" if args.expire else "keep")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if sub is None:
        print(f"{shown(args.organization_id)} has no plan: nothing changed")
    else:
        print(f"{shown(args.organization_id)} left plan {sub.plan_key}")
    return 0
