"""The CLI's import files: JSON or CSV of the seed's pricing fields, read and parsed.

Every row is parsed (and later validated) before anything is written, so a file lands
whole or not at all, and each bad cell is named with its row.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from typing import Any

import anyio

IMPORT_FIELDS = ("feature_key", "feature_name", "category", "credits", "description", "is_active")
IMPORT_REQUIRED = ("feature_key", "feature_name", "category", "credits")
#: Columns ``pricing list --json`` exports that an import skips, so an export re-imports as is.
IMPORT_IGNORED = ("id", "created_at", "updated_at")

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_INT_RE = re.compile(r"[+-]?\d+")
_EXTRA_CELLS = "\0extra"


class CliError(Exception):
    """A refusal reported as ``credit-guard: error: <message>`` with exit code 1."""


Parsed = tuple[list[str], list[dict[str, Any]], dict[int, dict[str, str]]]


async def read_text(path: str) -> str:
    try:
        if path == "-":
            return await anyio.to_thread.run_sync(sys.stdin.read)
        return await anyio.Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"cannot read {path}: not UTF-8 ({exc.reason})") from None


def guess_format(path: str, text: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith(".csv"):
        return "csv"
    return "json" if text.lstrip().startswith("[") else "csv"


def parse_json(path: str, text: str) -> Parsed:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise CliError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, list):
        raise CliError(f"{path}: expected a JSON array of pricing objects")
    labels: list[str] = []
    rows: list[dict[str, Any]] = []
    errors: dict[int, dict[str, str]] = {}
    for number, item in enumerate(data, 1):
        labels.append(f"row {number}")
        if isinstance(item, dict):
            rows.append({k: v for k, v in item.items() if k not in IMPORT_IGNORED})
        else:
            rows.append({})
            errors[number] = {"": f"must be a JSON object, not {type(item).__name__}"}
    return labels, rows, errors


def parse_csv(path: str, text: str) -> Parsed:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA_CELLS)
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise CliError(f"{path}: empty file; expected a header row: {','.join(IMPORT_FIELDS)}")
    reader.fieldnames = header
    unknown = [name for name in header if name not in IMPORT_FIELDS and name not in IMPORT_IGNORED]
    missing = [name for name in IMPORT_REQUIRED if name not in header]
    repeated = sorted({name for name in header if header.count(name) > 1})
    problems = []
    if unknown:
        problems.append(f"unknown column(s) {', '.join(unknown)}")
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if repeated:
        problems.append(f"repeated column(s) {', '.join(repeated)}")
    if problems:
        raise CliError(f"{path}: {'; '.join(problems)} (columns: {','.join(IMPORT_FIELDS)})")
    labels: list[str] = []
    rows: list[dict[str, Any]] = []
    errors: dict[int, dict[str, str]] = {}
    for number, record in enumerate(reader, 1):
        labels.append(f"row {number} (line {reader.line_num})")
        extra = record.pop(_EXTRA_CELLS, None)
        if extra:
            errors[number] = {"": f"{len(extra)} more cell(s) than the header has columns"}
        row: dict[str, Any] = {}
        for field in IMPORT_FIELDS:
            if field in record:
                value = _csv_value(field, record[field])
                if value is not _ABSENT:
                    row[field] = value
        rows.append(row)
    return labels, rows, errors


_ABSENT = object()


def _csv_value(field: str, raw: str | None) -> object:
    """A CSV cell as the type validation expects; unparseable text is kept so validation names it."""
    text = (raw or "").strip()
    if field == "is_active":
        if not text:
            return _ABSENT  # new rows default to active; --update-existing leaves it as it is
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if not text:
        return None
    if field == "credits":
        return int(text) if _INT_RE.fullmatch(text) else text
    return text
