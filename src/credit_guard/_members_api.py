"""The Python API for budgets inside an organization: a member's cap.

A mixin of ``CreditGuard`` (kept apart so the facade stays small). A member is whatever
the request's ``user_id`` is (the ``user_resolver``'s answer: a user id, an API key id).
The cap is enforced by the charge itself, in the same statement as the organization's
debit (``_storage/members.py``); these methods only set, read and remove it.
"""

from __future__ import annotations

from ._clock import utcnow
from ._ledger import USER_ID_MAX, check_org
from ._storage.base import Store
from ._storage.members import PERIODS
from .models import MemberLimit, is_storable_text
from .schema import MAX_BALANCE


def check_member(member: object) -> str:
    if not isinstance(member, str) or not member or len(member) > USER_ID_MAX or not is_storable_text(member):
        raise ValueError(
            f"member must be a non-empty string of at most {USER_ID_MAX} characters (a user or API key id),"
            f" without NUL characters or unpaired surrogates, got {member!r:.80}"
        )
    return member


class MembersApi:
    store: Store

    async def set_member_limit(
        self, organization_id: str, member: str, credits: int, *, per: str | None = None
    ) -> MemberLimit:
        """Let ``member`` spend at most ``credits`` of the organization's credits per
        ``per`` ("day" or "month": UTC calendar periods; None: in all). A charge over what
        is left is refused (402, ``"limit": "member"``) in the same statement as the
        organization's debit; a refund gives the member its credits back. Changing
        ``credits`` keeps what was spent this period; changing ``per`` starts counting
        again. 0 blocks the member's paid calls."""
        check_org(organization_id)
        check_member(member)
        if not isinstance(credits, int) or isinstance(credits, bool) or not 0 <= credits <= MAX_BALANCE:
            raise ValueError(f"credits must be a whole number from 0 to {MAX_BALANCE}, got {credits!r:.40}")
        if per is not None and per not in PERIODS:
            raise ValueError(f"per must be one of {', '.join(PERIODS)} or None, got {per!r:.40}")
        return await self.store.set_member_limit(organization_id, member, credits, per, utcnow())

    async def get_member_usage(self, organization_id: str, member: str) -> MemberLimit | None:
        """The member's cap and what it spent of it this period (None: no cap)."""
        check_org(organization_id)
        check_member(member)
        found = await self.store.member_limits(organization_id, utcnow(), member)
        return found[0] if found else None

    async def list_member_limits(self, organization_id: str) -> list[MemberLimit]:
        """Every member cap of the organization, by member."""
        check_org(organization_id)
        return await self.store.member_limits(organization_id, utcnow())

    async def remove_member_limit(self, organization_id: str, member: str) -> bool:
        """No cap for ``member`` any more (True if it had one)."""
        check_org(organization_id)
        check_member(member)
        return await self.store.remove_member_limit(organization_id, member, utcnow())
