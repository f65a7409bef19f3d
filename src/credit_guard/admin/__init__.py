"""Pricing, plans and organizations (credits, plan, auto top-up) over HTTP: the admin JSON
API, the public pricing endpoint, the OpenAPI document and (when installed) the HTML pages,
as one mountable app.

    app.mount("/", admin_app())                 # FastAPI / Starlette
    Mount("/{tenant}", admin_app())             # under a tenant prefix
"""

from .api import (
    GUARD_SCOPE_KEY,
    OPENAPI_PATH,
    PLANS_PATH,
    PRICING_PATH,
    PUBLIC_PRICING_PATH,
    USAGE_PATH,
    AdminApp,
    IsAdmin,
    admin_app,
    default_is_admin,
    get_guard,
)
from .openapi import openapi_document

__all__ = [
    "GUARD_SCOPE_KEY",
    "OPENAPI_PATH",
    "PLANS_PATH",
    "PRICING_PATH",
    "PUBLIC_PRICING_PATH",
    "USAGE_PATH",
    "AdminApp",
    "IsAdmin",
    "admin_app",
    "default_is_admin",
    "get_guard",
    "openapi_document",
]
