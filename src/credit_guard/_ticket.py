"""A ticket: one paid request's charge, and the one thing that decides how it ends.

The request flow opens it (the charge is taken, as a hold), puts it on the request
(``current_ticket``), and ends it exactly once: ``keep()`` when the answer was delivered,
``refund(reason)`` when it was not. Both are idempotent, and whichever comes first wins:
a refunded ticket is never kept, a kept one never refunded by the same request. So a
request that passes several guards (a middleware rule and a decorator) has one ticket,
opened by the outer guard and ended by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ._clock import utcnow
from ._idempotency import ResponseRecorder
from ._jobs import check_job, check_ttl
from ._storage.base import ChargeRequest
from ._units import cost_of, units_value
from .models import RefundResult, Reservation
from .problems import Headers

if TYPE_CHECKING:
    from ._ledger import Ledger

#: Where a ticket lives in the ASGI scope's state, for ``current_ticket(request)``.
TICKET_SCOPE_KEY = "credit_guard.ticket"


@dataclass(slots=True, eq=False)
class Ticket:
    """One request's charge, from the charge to its end. Lives for one request only."""

    feature_key: str
    organization_id: str
    credits: int
    remaining: int | None
    charge_id: int | None
    #: None for a request served free (``fail_open``, ``allow_unpriced``): nothing to end.
    ledger: Ledger | None = field(default=None, repr=False)
    #: Price of one unit; ``credits`` is ``unit_price * units`` rounded up.
    unit_price: int = 0
    units: Decimal = Decimal(1)
    #: What the handler reported it really used (``report_usage``); None keeps the reserve.
    used_units: Decimal | None = None
    #: How far above the reserve, as a share of it, reported usage may still be charged.
    max_overage: float = 0.0
    idempotency_key: str | None = None
    #: Records the response for replay (idempotent requests only).
    recorder: ResponseRecorder | None = None
    user_id: str | None = None
    #: Keep the charge when the app answers 4xx (by default a client error is refunded).
    charge_client_errors: bool = False
    #: How it ended: None while open; the refund when refunded.
    refunded: RefundResult | None = None
    ended: bool = False
    #: Credits taken (+) or given back (-) when usage was settled.
    adjustment: int = 0
    #: The async job this charge now pays for (``reserve_for``): the reservation owns it.
    job_id: str | None = None
    #: What a client that hangs up before the last byte pays: "refund" (nothing) or
    #: "charge_usage" (what ``report_usage`` last said was produced).
    on_disconnect: str = "refund"
    #: The credit pool the feature draws from (None: general); ``remaining`` is its lane's.
    pool: str | None = None

    def fails(self, status: int) -> bool:
        """Whether an answer with this status is refunded: a 5xx always; a 4xx unless the
        route charges client errors (users pay for results, not for being told no)."""
        return status >= 500 or (status >= 400 and not self.charge_client_errors)

    def report_usage(self, units: int | float | Decimal | str) -> None:
        """Say what the request really used (seconds of video rendered, images made,
        tokens streamed so far...): the total, not an increment; call it as often as the
        work goes on (a stream: after each chunk), the last call counts.

        When the ticket is kept, unused credits of the reserve go back, and use beyond it is
        charged up to ``max_overage`` of the reserve (and what the balance holds), exactly
        once. Under ``on_disconnect="charge_usage"`` a client that hangs up mid-stream pays
        for the last total reported. Raises ValueError for anything but a number from 0 to
        MAX_UNITS.
        """
        self.used_units = units_value(units, allow_zero=True)

    async def hung_up(self, reason: str = "client disconnected") -> None:
        """The client left before the whole answer reached it. By default (and when no
        usage was reported) the charge is refunded; under ``on_disconnect="charge_usage"``
        what was reported produced is paid, the rest of the reserve given back. A replay of
        such a request (its Idempotency-Key) answers its status and headers, not the cut
        body, and is not charged again."""
        if self.on_disconnect != "charge_usage" or not self.used_units:
            await self.refund(reason)
            return
        if self.recorder is not None:
            self.recorder.overflow = True  # the body the client got is not the answer: keep none
        await self.keep()

    async def reserve_for(self, job_id: str, *, ttl: float) -> Reservation:
        """Hand this request's charge to the async job it started: the credits stay held
        under ``job_id`` for up to ``ttl`` seconds, whatever happens to this process, until
        the job's completion calls ``guard.capture(job_id, units=...)`` (or ``release``).
        Answer 202 after it. If this request still fails (an exception, a 5xx), the
        reservation is released: the job is taken not to have started. LookupError when
        the charge is gone; ValueError for a bad ``job_id``/``ttl`` or one already reserved."""
        if self.ledger is None or self.charge_id is None:
            raise LookupError("this request was served free: there is no charge to reserve")
        if self.ended or self.job_id is not None:
            raise LookupError("this request's charge was already settled or reserved")
        check_job(job_id)
        check_ttl(ttl)
        request = ChargeRequest(
            self.organization_id, self.credits, self.feature_key, hold_until=utcnow() + timedelta(seconds=ttl)
        )
        reservation = await self.ledger.hand_to_job(
            job_id,
            request,
            self.charge_id,
            unit_price=self.unit_price,
            max_overage_credits=math.floor(self.credits * self.max_overage),
        )
        self.job_id = job_id
        return reservation

    def headers(self) -> list[tuple[str, str]]:
        """The credit headers the response carries, reflecting a refund if one happened."""
        if self.refunded is not None and self.refunded.refunded:
            out = [
                (Headers.REFUNDED, str(self.refunded.credits_refunded)),
                (Headers.REMAINING, str(self.refunded.remaining_credits)),
            ]
        else:
            out = [(Headers.CHARGED, str(self.credits))]
            if self.remaining is not None:
                out.append((Headers.REMAINING, str(self.remaining)))
        if self.pool is not None:
            out.append((Headers.POOL, self.pool))
        return out

    def _end(self) -> Ledger | None:
        """Mark the ticket ended; the ledger to end it with, None when there is nothing to
        do (ended already, or a free ticket)."""
        if self.ended:
            return None
        self.ended = True
        return self.ledger

    async def refund(self, reason: str) -> None:
        """The request failed: give the charge back, exactly once (the database's UNIQUE
        ``refund_of`` makes a retry after a lost answer harmless). A refund that still
        fails after its retries is logged; the hold it still is goes back through the
        sweeper, so the credits come back either way."""
        ledger = self._end()
        if ledger is None:
            return
        if self.job_id is not None:
            await ledger.close_job(self.job_id, used=None, capture=False)
            return
        if self.charge_id is not None:
            about = f"{self.credits} credits, org {self.organization_id}"
            self.refunded = await ledger.refund_retrying(self.charge_id, reason=reason, about=about)
        elif self.idempotency_key is not None:
            # A free request failed: its key must not replay the failure.
            await ledger.release_key(self.organization_id, self.idempotency_key)

    async def keep(self, status: int | None = None) -> None:
        """The answer was delivered: the charge stands. The hold is queued for the batched
        settlement (no round trip here), with the recorded response when the request
        carried an idempotency key. If the handler reported its usage, the difference is
        settled now, exactly once."""
        ledger = self._end()
        if ledger is None:
            return
        completion = None
        if self.idempotency_key is not None:
            recorder = self.recorder
            if recorder is None or recorder.status is None:
                # The adapter never saw the bytes on the wire (a handler returning a plain
                # value, serialised later by its framework): replay status only.
                recorder = ResponseRecorder(0, status=status or 200, overflow=True)
            completion = ledger.completion(self.organization_id, self.idempotency_key, recorder.stored())
        charge_id = self.charge_id
        if self.job_id is not None:  # the reservation owns the charge now; its capture settles it
            ledger.keep_later(None, completion)
            return
        if charge_id is not None and self.used_units is not None:
            used = cost_of(self.unit_price, self.used_units)
            if used != self.credits:
                moved = await ledger.settle_usage(
                    charge_id,
                    charged=self.credits,
                    used=used,
                    overage_share=self.max_overage,
                    reason=f"used {self.used_units} of {self.units} units",
                    user_id=self.user_id,
                )
                if moved is not None:
                    self.adjustment = moved.overage - moved.refunded
                    ledger.holds.forget(charge_id)
                    charge_id = None  # closed by the usage settlement: nothing left to batch
        ledger.keep_later(charge_id, completion)


def current_ticket(request: Any) -> Ticket | None:
    """The charge of the request being handled (to ``report_usage``), or None.

    Accepts the framework's request object or the ASGI scope itself.
    """
    scope = request if type(request) is dict or isinstance(request, Mapping) else getattr(request, "scope", {})
    state = scope.get("state")
    ticket = state.get(TICKET_SCOPE_KEY) if type(state) is dict or isinstance(state, Mapping) else None
    return ticket if isinstance(ticket, Ticket) else None
