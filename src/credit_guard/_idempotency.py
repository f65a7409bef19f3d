"""Idempotency keys on paid requests (the IETF httpapi ``Idempotency-Key`` draft).

A client that lost a response retries with the same ``Idempotency-Key``; it must not pay
twice. The key is claimed in the same transaction as the charge (``Store.claim_and_charge``),
the response is recorded here as it goes out, and a retry gets that response back with
``Idempotent-Replayed: true``. What a retry meets instead:

* the first request still running: 409 with ``Retry-After``;
* the same key on a different request (method, path, query or body): 422;
* the first request failed and was refunded: nothing, the key was freed with the refund.

Keys are scoped to the organization that pays and expire after ``idempotency_ttl``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send
from .problems import Headers

IDEMPOTENCY_HEADER = Headers.IDEMPOTENCY_KEY
KEY_MAX = 255
_HEADER_BYTES = IDEMPOTENCY_HEADER.lower().encode()
# Hop-by-hop or per-delivery headers that must not be replayed as they were.
# Set-Cookie is never replayed: a session cookie must not reach whoever repeats the key.
_NOT_REPLAYED = {b"content-length", b"transfer-encoding", b"connection", b"date", b"server", b"set-cookie"}


def key_from_headers(raw_headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in raw_headers:
        if name == _HEADER_BYTES:
            return value
    return None


def validate_key(raw: bytes) -> str | None:
    """The key as text, or None when it is not 1-255 visible ASCII characters.

    The draft's header is a structured-field string (``"abc"``); a bare token is accepted
    too, since clients commonly send one. Quotes, when present, are not part of the key.
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    # Visible ASCII: printable ASCII (32-126) less the space (``strip`` kept inner ones).
    if not 0 < len(text) <= KEY_MAX or not text.isprintable() or " " in text:
        return None
    return text


def request_fingerprint(method: str, path: str, query: bytes, body: bytes, user_id: str | None = None) -> str:
    """Binds a key to one request, and to the user who sent it: another user of the same
    organization repeating the key gets 422, never the first user's response."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode("utf-8", "surrogateescape"), query, (user_id or "").encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()


def call_fingerprint(feature_key: str, units: object) -> str:
    """The Python API's fingerprint: the same key must mean the same feature and units."""
    return hashlib.sha256(f"deduct\0{feature_key}\0{units}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored response to send again instead of running (and charging) the handler."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def from_stored(cls, row: Mapping[str, Any]) -> Replay:
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in json.loads(row["response_headers"] or "[]")
        ]
        body = bytes(row["response_body"] or b"")
        if not row["body_stored"]:
            headers.append((Headers.BODY_OMITTED.lower().encode(), b"true"))
        headers.append((Headers.REPLAYED.lower().encode(), b"true"))
        headers.append((b"content-length", str(len(body)).encode()))
        return cls(status=int(row["status_code"]), headers=headers, body=body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A replay is its own ASGI response: sent byte for byte as it was stored."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


@dataclass(slots=True)
class ResponseRecorder:
    """Keeps what a paid response put on the wire, up to ``max_body`` bytes of body."""

    max_body: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False

    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = [(name.lower(), value) for name, value in headers if name.lower() not in _NOT_REPLAYED]

    def body(self, chunk: bytes) -> None:
        if self.overflow or not chunk:
            return
        self.size += len(chunk)
        if self.size > self.max_body:
            self.overflow, self.chunks = True, []
        else:
            self.chunks.append(chunk)

    def stored(self) -> dict[str, Any]:
        """The columns ``settle_holds`` writes to finish the key."""
        return {
            "status_code": self.status or 200,
            "response_headers": json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers]),
            "response_body": None if self.overflow else b"".join(self.chunks),
            "body_stored": not self.overflow,
        }
