"""The admin API's plumbing: reading JSON bodies and query values, refusing with a problem.

Shared by the pricing endpoints (``api.py``), the organizations view (``organizations.py``),
plans (``plans.py``), auto top-ups (``topups.py``) and member caps (``members.py``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from .. import problems
from ..models import UNSTORABLE_TEXT, FeaturePricing, is_storable_text
from ..problems import Problem
from ..schema import MAX_BALANCE

PUBLIC_FIELDS = ("feature_key", "feature_name", "category", "credits", "description")


class Refusal(Exception):
    """A request this module answers with a problem instead of a result."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(problem.detail)


def public_view(pricing: FeaturePricing) -> dict[str, Any]:
    data = pricing.to_dict()
    return {name: data[name] for name in PUBLIC_FIELDS}


def refuse_unstorable(request: Request) -> None:
    """A parameter the database cannot even compare (a NUL) is the client's error, not an outage."""
    params = [*request.query_params.multi_items(), *request.path_params.items()]
    refuse_if(
        {name: UNSTORABLE_TEXT for name, value in params if isinstance(value, str) and not is_storable_text(value)}
    )


def refuse_if(errors: dict[str, str]) -> None:
    if errors:
        raise Refusal(problems.invalid_request(errors, status=422))


def whole_number(value: Any, low: int, name: str, errors: dict[str, str], *, null: str = "") -> int | None:
    """``value`` when it is a whole number from ``low`` to ``MAX_BALANCE`` (not a bool);
    else None, with why in ``errors[name]`` (``null``: what a null would mean, if allowed)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_BALANCE:
        errors[name] = f"must be a whole number from {low} to {MAX_BALANCE}{null}"
        return None
    return value


def parse_bool(raw: str | None, name: str, errors: dict[str, str]) -> bool | None:
    if raw is None:
        return None
    value = {"true": True, "false": False}.get(raw.lower())
    if value is None:
        errors[name] = "must be true or false"
    return value


def parse_when(raw: str | None, name: str, errors: dict[str, str]) -> datetime | None:
    """An ISO 8601 date or datetime, as an aware UTC datetime (naive means UTC).

    UTC because SQLite stores the ledger's timestamps as UTC wall-clock text: a bound in
    another zone would be compared hours off.
    """
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.upper())  # RFC 3339 allows a lowercase "t" and "z"
    except ValueError:
        errors[name] = "must be an ISO 8601 date or datetime, e.g. 2025-01-31 or 2025-01-31T12:00:00Z"
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last representable UTC instant
        errors[name] = "is out of the representable range of dates"
        return None


def json_number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


async def json_object(request: Request) -> dict[str, Any]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Refusal(problems.invalid_request({"content-type": "must be application/json"}, status=415))
    raw = await request.body()
    try:
        # JSON has one number type: 8.0 is the integer 8 (as JSON Schema says), 8.5 is not.
        data = json.loads(raw, parse_float=json_number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(problems.invalid_request({"body": f"is not valid JSON ({exc})"})) from exc
    except RecursionError as exc:
        raise Refusal(problems.invalid_request({"body": "is nested too deeply"})) from exc
    if not isinstance(data, dict):
        raise Refusal(problems.invalid_request({"body": "must be a JSON object"}))
    return data
