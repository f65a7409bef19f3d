"""Registering the app's hooks (a mixin of ``CreditGuard``, kept apart so the facade
stays small); ``_hooks.py`` delivers the events off the request."""

from __future__ import annotations

from ._hooks import HookDispatcher
from ._ledger import Ledger
from .events import (
    ChargeEvent,
    Event,
    GrantExpiredEvent,
    H,
    InsufficientCreditsEvent,
    LowBalanceEvent,
    RefundEvent,
)


class HooksApi:
    hooks: HookDispatcher
    ledger: Ledger

    def on_charge(self, hook: H) -> H:
        """Register ``async def hook(event: ChargeEvent)``; usable as a decorator."""
        return self.hooks.add(ChargeEvent, hook)

    def on_refund(self, hook: H) -> H:
        """Register ``async def hook(event: RefundEvent)``."""
        return self.hooks.add(RefundEvent, hook)

    def on_insufficient_credits(self, hook: H) -> H:
        """Register ``async def hook(event: InsufficientCreditsEvent)`` (each 402)."""
        return self.hooks.add(InsufficientCreditsEvent, hook)

    def on_low_balance(self, hook: H) -> H:
        """Register ``async def hook(event: LowBalanceEvent)``; needs ``low_balance_threshold``."""
        if self.ledger.low_balance_threshold is None:
            raise ValueError("on_low_balance needs CreditGuard(low_balance_threshold=...)")
        return self.hooks.add(LowBalanceEvent, hook)

    def on_grant_expired(self, hook: H) -> H:
        """Register ``async def hook(event: GrantExpiredEvent)`` (unspent credits written off)."""
        return self.hooks.add(GrantExpiredEvent, hook)

    def emit(self, event: Event) -> None:
        self.hooks.emit(event)
