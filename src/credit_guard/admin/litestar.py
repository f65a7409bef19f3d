"""The admin app on Litestar: ``Litestar([..., *admin_handlers()])``.

Why not one ``@asgi("/", is_mount=True)`` handler: a Litestar mount at ``/`` matches
every path that is not a plain static route (shadowing ``/items/{id}`` and every other
mount), and ASGI handlers with path parameters fail to route. So the admin app is
mounted once per top-level prefix it serves (``/api/admin``, ``/api/features``,
``/admin``, and the OpenAPI path).

Litestar hands a mounted app only the rest of the path (``/feature-pricing/``, with a
slash appended). The handler puts the scope back the way Starlette expects it (``path``
the full path, ``root_path`` whatever came before the admin routes), so redirects,
``Location`` headers and the page's links stay right even under a router prefix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from litestar.handlers import ASGIRouteHandler, asgi
from litestar.types import Receive, Scope, Send

from .api import AdminApp, admin_app


def admin_handlers(app: AdminApp | None = None, **admin_kwargs: Any) -> list[ASGIRouteHandler]:
    """Litestar route handlers serving ``app`` (or ``admin_app(**admin_kwargs)``).

    The guard is the Litestar app's ``app.state.credit_guard`` unless ``guard=`` is given.
    """
    admin = app if app is not None else admin_app(**admin_kwargs)
    return [_mount(admin, prefix) for prefix in admin.prefixes]


def _mount(admin: AdminApp, prefix: str) -> ASGIRouteHandler:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        restore_mounted_path(scope, prefix)  # type: ignore[arg-type]
        await admin(scope, receive, send)  # type: ignore[arg-type]

    name = "credit_guard_admin" + prefix.replace("/", "_").replace(".", "_").replace("-", "_")
    return asgi(prefix, is_mount=True, copy_scope=True, name=name)(handler)


def restore_mounted_path(scope: dict[str, Any], prefix: str) -> None:
    """Turn Litestar's mount scope (``path`` = the remainder) into Starlette's (``path`` =
    the full path, ``root_path`` = the part before ``prefix``)."""
    remainder = str(scope["path"]).rstrip("/")
    route_path = prefix + remainder
    raw = scope.get("raw_path")
    if isinstance(raw, bytes | bytearray):
        original = unquote(bytes(raw).split(b"?", 1)[0].decode("latin-1")).rstrip("/")
    else:
        original = str(scope.get("root_path", "")) + route_path
    base = original[: -len(route_path)] if original.endswith(route_path) else str(scope.get("root_path", ""))
    scope["root_path"] = base
    scope["path"] = base + route_path


__all__ = ["admin_handlers", "restore_mounted_path"]
