"""``credit-guard``: the operator's command line for schema, prices, grants, usage and audit.

It is a thin shell over :class:`CreditGuard`, so every rule the library enforces (validation,
atomic writes, the ledger) holds here too. The contract scripts can rely on:

* exit 0: done; 1: understood but refused (unknown key, invalid pricing, database
  unreachable, audit found issues) and nothing was written; 2: bad arguments (argparse).
* results go to stdout, one record per line; errors go to stderr as
  ``credit-guard: error: ...``, one line per problem.
* ``--json`` on the listing commands prints the library's own ``to_dict()`` shapes.

``main(argv)`` runs in-process (it starts its own event loop), which is how the tests call it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError

from ._cli_files import CliError, guess_format, parse_csv, parse_json, read_text
from ._cli_grants import add_commands as add_credit_commands
from ._cli_grants import expiry, priority
from ._cli_output import print_json as _print_json
from ._cli_output import shown as _shown
from ._cli_output import table as _table
from ._cli_plans import add_commands as add_plan_commands
from ._config import DATABASE_URL_ENV
from ._guard import CreditGuard
from ._storage.engine import DEFAULT_DATABASE_URL
from .errors import DuplicateFeature, InvalidPricing, StorageUnavailable
from .models import FeaturePricing, validate_pricing_rows
from .schema import MAX_BALANCE as MAX_GRANT
from .schema import metadata

PROG = "credit-guard"
Handler = Callable[[CreditGuard, argparse.Namespace], Awaitable[int]]

# -- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors; keep the in-process caller alive
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    usage_problem = getattr(args, "check", None)
    if usage_problem is not None and (message := usage_problem(args)):
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {message}", file=sys.stderr)
        return 2
    _route_library_logs(verbose=args.verbose)
    result: int = anyio.run(_run, args)
    return result


async def _run(args: argparse.Namespace) -> int:
    url = args.database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL
    try:
        parsed = make_url(url)
        guard = CreditGuard(parsed)
    except (ArgumentError, NoSuchModuleError, InvalidRequestError, ImportError, ValueError) as exc:
        _error(f"invalid database URL: {exc}")  # not the URL itself: it may carry a password
        return 2
    shown = parsed.render_as_string(hide_password=True)
    handler: Handler = args.handler
    sqlite_file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if handler is not cmd_init and sqlite_file not in (None, "", ":memory:") and not sqlite_file.startswith("file:"):
        # Opening a mistyped path would create an empty database file there; say so instead.
        if not await anyio.Path(sqlite_file).exists():
            await guard.close()
            _error(f"no database file at {sqlite_file}; run `{PROG} init` to create one")
            return 1
    try:
        try:  # not `async with`: a one-shot command needs no keeper, hook workers or listener
            return await handler(guard, args)
        finally:
            await guard.close()
    except CliError as exc:
        _error(str(exc))
    except InvalidPricing as exc:
        _error(f"invalid pricing: {exc}")
    except DuplicateFeature as exc:
        _error(str(exc))
    except StorageUnavailable as exc:
        _error(_storage_message(str(exc), shown))
    return 1


def _storage_message(detail: str, url: str) -> str:
    first_line = detail.strip().splitlines()[0] if detail.strip() else "no answer"
    if "no such table" in first_line or ("relation" in first_line and "does not exist" in first_line):
        return f"credit_guard's tables are missing in {url}; run `{PROG} init` first"
    return f"database unavailable at {url}: {first_line}"


def _route_library_logs(*, verbose: bool) -> None:
    """Send the library's logs to stderr with -v; otherwise keep its error logs (which the
    exit code and one-line message already cover) from printing tracebacks."""
    logger = logging.getLogger("credit_guard")
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    elif not logger.handlers:
        logger.addHandler(logging.NullHandler())


def _error(message: str) -> None:
    print(f"{PROG}: error: {_shown(message)}", file=sys.stderr)


# -- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"SQLAlchemy async URL (default: ${DATABASE_URL_ENV} or {DEFAULT_DATABASE_URL})",
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show library logs")

    parser = argparse.ArgumentParser(prog=PROG, description="Operate credit_guard: schema, prices, credits, usage.")
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help=f"SQLAlchemy async URL (default: ${DATABASE_URL_ENV} or {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    command(commands, "init", cmd_init, "create credit_guard's tables if missing (safe to repeat)")

    pricing = commands.add_parser("pricing", help="list, add, update, remove or import feature prices")
    pricing_commands = pricing.add_subparsers(dest="pricing_command", required=True, metavar="ACTION")

    p = command(pricing_commands, "list", cmd_pricing_list, "list feature prices")
    p.add_argument("--category", help="only this category")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", dest="is_active", action="store_const", const=True, help="only active prices")
    state.add_argument("--inactive", dest="is_active", action="store_const", const=False, help="only inactive prices")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command(pricing_commands, "add", cmd_pricing_add, "add a feature price")
    # The key is positional, as in update/remove; ``--key K`` (the first form) still works.
    p.add_argument("key", nargs="?", metavar="KEY", help="feature_key, e.g. seedream_text_to_image")
    p.add_argument("--key", dest="key_option", metavar="KEY", help="the same, as an option")
    p.set_defaults(check=_check_add)
    p.add_argument("--name", required=True, help="feature_name shown to people")
    p.add_argument("--category", required=True)
    p.add_argument("--credits", required=True, type=int, help="credits charged per call")
    p.add_argument("--description")
    p.add_argument("--inactive", dest="is_active", action="store_false", help="add it switched off")

    p = command(pricing_commands, "update", cmd_pricing_update, "change fields of a feature price")
    p.add_argument("ref", metavar="KEY_OR_ID")
    p.add_argument("--key", help="rename the feature_key")
    p.add_argument("--name")
    p.add_argument("--category")
    p.add_argument("--credits", type=int)
    p.add_argument("--description", help='new description ("" clears it)')
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", dest="is_active", action="store_const", const=True)
    state.add_argument("--inactive", dest="is_active", action="store_const", const=False)
    p.set_defaults(check=_check_update)

    p = command(pricing_commands, "remove", cmd_pricing_remove, "delete a feature price (the ledger keeps its key)")
    p.add_argument("ref", metavar="KEY_OR_ID")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = command(pricing_commands, "import", cmd_pricing_import, "add many prices from a JSON or CSV file, all or none")
    p.add_argument("file", metavar="FILE", help="a .json array or a .csv with a header row; - reads stdin")
    p.add_argument("--format", choices=("json", "csv"), help="default: from the file name, else sniffed")
    p.add_argument("--update-existing", action="store_true", help="overwrite prices whose key exists (default: refuse)")
    p.add_argument("--dry-run", action="store_true", help="validate and show the plan; write nothing")

    p = command(commands, "grant", cmd_grant, "add credits to an organization (creating its account)")
    p.add_argument("organization_id", metavar="ORG")
    p.add_argument("amount", metavar="AMOUNT", type=_positive_int)
    p.add_argument("--reason", help="recorded on the ledger row")
    p.add_argument("--expires-at", type=expiry, metavar="ISO", help="not spendable from then on (UTC if no offset)")
    p.add_argument("--priority", type=priority, default=0, metavar="N", help="lower is spent first (default 0)")
    p.add_argument(
        "--pool", metavar="POOL", help="credits only the features of this credit pool spend (default: general)"
    )
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="grant once per organization and key (a payment's id): repeating the command grants nothing",
    )

    add_credit_commands(commands, command)
    add_plan_commands(commands, command)

    p = command(commands, "balance", cmd_balance, "print an organization's balance")
    p.add_argument("organization_id", metavar="ORG")

    p = command(commands, "usage", cmd_usage, "credits charged and refunded, from the ledger")
    p.add_argument("--org", dest="organization_id", metavar="ORG")
    p.add_argument("--feature", dest="feature_key", metavar="KEY")
    p.add_argument("--since", type=_timestamp, metavar="WHEN", help="ISO date or datetime, inclusive (UTC if naive)")
    p.add_argument("--until", type=_timestamp, metavar="WHEN", help="ISO date or datetime, exclusive (UTC if naive)")
    p.add_argument("--group-by", choices=("day", "feature", "org"), default="day")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command(commands, "audit", cmd_audit, "check every balance against its ledger; exit 1 on any issue")
    p.add_argument("--json", action="store_true", help="print a JSON array of issues")

    p = command(
        commands,
        "sweep",
        cmd_sweep,
        "refund holds whose process died (and expired reservations), forget expired keys, expire grants",
    )
    p.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="keep sweeping at this interval until interrupted (default: sweep once)",
    )
    return parser


MAX_AMOUNT = MAX_GRANT  # the guard refuses more; say so as a usage error, before any I/O


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 < value <= MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"must be a positive integer up to {MAX_AMOUNT}, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 86400 * 365:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or datetime: {text!r}") from None
    # The ledger stores UTC; SQLite compares wall-clock text, so convert rather than attach.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"out of the representable range of dates: {text!r}") from None


def _check_add(args: argparse.Namespace) -> str | None:
    if args.key and args.key_option and args.key != args.key_option:
        return f"two feature keys given: {args.key!r} and --key {args.key_option!r}"
    args.key = args.key or args.key_option
    return None if args.key else "the feature key is required: credit-guard pricing add KEY --name ... --credits N"


def _check_update(args: argparse.Namespace) -> str | None:
    if not _update_changes(args):
        return "nothing to change: give at least one of --key --name --category --credits --description --active --inactive"
    return None


def _update_changes(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "feature_key": args.key,
        "feature_name": args.name,
        "category": args.category,
        "credits": args.credits,
        "description": args.description,
        "is_active": args.is_active,
    }
    return {field: value for field, value in pairs.items() if value is not None}


# -- commands -------------------------------------------------------------------------------


async def cmd_init(guard: CreditGuard, args: argparse.Namespace) -> int:
    await guard.create_schema()
    shown = guard.engine.url.render_as_string(hide_password=True)
    print(f"schema ready at {shown}: {', '.join(sorted(metadata.tables))}")
    return 0


async def cmd_pricing_list(guard: CreditGuard, args: argparse.Namespace) -> int:
    rows = await guard.list_pricing(category=args.category, is_active=args.is_active)
    if args.json:
        _print_json([pricing.to_dict() for pricing in rows])
        return 0
    if not rows:
        print("no pricing rows match", file=sys.stderr)
        return 0
    print(
        _table(
            ("FEATURE_KEY", "CREDITS", "ACTIVE", "CATEGORY", "NAME", "ID"),
            [(p.feature_key, p.credits, _yes_no(p.is_active), p.category, p.feature_name, p.id) for p in rows],
            right={1},
        )
    )
    return 0


async def cmd_pricing_add(guard: CreditGuard, args: argparse.Namespace) -> int:
    pricing = await guard.create_pricing(
        feature_key=args.key,
        feature_name=args.name,
        category=args.category,
        credits=args.credits,
        description=args.description,
        is_active=args.is_active,
    )
    print(_describe("created", pricing))
    return 0


async def cmd_pricing_update(guard: CreditGuard, args: argparse.Namespace) -> int:
    pricing = await _find_pricing(guard, args.ref)
    print(_describe("updated", await guard.update_pricing(pricing.id, **_update_changes(args))))
    return 0


async def cmd_pricing_remove(guard: CreditGuard, args: argparse.Namespace) -> int:
    pricing = await _find_pricing(guard, args.ref)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"not removing {pricing.feature_key} without confirmation: pass --yes")
        answer = await anyio.to_thread.run_sync(
            input, f"remove {pricing.feature_key} ({pricing.credits} credits)? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError(f"not removing {pricing.feature_key}: not confirmed")
    print(_describe("removed", await guard.delete_pricing(pricing.id)))
    return 0


async def cmd_pricing_import(guard: CreditGuard, args: argparse.Namespace) -> int:
    text = await read_text(args.file)
    fmt = args.format or guess_format(args.file, text)
    try:
        labels, rows, row_errors = parse_json(args.file, text) if fmt == "json" else parse_csv(args.file, text)
    except csv.Error as exc:  # e.g. a cell over the csv module's size limit: a file problem, not a crash
        raise CliError(f"{args.file}: invalid CSV: {exc}") from None
    if not rows:
        raise CliError(f"{args.file} has no rows; nothing imported")

    clean, errors = validate_pricing_rows(rows)
    valid = dict(zip((n for n in range(1, len(rows) + 1) if n not in errors), clean, strict=True))
    for number, problems in row_errors.items():
        # A JSON item that is not an object has only that problem, not "is required" for each field.
        errors[number] = {**problems, **errors.get(number, {})} if rows[number - 1] else problems
        valid.pop(number, None)
    existing = {pricing.feature_key for pricing in await guard.list_pricing()}
    if not args.update_existing:
        for number, fields in valid.items():
            if fields["feature_key"] in existing:
                errors[number] = {
                    "feature_key": f"{fields['feature_key']!r} already exists (pass --update-existing to overwrite)"
                }
    if errors:
        for number in sorted(errors):
            for field, message in errors[number].items():
                _error(f"{labels[number - 1]}: {field + ': ' if field else ''}{message}")
        _error(f"{len(errors)} of {len(rows)} rows in {args.file} are invalid; nothing imported")
        return 1

    if args.dry_run:
        for fields in clean:
            print(f"would {'update' if fields['feature_key'] in existing else 'create'} {fields['feature_key']}")
        to_update = sum(fields["feature_key"] in existing for fields in clean)
        print(
            f"dry run: {len(clean)} rows valid, {len(clean) - to_update} to create, {to_update} to update; nothing written"
        )
        return 0
    created, updated = await guard.import_pricing(clean, update_existing=args.update_existing)
    for pricing in created:
        print(_describe("created", pricing))
    for pricing in updated:
        print(_describe("updated", pricing))
    print(f"imported {len(clean)} rows from {args.file}: {len(created)} created, {len(updated)} updated")
    return 0


async def cmd_grant(guard: CreditGuard, args: argparse.Namespace) -> int:
    key = args.idempotency_key
    try:
        balance = await guard.grant_credits(
            args.organization_id,
            args.amount,
            reason=args.reason,
            expires_at=args.expires_at,
            priority=args.priority,
            idempotency_key=key,
            pool=args.pool,
        )
    except ValueError as exc:  # the guard's own checks: an empty organization id, the balance maximum, a reused key
        raise CliError(str(exc)) from None
    what = f"{args.amount}" if args.pool is None else f"{args.amount} {args.pool} credits"
    if key is None:
        print(f"granted {what} to {_shown(args.organization_id)}: balance {balance}")
    else:
        print(f"granted {what} to {_shown(args.organization_id)} once for key {key}: balance {balance}")
    return 0


async def cmd_balance(guard: CreditGuard, args: argparse.Namespace) -> int:
    try:
        print(await guard.get_balance(args.organization_id))
    except ValueError as exc:  # an empty organization id is refused here as in `grant`
        raise CliError(str(exc)) from None
    return 0


async def cmd_usage(guard: CreditGuard, args: argparse.Namespace) -> int:
    rows = await guard.usage_report(
        group_by=args.group_by,
        organization_id=args.organization_id,
        feature_key=args.feature_key,
        since=args.since,
        until=args.until,
    )
    if args.json:
        _print_json([row.to_dict() for row in rows])
        return 0
    if not rows:
        print("no usage matches", file=sys.stderr)
        return 0
    numbers = [(row.charges, row.credits_charged, row.refunds, row.credits_refunded, row.net_credits) for row in rows]
    body: list[Sequence[object]] = [(row.key, *values) for row, values in zip(rows, numbers, strict=True)]
    body.append(("TOTAL", *(sum(column) for column in zip(*numbers, strict=True))))
    print(
        _table((args.group_by.upper(), "CHARGES", "CHARGED", "REFUNDS", "REFUNDED", "NET"), body, right={1, 2, 3, 4, 5})
    )
    return 0


async def cmd_audit(guard: CreditGuard, args: argparse.Namespace) -> int:
    issues = await guard.audit()
    if args.json:
        _print_json(
            [
                {
                    "organization_id": i.organization_id,
                    "problem": i.problem,
                    "balance": i.balance,
                    "ledger_sum": i.ledger_sum,
                }
                for i in issues
            ]
        )
    else:
        for issue in issues:
            numbers = ""
            if issue.balance is not None or issue.ledger_sum is not None:
                numbers = f" (balance={issue.balance} ledger_sum={issue.ledger_sum})"
            print(f"{_shown(issue.organization_id)}: {_shown(issue.problem)}{numbers}")
    if issues:
        _error(f"audit found {len(issues)} issue(s)")
        return 1
    if not args.json:
        print("audit ok: every balance matches its ledger")
    return 0


async def cmd_sweep(guard: CreditGuard, args: argparse.Namespace) -> int:
    """The guard's own sweeper, for apps that run guards with ``sweep=False`` (or none at all)."""
    while True:
        released = await guard.release_expired_holds()
        print(f"released {released} expired hold(s)", flush=True)
        if args.every is None:
            return 0
        await anyio.sleep(args.every)


# -- helpers --------------------------------------------------------------------------------


async def _find_pricing(guard: CreditGuard, ref: str) -> FeaturePricing:
    """A pricing row by id or by feature_key (ids are UUIDs, keys cannot contain '-')."""
    pricing = await guard.get_pricing(ref)
    if pricing is None:
        pricing = next((p for p in await guard.list_pricing() if p.feature_key == ref), None)
    if pricing is None:
        raise CliError(f"no pricing with key or id {ref!r}")
    return pricing


def _describe(verb: str, pricing: FeaturePricing) -> str:
    return f"{verb} {pricing.feature_key} id={_shown(pricing.id)} credits={pricing.credits} active={_yes_no(pricing.is_active)}"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
