"""A client for APIs behind credit_guard, on httpx (``pip install credit_guard[client]``).

    tracker = CreditTracker()
    client = tracker.install(httpx.Client(base_url="https://api.example", headers=auth))
    client.post("/v1/images", json=...)          # tracker.remaining == 95
    try:
        client.post("/v1/images", json=...)
    except InsufficientCredits as exc:           # exc.required, exc.available
        ...

What the hooks do, per response:

* read the credit headers into a :class:`CreditInfo` (``credits_of(response)`` gives it
  back later) and remember it as ``tracker.last`` / ``tracker.remaining``;
* raise a :class:`CreditProblem` subclass for the guard's own refusals (a problem+json
  body whose ``type`` is one of credit_guard's), before the caller sees the response.

Every other response is left alone, *including the app's own errors*: a handler that
answers 502 was refunded (``credits_of(r).refunded``), but the 502 itself is the app's
to report. It is returned as usual, so the caller handles it the way it handles any
httpx response (``response.raise_for_status()`` if it wants an exception). The
refusals are raised because they are the guard's answer, the handler never ran, and
each has something to act on (top up, sign in, retry after).

The exceptions subclass ``httpx.HTTPStatusError``, so code that already catches httpx's
status errors keeps working, and ``exc.response`` is there for anything else.

This module is not imported by ``credit_guard`` itself: the server side never needs httpx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

import httpx

from .problems import (
    HEADER_CHARGED,
    HEADER_REFUNDED,
    HEADER_REMAINING,
    HEADER_REQUIRED,
    PROBLEM_CONTENT_TYPE,
    TYPE_FEATURE_INACTIVE,
    TYPE_FEATURE_NOT_FOUND,
    TYPE_INSUFFICIENT,
    TYPE_INVALID_REQUEST,
    TYPE_NO_ORGANIZATION,
    TYPE_SCHEMA_MISSING,
    TYPE_UNAVAILABLE,
    Headers,
)


@dataclass(frozen=True, slots=True)
class CreditInfo:
    """The credit headers of one response; a field is None when its header was absent.

    ``remaining`` is the balance after this request: after the charge, after the refund
    (when ``refunded`` is set), or what was available when a 402 refused it.
    """

    remaining: int | None = None
    charged: int | None = None
    refunded: int | None = None
    required: int | None = None
    #: The credit pool the feature draws from (None: general, or not said); ``remaining``
    #: is then what that feature can still spend.
    pool: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> CreditInfo | None:
        """None when the response carries no credit header at all (an unguarded route)."""
        info = cls(
            remaining=_int_header(headers, HEADER_REMAINING),
            charged=_int_header(headers, HEADER_CHARGED),
            refunded=_int_header(headers, HEADER_REFUNDED),
            required=_int_header(headers, HEADER_REQUIRED),
            pool=headers.get(Headers.POOL),
        )
        return None if info == _EMPTY else info


_EMPTY = CreditInfo()


def credits_of(response: httpx.Response) -> CreditInfo | None:
    """The credit information of any httpx response (tracked or not)."""
    return CreditInfo.from_headers(response.headers)


# -- exceptions --------------------------------------------------------------------------


class CreditProblem(httpx.HTTPStatusError):
    """A problem+json refusal from credit_guard (RFC 9457): the handler did not run.

    ``body`` is the whole problem document; ``credits`` the response's credit headers.
    """

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        self.status: int = response.status_code
        self.type: str = str(body.get("type", ""))
        self.title: str = str(body.get("title", ""))
        self.detail: str = str(body.get("detail", ""))
        self.body: dict[str, Any] = dict(body)
        self.credits = credits_of(response)
        message = f"{self.status} {self.title}: {self.detail}" if self.detail else f"{self.status} {self.title}"
        super().__init__(message, request=response.request, response=response)


class InsufficientCredits(CreditProblem):
    """402: the organization cannot afford the feature; nothing was charged."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        super().__init__(response, body)
        self.feature: str | None = _str_or_none(body.get("feature"))
        self.required: int | None = _int_or_none(body.get("required"))
        self.available: int | None = _int_or_none(body.get("available"))
        #: The credit pool the feature draws from (None: general).
        self.pool: str | None = _str_or_none(body.get("pool"))


class NoOrganization(CreditProblem):
    """401: the request is not signed in to an organization that could pay."""


class FeatureUnavailable(CreditProblem):
    """The feature has no active price: 403 (disabled), 404 (unknown to ``/check``) or
    500 (a guarded route whose key is not priced, a server misconfiguration)."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        super().__init__(response, body)
        self.feature: str | None = _str_or_none(body.get("feature"))


class CreditsUnavailable(CreditProblem):
    """503: the credit ledger is down; nothing was charged or changed. ``retry_after`` is in seconds."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        super().__init__(response, body)
        self.retry_after: int | None = _int_or_none(response.headers.get("Retry-After"))


