"""django-allauth behaviour for a B2B portal: accounts come from invitations, not sign-up."""

from __future__ import annotations

from allauth.account.adapter import DefaultAccountAdapter
from django.http import HttpRequest


class AccountAdapter(DefaultAccountAdapter):
    def is_open_for_signup(self, request: HttpRequest) -> bool:
        """Self-service sign-up is closed: people join a tenant through an invitation link,
        and tenants are provisioned by staff."""
        return False
