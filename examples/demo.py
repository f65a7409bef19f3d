"""Demo data shared by the example apps: prices, API keys and the funded demo organization.

DEMO ONLY: the API keys below are public. A real app resolves the organization from its
own authentication (a session, a JWT, an API-key table) and puts it on request state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from credit_guard import CreditGuard, DuplicateFeature

log = logging.getLogger("credit_guard.demo")

API_KEY_HEADER = "x-api-key"
#: demo key -> (organization, user). Public on purpose; never do this in production.
API_KEYS = {
    "demo-key-rich": ("org_demo", "user_alice"),
    "demo-key-poor": ("org_poor", "user_bob"),
    "demo-key-admin": ("org_demo", "user_admin"),  # DEMO: may use the pricing admin API and page
    "demo-key-pro": ("org_pro", "user_carol"),  # on the Pro plan: 1,000 credits a month
    "demo-key-studio": ("org_studio", "user_dan"),  # bought video credits: a credit pool
}
#: DEMO ONLY: keys whose user is an administrator (``request.state.user["is_admin"]``).
ADMIN_API_KEYS = frozenset({"demo-key-admin"})
DEMO_GRANTS = {"org_demo": 100, "org_poor": 3, "org_studio": 10}
#: Credits of a credit pool: only the features priced in that pool spend them.
DEMO_POOL_GRANTS = {"org_studio": ("video", 50)}
#: Organizations on the demo's Pro plan (1,000 credits a month, up to 500 carried over).
DEMO_SUBSCRIBERS = ("org_pro",)

PRICING = [
    ("seedream_text_to_image", "SeeDream Text to Image", "Image Generation", 5, "One 1024x1024 image."),
    ("kling_image_to_video", "Kling Image to Video", "Video Generation", 20, "Five seconds of video from an image."),
    ("ai_voice_generation", "AI Voice Generation", "AI Voice", 2, "Up to 500 characters of speech."),
    ("llm_chat_token", "Chat Tokens", "Text Generation", 1, "One streamed token of a chat answer."),
]
#: Features of a credit pool: (key, name, category, credits, description, pool, falls back to general).
POOLED_PRICING = [
    ("veo_video_clip", "Veo Video Clip", "Video Generation", 25, "Eight seconds of video.", "video", False),
]


async def seed(guard: CreditGuard) -> None:
    """Create the tables and the demo prices, and fund the demo orgs once.

    Every worker of ``uvicorn --workers 4`` runs this at startup, all at once: the schema
    creation is safe to race, a price another worker created first is simply there, and
    each grant carries an idempotency key, so it happens once whoever gets there first (a
    check-then-grant would fund an org two or three times).
    """
    await guard.create_schema()
    for key, name, category, credits, description in PRICING:
        try:
            await guard.create_pricing(
                feature_key=key, feature_name=name, category=category, credits=credits, description=description
            )
        except DuplicateFeature:
            pass
    for key, name, category, credits, description, pool, fallback in POOLED_PRICING:
        try:
            await guard.create_pricing(
                feature_key=key,
                feature_name=name,
                category=category,
                credits=credits,
                description=description,
                pool=pool,
                pool_fallback=fallback,
            )
        except DuplicateFeature:
            pass
    for org, amount in DEMO_GRANTS.items():
        await guard.grant_credits(org, amount, reason="demo funding", idempotency_key=f"demo-funding-{org}")
    for org, (pool, amount) in DEMO_POOL_GRANTS.items():
        key = f"demo-funding-{org}-{pool}"
        await guard.grant_credits(org, amount, reason=f"demo {pool} credits", idempotency_key=key, pool=pool)
    # The plan is made once (an operator's later edit on the admin page stands); subscribing
    # again to the same plan changes nothing, so every worker may run this at once.
    if await guard.get_plan("pro") is None:
        await guard.define_plan("pro", credits=1000, period="month", rollover=500, name="Pro")
    for org in DEMO_SUBSCRIBERS:
        await guard.subscribe(org, "pro")


#: DEMO: browsers cannot send X-API-Key when opening a page, so /demo/admin puts the admin
#: key in this cookie and the demo auth reads it too.
DEMO_COOKIE = "credit_guard_demo_key"


def api_key_from(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The demo key of a request: the X-API-Key header, else the demo cookie."""
    cookie_header = b""
    for name, value in headers:
        if name == API_KEY_HEADER.encode():
            return value
        if name == b"cookie":
            cookie_header = value
    for part in cookie_header.split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == DEMO_COOKIE.encode() and value:
            return value
    return None


def resolve_api_key(raw: bytes | None) -> tuple[str, str] | None:
    return API_KEYS.get(raw.decode("latin-1")) if raw else None


def demo_user(raw: bytes | None) -> dict[str, object] | None:
    """DEMO: the user object the admin app's default ``is_admin`` check reads from request state."""
    found = resolve_api_key(raw)
    if found is None or raw is None:
        return None
    return {"id": found[1], "is_admin": raw.decode("latin-1") in ADMIN_API_KEYS}
