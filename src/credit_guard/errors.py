"""Exceptions raised by credit_guard's Python API.

Business outcomes (not enough credits, unknown feature) are *results*, not exceptions:
``deduct_credits`` returns them so callers cannot forget the unhappy path. Exceptions
are kept for what a caller cannot handle inline: bad arguments and an unreachable store.
"""

from __future__ import annotations


class CreditGuardError(Exception):
    """Base class of every exception credit_guard raises on purpose."""


class StorageUnavailable(CreditGuardError):
    """The database could not be reached or did not answer in time.

    The web layer turns this into ``503`` with ``Retry-After`` and never runs the handler
    (fail closed) unless the guard was built with ``fail_open=True``.
    """


class SchemaMissing(StorageUnavailable):
    """credit_guard's tables are not in the database it was given (never created, another
    database or schema): create them with ``await guard.create_schema()`` or
    ``credit-guard init``.

    A configuration error, not an outage: a paid route answers ``503`` whose problem says
    so (type ``schema-missing``) and is never served free, whatever ``fail_open`` says. A
    ``StorageUnavailable`` still, so code that catches that keeps working.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(
            "credit_guard's tables are missing in this database: create them with"
            f" `await guard.create_schema()` or `credit-guard init` (the database said: {cause})"
        )


class IntegrityViolation(CreditGuardError):
    """The database refused a money write because it broke one of the constraints that
    back the rules (a grant below its floor or above its amount...). Nothing was written.

    The rules are decided so that this cannot happen: it is a bug, never an outage, so
    the web layer answers ``500`` and never serves the request free, whatever
    ``fail_open`` says. It is logged with the database's message.
    """


class InvalidPricing(CreditGuardError, ValueError):
    """Pricing fields failed validation; ``errors`` maps each field to what is wrong."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.errors.items()))


class DuplicateFeature(CreditGuardError):
    """A pricing row with this ``feature_key`` already exists."""

    def __init__(self, feature_key: str) -> None:
        self.feature_key = feature_key
        super().__init__(f"feature_key {feature_key!r} already exists")


class PricingNotFound(CreditGuardError, LookupError):
    """No pricing row has this id."""

    def __init__(self, pricing_id: str) -> None:
        self.pricing_id = pricing_id
        super().__init__(f"no pricing with id {pricing_id!r}")


class PlanNotFound(CreditGuardError, LookupError):
    """No plan has this key (``define_plan`` makes one)."""

    def __init__(self, plan_key: str) -> None:
        super().__init__(f"no plan {plan_key!r:.80}: define it first (guard.define_plan or `credit-guard plans set`)")
        self.plan_key = plan_key


class PlanInUse(CreditGuardError, ValueError):
    """A plan cannot be deleted, nor its period changed, while organizations subscribe to
    it (their periods are counted in its unit from their anchors)."""

    def __init__(self, plan_key: str, change: str = "deleted") -> None:
        super().__init__(
            f"plan {plan_key!r:.80} has subscribers, so it cannot be {change}: move them to another plan first"
        )
        self.plan_key = plan_key


class IdempotencyKeyReused(CreditGuardError, ValueError):
    """An idempotency key was used again for a different call (another feature or units).

    Nothing was charged: a key names one operation, and a client that reuses it for
    another has a bug that a silent replay would hide.
    """

    def __init__(self, idempotency_key: str) -> None:
        self.idempotency_key = idempotency_key
        super().__init__(f"idempotency key {idempotency_key!r} was already used for a different call")
