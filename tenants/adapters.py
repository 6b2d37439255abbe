"""django-allauth behaviour for a B2B portal: accounts come from invitations, not sign-up."""

from __future__ import annotations

from typing import Any

from allauth.account.adapter import DefaultAccountAdapter
from django import forms
from django.http import HttpRequest


class AccountAdapter(DefaultAccountAdapter):
    def is_open_for_signup(self, request: HttpRequest) -> bool:
        """Self-service sign-up is closed: people join a tenant through an invitation link,
        and tenants are provisioned by staff."""
        return False

    def authenticate(self, request: HttpRequest, **credentials: Any) -> Any:
        """allauth's password check, then the tenant's ``enforce_sso``: on the host of a tenant
        that enforces single sign-on, a member other than an owner is refused (a form error
        naming the IdP, audited as ``sso.password_login_refused``). Checked only after the
        password matched, so the refusal tells nothing to someone without it."""
        from tenants.services.sso import password_login_allowed, sso_config_active, sso_password_login_refused

        user = super().authenticate(request, **credentials)
        tenant = getattr(request, "tenant", None)
        if user is not None and tenant is not None and not password_login_allowed(tenant=tenant, user=user):
            config = sso_config_active(tenant=tenant)
            sso_password_login_refused(tenant=tenant, user=user)
            name = config.display_name if config is not None else "your identity provider"
            raise forms.ValidationError(
                f"This workspace signs its members in through {name}: use “Sign in with {name}”.",
                code="sso_required",
            )
        return user
