"""Reading a request's whole body before the app does, within a limit.

Needed where something must be known of the body before the app reads it: an idempotent
request's fingerprint (decided before its charge), a webhook's signature. The body is
held in memory, so beyond ``limit`` bytes BodyTooLarge is raised; the app then gets the
same body again from the ``receive`` returned.
"""

from __future__ import annotations

from starlette.types import Message, Receive


class ClientDisconnected(Exception):
    """The client hung up while its request body was being read."""


class BodyTooLarge(Exception):
    """The body is larger than the limit it was read with."""


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """The whole request body, and a ``receive`` that hands it to the app again."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client left before sending its body: nothing to fingerprint or charge.
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, receive_again


__all__ = ["BodyTooLarge", "ClientDisconnected", "read_body"]
