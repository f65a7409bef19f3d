"""What the admin app's OpenAPI document is made of: shared by ``openapi.py`` and the
plans', auto top-ups' and member caps' parts of it (``_openapi_plans.py``, ``_openapi_topups.py``,
``_openapi_members.py``)."""

from __future__ import annotations

from typing import Any

from .. import problems
from ..models import LABEL_PATTERN

REF = "#/components/schemas/"
#: A label: not blank, no NUL (PostgreSQL cannot store it) and no control characters.
TEXT = LABEL_PATTERN
#: A filter on labels: not blank, no NUL (a label that cannot exist simply matches nothing).
FILTER = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
NO_NUL = r"^[^\u0000]*$"
WHEN = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}]}


def problem_response(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {problems.PROBLEM_CONTENT_TYPE: {"schema": {"$ref": REF + "Problem"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        }
    return response


def json_response(schema_name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF + schema_name}}},
        **extra,
    }


def error_refs(*statuses: str) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{status}"} for status in statuses}


def query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


__all__ = [
    "FILTER",
    "NO_NUL",
    "REF",
    "TEXT",
    "WHEN",
    "error_refs",
    "json_response",
    "problem_response",
    "query_param",
]
