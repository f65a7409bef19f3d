"""A paid request's passage through an ASGI app: credit headers out, refund if not delivered.

The request flow (``_flow.py``) opens the charge; this is where its ticket meets the
response on the wire. ``run_paid`` runs an app with a ticket already open (the
middleware), or with none yet (``ticket=None``: the Litestar plugin, whose routes are
charged by their handler, after the app's guards, dependencies and validation): then the
ticket is looked up on the request when the response starts, and a request that was
answered before any charge (a 400, a 403 of the app's own) passes through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._ticket import TICKET_SCOPE_KEY, Ticket, current_ticket

#: Where a passage announces itself on the request: a handler-level charge under it leaves
#: the ending (delivery, refund) to it, which sees the bytes on the wire.
PASSAGE_SCOPE_KEY = "credit_guard.passage"


def put_on_request(scope: Scope, ticket: Ticket) -> None:
    """Where ``current_ticket`` (a passage, any guard further in) finds it."""
    state = scope.setdefault("state", {})
    if isinstance(state, dict):
        state[TICKET_SCOPE_KEY] = ticket


def in_passage(scope: Mapping[str, Any]) -> bool:
    """Whether a passage around this request will end its ticket at delivery."""
    state = scope.get("state")
    return isinstance(state, Mapping) and state.get(PASSAGE_SCOPE_KEY) is True


async def client_gone(receive: Receive) -> bool:
    """Whether the client has already hung up, asked without waiting (and without a task).

    ``receive()`` is started and, if it would have to wait (the client is still there),
    dropped at once: its awaitable is closed before it ever reaches the event loop, so
    nothing is left pending. A server that already knows of a disconnect answers
    ``http.disconnect`` without waiting (uvicorn keeps answering it). Call it only once the
    app has read its body: a body message it returned would be lost.
    """
    waiter = receive().__await__()
    try:
        waiter.send(None)
    except StopIteration as done:
        message = done.value
        return type(message) is dict and message.get("type") == "http.disconnect"
    except Exception:  # a receive that cannot be asked this way: assume the client is there
        return False
    waiter.close()
    return False


async def run_paid(ticket: Ticket | None, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` for a paid request: add the credit headers, refund if not delivered.

    Not delivered means: a status the ticket refunds (5xx, and 4xx unless the route
    charges client errors), refunded before its ``http.response.start`` goes out so the
    response itself says ``X-Credits-Refunded``; an exception before the last body chunk;
    or a client that is gone before it: servers drop ``send()`` after a disconnect
    silently (uvicorn does), so "send returned" is not "delivered", and the client is
    asked (``client_gone``, no round trip, no task) just before the last chunk. Once the
    last chunk is sent the request is paid for (its hold is settled): a background task
    failing afterwards refunds nothing.
    """
    if ticket is not None:
        put_on_request(scope, ticket)
    else:
        scope.setdefault("state", {})[PASSAGE_SCOPE_KEY] = True
    await Passage(ticket, scope, receive, send).run(app)


class Passage:
    """One paid request's passage through the app (per-request state, never on a middleware)."""

    __slots__ = ("_ticket", "delivered", "disconnected", "receive", "scope", "send", "started", "status")

    def __init__(self, ticket: Ticket | None, scope: Scope, receive: Receive, send: Send) -> None:
        self._ticket, self.scope, self.receive, self.send = ticket, scope, receive, send
        self.started = self.delivered = self.disconnected = False
        self.status = 0

    @property
    def ticket(self) -> Ticket | None:
        """The request's ticket: given, or opened by its handler (None: not charged)."""
        if self._ticket is None:
            self._ticket = current_ticket(self.scope)
        return self._ticket

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive_watching, self.send_with_credits)
        except BaseException as exc:
            ticket = self.ticket
            if ticket is not None and not self.delivered:
                # Before the start, the app's error handler will answer 500; after it, the
                # body broke mid-stream (or a server raised on a send to a client that left).
                # Shielded: a cancelled request must still get its refund.
                with anyio.CancelScope(shield=True):
                    if self.disconnected:
                        await ticket.hung_up()
                    else:
                        await ticket.refund(f"handler raised {type(exc).__name__}")
            elif ticket is not None and not ticket.fails(self.status):
                await ticket.keep(self.status)
            raise
        ticket = self.ticket
        if ticket is None:
            return
        if not self.delivered:
            # No answer at all, or a client that hung up before the last chunk.
            if self.disconnected:
                await ticket.hung_up()
            else:
                await ticket.refund("no response sent")
        elif not ticket.fails(self.status):
            await ticket.keep(self.status)

    async def send_with_credits(self, message: Message) -> None:
        kind = message["type"]
        ticket = self.ticket
        if ticket is None:  # answered before any charge (the app's own refusal): as it is
            await self.send(message)
            return
        recorder = ticket.recorder
        if kind == "http.response.start" and not self.started:
            self.started = True
            self.status = status = message["status"]
            if ticket.fails(status):
                await ticket.refund(f"handler answered {status}")
            headers = MutableHeaders(raw=list(message.get("headers", ())))
            for name, value in ticket.headers():
                headers[name] = value
            message = {**message, "headers": headers.raw}
            if recorder is not None:
                recorder.start(status, headers.raw)
        elif kind == "http.response.body":
            if recorder is not None:
                recorder.body(message.get("body", b""))
            if not message.get("more_body", False):
                await self._deliver(message)
                return
        elif kind == "http.response.pathsend":
            if recorder is not None:
                recorder.overflow = True  # the server sends the file itself: no bytes to keep
            await self._deliver(message)
            return
        await self.send(message)

    async def _deliver(self, message: Message) -> None:
        """The last message of the response: sent and counted as delivered, unless the
        client is already gone (then it is dropped, and the charge refunded after)."""
        if self.disconnected or await client_gone(self.receive):
            self.disconnected = True
            return
        await self.send(message)
        self.delivered = True

    async def receive_watching(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message
