"""Plain result and record types of the public API, and the validation of pricing fields.

They are frozen dataclasses (not ORM objects) so they can be cached, compared in tests
and serialised without a session hanging off them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any, Literal

from .errors import InvalidPricing

FEATURE_KEY_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
FEATURE_KEY_MAX = 64
#: A credit pool's name: spelled like a feature key (it travels in ``X-Credits-Pool``).
POOL_RE = FEATURE_KEY_RE
POOL_MAX = 64
POOL_RULE = "must be lowercase letters and digits joined by single underscores, starting with a letter (e.g. video)"
FEATURE_NAME_MAX = 200
CATEGORY_MAX = 100
DESCRIPTION_MAX = 2000
CREDITS_MAX = 1_000_000

#: Why a deduction did not happen; stable strings callers may switch on.
DeductionError = Literal["insufficient_credits", "member_limit_reached", "feature_not_found", "feature_inactive"]


@dataclass(frozen=True, slots=True)
class FeaturePricing:
    """One row of the pricing table."""

    id: str
    feature_key: str
    feature_name: str
    category: str
    credits: int
    description: str | None
    is_active: bool
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: The credit pool the feature draws from (None: the general pool), and whether it may
    #: draw from general credits once its pool's are spent.
    pool: str | None = None
    pool_fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for stamp in ("created_at", "updated_at"):
            value = data[stamp]
            data[stamp] = value.isoformat() if value is not None else None
        return data


@dataclass(frozen=True, slots=True)
class DeductionResult:
    """Outcome of :meth:`CreditGuard.deduct_credits` (the seed's ``deductCredits``).

    ``remaining_credits`` is the balance after the charge on success and the balance
    that was available on failure, so a 402 can say both numbers without a second read.
    """

    success: bool
    remaining_credits: int | None = None
    credits_deducted: int | None = None
    error: str | None = None
    charge_id: int | None = None
    required: int | None = None
    error_code: DeductionError | None = None
    #: True when an idempotency key matched an earlier call: nothing was charged this time.
    replayed: bool = False
    #: The feature's price per unit (``credits_deducted`` is it times the units, rounded up).
    unit_price: int | None = None
    #: The credit pool the feature draws from (None: general); ``remaining_credits`` is
    #: then what the feature can still spend (its pool, and general credits if it falls back).
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """Credits granted to an organization: what is ``remaining`` of ``amount``, spendable
    until ``expires_at`` (None: never expires), drawn from in order of ``priority``."""

    id: int
    amount: int
    remaining: int
    expires_at: datetime | None
    priority: int
    reason: str | None
    created_at: datetime | None
    #: The credit pool it belongs to: only that pool's features draw from it (None: general).
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """An async job's credits, held under ``job_id`` until captured or released.

    ``state`` is ``open``, then ``captured``, ``released`` or ``expired`` (its TTL ran out
    and the sweeper gave the credits back)."""

    job_id: str
    organization_id: str
    feature_key: str
    charge_id: int
    credits: int
    state: str
    expires_at: datetime | None
    unit_price: int = 0
    max_overage_credits: int = 0
    #: What this call moved: credits kept by a capture, credits given back.
    captured_credits: int = 0
    refunded_credits: int = 0


@dataclass(frozen=True, slots=True)
class CreditCheck:
    """Outcome of :meth:`CreditGuard.check_credits` (the seed's ``checkCredits``).

    A check is advice for a UI, not a reservation: only a deduction holds credits.
    """

    has_enough: bool
    required: int
    available: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RefundResult:
    """Outcome of :meth:`CreditGuard.refund_credits`.

    ``refunded`` is False when the charge was already refunded (by this call's twin or
    any earlier one) or does not exist; ``error`` says which.
    """

    refunded: bool
    credits_refunded: int = 0
    remaining_credits: int | None = None
    refund_id: int | None = None
    error: str | None = None
    organization_id: str | None = None
    feature_key: str | None = None
    #: The credit pool the refunded charge drew from (None: general); ``remaining_credits``
    #: is then what its feature can spend.
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class AuditIssue:
    """Something in the books that does not add up; ``audit()`` returns [] when all is well."""

    organization_id: str
    problem: str
    balance: int | None = None
    ledger_sum: int | None = None


UsageGroup = Literal["day", "feature", "org"]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of the usage report, read from the ledger (so it always matches the money)."""

    key: str
    charges: int
    credits_charged: int
    refunds: int
    credits_refunded: int
    #: The second grouping's value (``usage_report(split_by=...)``), else None.
    split: str | None = None

    @property
    def net_credits(self) -> int:
        return self.credits_charged - self.credits_refunded

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.split is None:
            del fields["split"]
        return {**fields, "net_credits": self.net_credits}


@dataclass(frozen=True, slots=True)
class BalancePoint:
    """An organization's balance at the end of a day on which it moved (``balance_history``)."""

    day: date
    balance: int

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day.isoformat(), "balance": self.balance}


@dataclass(frozen=True, slots=True)
class Plan:
    """Credits by subscription: ``credits`` every ``period`` (``day``, ``week``, ``month`` or
    ``year``), as a grant that expires at the period's end; ``rollover`` of what is left
    carries into the next period (None: all of it, 0: none)."""

    plan_key: str
    name: str
    credits: int
    period: str
    rollover: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Subscription:
    """An organization's plan: ``period`` is the last one granted (-1 while the anchor is
    ahead), ``renews_at`` when the next starts; ``grant_id`` that period's allowance and
    ``rollover_grant_id`` what rolled into it (None: nothing did)."""

    organization_id: str
    plan_key: str
    anchor: datetime
    period: int
    period_start: datetime | None
    renews_at: datetime
    grant_id: int | None
    rollover_grant_id: int | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("anchor", "period_start", "renews_at"):
            data[name] = None if data[name] is None else data[name].isoformat()
        return data


@dataclass(frozen=True, slots=True)
class AutoTopup:
    """An organization's automatic top-up: ``credits`` bought when its spendable balance
    falls below ``below``, once per crossing. ``state``: 'armed', 'running' or 'fired'
    (until the balance is back at or above ``below``); ``crossings`` counts the top-ups
    run; ``last_result`` is what the app's charge returned, ``last_error`` what it raised."""

    organization_id: str
    below: int
    credits: int
    state: str
    crossings: int
    last_result: str | None
    last_error: str | None
    last_run_at: datetime | None


@dataclass(frozen=True, slots=True)
class MemberLimit:
    """A member's cap inside an organization and its use now: at most ``credits`` per
    ``per`` ('day', 'month': UTC calendar periods; None: in all), ``used`` of it in the
    current period, ``remaining`` what is left, ``resets_at`` when the next period starts."""

    organization_id: str
    member: str
    credits: int
    per: str | None
    used: int
    remaining: int
    resets_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resets_at"] = None if self.resets_at is None else self.resets_at.isoformat()
        return data


_FIELDS = {"feature_key", "feature_name", "category", "credits", "description", "is_active", "pool", "pool_fallback"}
_REQUIRED = ("feature_key", "feature_name", "category", "credits")


UNSTORABLE_TEXT = "must not contain NUL characters or unpaired surrogates"
CONTROL_TEXT = "must not contain control characters (a terminal escape, a line break)"
#: What a one-line label (a feature's name, a category) must not hold: characters a terminal
#: or a table acts on instead of showing (C0 and C1 controls, line and paragraph separators,
#: bidi embeddings, overrides and isolates). One class for the check and the OpenAPI pattern.
LABEL_FORBIDDEN = r"\u0000-\u001f\u007f-\u009f\u2028-\u202e\u2066-\u2069"
#: A label: not blank, and none of the above.
LABEL_PATTERN = rf"^[^{LABEL_FORBIDDEN}]*[^\s{LABEL_FORBIDDEN}][^{LABEL_FORBIDDEN}]*$"
_LABEL_FORBIDDEN_RE = re.compile(f"[{LABEL_FORBIDDEN}]")


def pool_error(pool: object) -> str | None:
    """What is wrong with a credit pool's name (None: nothing; ``None`` itself is the general pool)."""
    if pool is None:
        return None
    if not isinstance(pool, str):
        return "must be a string or null (the general pool)"
    if len(pool) > POOL_MAX:
        return f"must be at most {POOL_MAX} characters"
    return None if POOL_RE.fullmatch(pool) else POOL_RULE


def check_pool(pool: object) -> str | None:
    """``pool`` for the Python API: ValueError naming what is wrong with it."""
    error = pool_error(pool)
    if error is not None:
        raise ValueError(f"pool {error}, got {pool!r:.80}")
    return pool  # type: ignore[return-value]


def has_control_characters(value: str) -> bool:
    """Whether a one-line label carries characters a terminal or a table would act on
    (escape sequences, line breaks, bidi overrides) instead of showing."""
    return _LABEL_FORBIDDEN_RE.search(value) is not None


def is_storable_text(value: str) -> bool:
    """False for text PostgreSQL cannot store (NUL, or invalid UTF-8 such as a lone surrogate
    from JSON's ``"\\ud800"``): left to the database, it would fail as an outage (503)."""
    if "\x00" in value:
        return False
    if value.isascii():  # the usual id: nothing more to check (and no copy made)
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_pricing_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Check pricing fields and return them cleaned; raise InvalidPricing naming every bad field.

    All fields are checked before anything is written so a request either lands whole or
    changes nothing. ``partial`` is for updates, where absent fields stay as they are.
    """
    errors: dict[str, str] = {}
    for unknown in sorted(set(data) - _FIELDS):
        errors[unknown] = "unknown field"
    if not partial:
        for name in _REQUIRED:
            if data.get(name) is None:
                errors[name] = "is required"
    clean: dict[str, Any] = {}

    if "feature_key" in data and "feature_key" not in errors:
        key = data["feature_key"]
        if not isinstance(key, str):
            errors["feature_key"] = "must be a string"
        elif len(key) > FEATURE_KEY_MAX:
            errors["feature_key"] = f"must be at most {FEATURE_KEY_MAX} characters"
        elif not FEATURE_KEY_RE.fullmatch(key):
            errors["feature_key"] = (
                "must be lowercase letters and digits joined by single underscores, "
                "starting with a letter (e.g. seedream_text_to_image)"
            )
        else:
            clean["feature_key"] = key
    for name, limit in (("feature_name", FEATURE_NAME_MAX), ("category", CATEGORY_MAX)):
        if name in data and name not in errors:
            value = data[name]
            if not isinstance(value, str) or not value.strip():
                errors[name] = "must be a non-empty string"
            elif len(value.strip()) > limit:
                errors[name] = f"must be at most {limit} characters"
            elif not is_storable_text(value):
                errors[name] = UNSTORABLE_TEXT
            elif has_control_characters(value):
                errors[name] = CONTROL_TEXT
            else:
                clean[name] = value.strip()
    if "credits" in data and "credits" not in errors:
        credits = data["credits"]
        # bool is an int subclass; True credits is a bug in the caller, not 1 credit.
        if not isinstance(credits, int) or isinstance(credits, bool):
            errors["credits"] = "must be an integer"
        elif not 0 <= credits <= CREDITS_MAX:
            errors["credits"] = f"must be between 0 and {CREDITS_MAX}"
        else:
            clean["credits"] = credits
    if "description" in data:
        description = data["description"]
        if description is not None and not isinstance(description, str):
            errors["description"] = "must be a string or null"
        elif description is not None and len(description) > DESCRIPTION_MAX:
            errors["description"] = f"must be at most {DESCRIPTION_MAX} characters"
        elif description is not None and not is_storable_text(description):
            errors["description"] = UNSTORABLE_TEXT
        else:
            clean["description"] = description or None
    if "is_active" in data:
        active = data["is_active"]
        if not isinstance(active, bool):
            errors["is_active"] = "must be true or false"
        else:
            clean["is_active"] = active
    if "pool" in data:
        error = pool_error(data["pool"])
        if error is not None:
            errors["pool"] = error
        else:
            clean["pool"] = data["pool"]
    if "pool_fallback" in data:
        fallback = data["pool_fallback"]
        if not isinstance(fallback, bool):
            errors["pool_fallback"] = "must be true or false"
        else:
            clean["pool_fallback"] = fallback
    if errors:
        raise InvalidPricing(errors)
    return clean


def validate_pricing_rows(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], dict[int, dict[str, str]]]:
    """Check many pricing rows at once: ``(clean rows, {row number: {field: message}})``.

    Row numbers count from 1. Every row is checked (not just up to the first bad one) so a
    seed file can be fixed in one pass; a key that appears twice is an error on the later
    row, because importing both would silently keep only one of them.
    """
    clean: list[dict[str, Any]] = []
    errors: dict[int, dict[str, str]] = {}
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        try:
            fields = validate_pricing_fields(row)
        except InvalidPricing as exc:
            errors[number] = exc.errors
            continue
        key = fields["feature_key"]
        if key in first_row:
            errors[number] = {"feature_key": f"{key!r} duplicates row {first_row[key]}"}
            continue
        first_row[key] = number
        clean.append(fields)
    return clean, errors
