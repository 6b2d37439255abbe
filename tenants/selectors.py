"""Reads on the control plane, always scoped to one tenant and checked against the principal."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from config.errors import NotFound
from tenants.models import ApiKey, Invitation, Membership, Tenant
from tenants.principal import Principal


def member_list(*, principal: Principal, tenant: Tenant) -> QuerySet[Membership]:
    """Members of ``tenant`` with their user and a ``has_2fa`` flag, ordered by e-mail.
    Raises ``Forbidden`` without ``members:read``."""
    principal.require("members:read")
    return (
        Membership.objects.filter(tenant=tenant)
        .select_related("user")
        .annotate(has_2fa=Exists(TOTPDevice.objects.filter(user=OuterRef("user"), confirmed=True)))
        .order_by("user__email")
    )


def member_get(*, principal: Principal, tenant: Tenant, membership_id: int) -> Membership:
    """One member of ``tenant``; ``NotFound`` for ids of other tenants or unknown ids."""
    membership = member_list(principal=principal, tenant=tenant).filter(pk=membership_id).first()
    if membership is None:
        raise NotFound("No such member.")
    return membership


def invitation_list(*, principal: Principal, tenant: Tenant, open_only: bool = True) -> QuerySet[Invitation]:
    """Invitations of ``tenant``, newest first; only open (pending, unexpired) ones by default."""
    principal.require("members:read")
    invitations = Invitation.objects.filter(tenant=tenant).select_related("invited_by")
    if open_only:
        invitations = invitations.filter(
            accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )
    return invitations.order_by("-created_at", "-id")


def invitation_get(*, principal: Principal, tenant: Tenant, invitation_id: int) -> Invitation:
    invitation = invitation_list(principal=principal, tenant=tenant, open_only=False).filter(pk=invitation_id).first()
    if invitation is None:
        raise NotFound("No such invitation.")
    return invitation


def api_key_list(*, principal: Principal, tenant: Tenant, include_revoked: bool = True) -> QuerySet[ApiKey]:
    """API keys of ``tenant`` with their creator and person, newest first. Raises ``Forbidden``
    without ``keys:read``."""
    principal.require("keys:read")
    keys = ApiKey.objects.filter(tenant=tenant).select_related("created_by", "acting_user", "tenant")
    if not include_revoked:
        keys = keys.filter(revoked_at__isnull=True)
    return keys.order_by("-id")


def api_key_get(*, principal: Principal, tenant: Tenant, key_id: str) -> ApiKey:
    """One key of ``tenant`` by its public id (or numeric pk); ``NotFound`` otherwise."""
    keys = api_key_list(principal=principal, tenant=tenant)
    key = keys.filter(pk=int(key_id)).first() if key_id.isdigit() else keys.filter(key_id=key_id).first()
    if key is None:
        raise NotFound("No such API key.")
    return key