class InvalidCreditRequest(CreditProblem):
    """400 (or 415/422): credit_guard's own endpoints rejected the request; ``errors`` maps each
    bad parameter or field to why."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        super().__init__(response, body)
        errors = body.get("errors")
        self.errors: dict[str, str] = {str(k): str(v) for k, v in errors.items()} if isinstance(errors, Mapping) else {}


_PROBLEMS: dict[str, type[CreditProblem]] = {
    TYPE_INSUFFICIENT: InsufficientCredits,
    TYPE_NO_ORGANIZATION: NoOrganization,
    TYPE_FEATURE_NOT_FOUND: FeatureUnavailable,
    TYPE_FEATURE_INACTIVE: FeatureUnavailable,
    TYPE_UNAVAILABLE: CreditsUnavailable,
    TYPE_SCHEMA_MISSING: CreditsUnavailable,  # the server is not ready: the same for its clients
    TYPE_INVALID_REQUEST: InvalidCreditRequest,
}


def problem_of(response: httpx.Response) -> CreditProblem | None:
    """The exception for a credit_guard refusal, or None for any other response.

    The body must have been read. Only problem+json with one of credit_guard's ``type``
    URIs counts: the app's own problem documents are the app's business.
    """
    if response.status_code < 400 or not _is_problem(response):
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    cls = _PROBLEMS.get(str(body.get("type")))
    return cls(response, body) if cls is not None else None


# -- the tracker -------------------------------------------------------------------------


class CreditTracker:
    """Follows the credit headers across the responses of one or more httpx clients.

    ``last`` is the most recent response's :class:`CreditInfo` (responses without credit
    headers do not change it); ``remaining`` the most recent balance seen. With
    concurrent requests "most recent" means the last to arrive, which may be a moment
    stale: the server's ledger is the truth, this is for display.

    ``raise_problems=False`` keeps the tracking but returns the refusals as plain
    responses (use :func:`problem_of` on them yourself).
    """

    def __init__(self, *, raise_problems: bool = True) -> None:
        self.raise_problems = raise_problems
        self.last: CreditInfo | None = None
        self.remaining: int | None = None

    def observe(self, response: httpx.Response) -> CreditInfo | None:
        """Record one response's credit headers (the hooks call this for you)."""
        info = credits_of(response)
        if info is not None:
            self.last = info
            if info.remaining is not None:
                self.remaining = info.remaining
        return info

    @overload
    def install(self, client: httpx.Client) -> httpx.Client: ...
    @overload
    def install(self, client: httpx.AsyncClient) -> httpx.AsyncClient: ...

    def install(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Client | httpx.AsyncClient:
        """Add this tracker's response hook to ``client`` (once) and return the client."""
        hook = self._async_hook if isinstance(client, httpx.AsyncClient) else self._sync_hook
        hooks = client.event_hooks
        responses = list(hooks.get("response", []))
        if hook not in responses:
            responses.append(hook)
        client.event_hooks = {**hooks, "response": responses}
        return client

    def client(self, **kwargs: Any) -> httpx.Client:
        """``httpx.Client(**kwargs)`` with this tracker installed."""
        return self.install(httpx.Client(**kwargs))

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """``httpx.AsyncClient(**kwargs)`` with this tracker installed."""
        return self.install(httpx.AsyncClient(**kwargs))

    def _sync_hook(self, response: httpx.Response) -> None:
        self.observe(response)
        if self.raise_problems and response.status_code >= 400 and _is_problem(response):
            response.read()  # only problem bodies are read: a streamed download stays streamed
            problem = problem_of(response)
            if problem is not None:
                raise problem

    async def _async_hook(self, response: httpx.Response) -> None:
        self.observe(response)
        if self.raise_problems and response.status_code >= 400 and _is_problem(response):
            await response.aread()
            problem = problem_of(response)
            if problem is not None:
                raise problem


def _is_problem(response: httpx.Response) -> bool:
    content_type = str(response.headers.get("content-type", ""))
    return content_type.split(";")[0].strip().lower() == PROBLEM_CONTENT_TYPE


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    return _int_or_none(headers.get(name))


def _int_or_none(value: object) -> int | None:
    """A header or body number; anything malformed is None, never an error in a hook."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


__all__ = [
    "CreditInfo",
    "CreditProblem",
    "CreditTracker",
    "CreditsUnavailable",
    "FeatureUnavailable",
    "InsufficientCredits",
    "InvalidCreditRequest",
    "NoOrganization",
    "credits_of",
    "problem_of",
]
