"""Members and invitations of a tenant.

Rules: only holders of ``members:write`` (owners and admins) change membership; admins cannot
touch owners nor make anyone an owner; a tenant always keeps at least one owner. A member's API
keys follow their access: a new role clips them, removal revokes them
(``tenants.services.keys.api_keys_fit_to_role``). An invitation's secret link goes only to the
invitee's mailbox; the services return it for the console's signed-in member alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import structlog
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from compliance.services import audit_event_create
from config.errors import Conflict, Forbidden, NotFound, ValidationFailed
from tenants.models import Invitation, Membership, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role, roles_assignable_by
from tenants.services.keys import api_keys_fit_to_role
from tenants.services.limits import plan_limit_check

logger = structlog.get_logger(__name__)

INVITATION_TTL = dt.timedelta(days=7)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _acting_role(principal: Principal) -> str:
    """The role whose assignment rules apply: a member's role; an API key with
    ``members:write`` acts as an admin (keys can never grant or remove ownership)."""
    if principal.kind == "system":
        return Role.OWNER
    if principal.role:
        return principal.role
    return Role.ADMIN if principal.can("members:write") else Role.VIEWER


def _check_role(role: str) -> None:
    if role not in Role.values:
        raise ValidationFailed(f"Unknown role '{role}'. Roles: {', '.join(Role.values)}.", code="invalid_role")


def _owner_count(tenant: Tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).count()


@dataclass(frozen=True)
class IssuedInvitation:
    invitation: Invitation
    token: str

    def accept_url(self) -> str:
        """The absolute link the invitee opens, on the tenant's own host."""
        tenant = self.invitation.tenant
        path = reverse("invitation_accept", kwargs={"token": self.token}, urlconf=settings.ROOT_URLCONF)
        return f"{settings.ACCOUNT_DEFAULT_HTTP_PROTOCOL}://{tenant.primary_host}{_port_suffix()}{path}"


def _port_suffix() -> str:
    port = getattr(settings, "PUBLIC_PORT", "")
    return f":{port}" if port else ""


@transaction.atomic
def invitation_create(*, principal: Principal, tenant: Tenant, email: str, role: str) -> IssuedInvitation:
    """Invite ``email`` to ``tenant`` with ``role`` and e-mail the link; return it with its token.

    The token is for the e-mail and a signed-in member's console only: API answers never carry
    it, or a key could accept its own invitation and leave a login behind that outlives it.

    Re-inviting an address with an open invitation replaces that invitation (the old link stops
    working). Raises ``Forbidden`` without ``members:write`` or when the role is beyond the
    inviter's (only owners invite owners), ``ValidationFailed`` for a bad address or role,
    ``Conflict`` when the address already belongs to a member or (code ``plan_limit``) when the
    plan's ``max_members`` seats are taken by members and other open invitations.
    """
    principal.require("members:write")
    _check_role(role)
    if role not in roles_assignable_by(_acting_role(principal)):
        raise Forbidden(f"You cannot grant the '{role}' role.", code="role_not_assignable")
    email = User.objects.normalize_email((email or "").strip()).lower()
    if "@" not in email or len(email) > 254 or " " in email:
        raise ValidationFailed(f"'{email}' is not an e-mail address.", code="invalid_email")
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise Conflict(f"{email} is already a member.", code="already_member")
    # An open invitation holds a seat, so every invitation sent can be accepted.
    plan_limit_check(tenant=tenant, limit="max_members", used=lambda: Membership.objects.filter(
        tenant=tenant).count() + Invitation.objects.filter(
        tenant=tenant, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now(),
    ).exclude(email__iexact=email).count())

    now = timezone.now()
    Invitation.objects.filter(
        tenant=tenant, email__iexact=email, accepted_at__isnull=True, revoked_at__isnull=True
    ).update(revoked_at=now)
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        tenant=tenant, email=email, role=role, token_hash=_token_hash(token),
        invited_by=principal.person, expires_at=now + INVITATION_TTL,
    )
    issued = IssuedInvitation(invitation=invitation, token=token)
    audit_event_create(actor=principal, action="member.invited", target_type="invitation",
                       target_id=invitation.pk, payload={"email": email, "role": role},
                       schema=tenant.schema_name)
    link = issued.accept_url()
    transaction.on_commit(
        lambda: send_mail(
            subject=f"You are invited to {tenant.name}",
            message=(
                f"{principal.label} invited you to join {tenant.name} as {role}.\n\n"
                f"Accept the invitation: {link}\n\nThe link expires on {invitation.expires_at:%Y-%m-%d %H:%M} UTC."
            ),
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=[email],
            fail_silently=True,
        )
    )
    return issued


def invitation_get_open(*, tenant: Tenant, token: str) -> Invitation:
    """The open invitation of ``tenant`` with ``token``; ``NotFound`` if it is unknown, used,
    revoked, expired or for another tenant (all look the same to the caller)."""
    invitation = (
        Invitation.objects.select_related("tenant").filter(token_hash=_token_hash(token or ""), tenant=tenant).first()
    )
    if invitation is None or not invitation.is_open:
        raise NotFound("This invitation link is not valid: it may have expired, been used or been revoked.",
                       code="invitation_invalid")
    return invitation


@transaction.atomic
def invitation_accept(*, tenant: Tenant, token: str, user: User) -> Membership:
    """Make ``user`` a member through the invitation ``token``.

    The signed-in user's e-mail must be the invited address. Raises ``NotFound`` for an invalid
    link, ``Forbidden`` for a different address and ``Conflict`` (``plan_limit``) when the plan's
    members are all there.
    """
    invitation = invitation_get_open(tenant=tenant, token=token)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if user.email.lower() != invitation.email.lower():
        raise Forbidden(
            f"This invitation is for {invitation.email}; you are signed in as {user.email}.", code="wrong_account"
        )
    if not Membership.objects.filter(user=user, tenant=tenant).exists():
        # The plan may have been lowered since the invitation was sent.
        plan_limit_check(tenant=tenant, limit="max_members",
                         used=lambda: Membership.objects.filter(tenant=tenant).count())
    membership, created = Membership.objects.get_or_create(
        user=user, tenant=tenant, defaults={"role": invitation.role, "invited_by": invitation.invited_by}
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    if created:
        audit_event_create(actor=Principal.for_member(membership), action="member.joined",
                           target_type="membership", target_id=membership.pk,
                           payload={"email": user.email, "role": membership.role, "invitation": invitation.pk},
                           schema=tenant.schema_name)
    return membership


@transaction.atomic
def invitation_accept_new_user(*, tenant: Tenant, token: str, name: str, password: str) -> Membership:
    """Create the account of an invitee who has none, then accept the invitation.

    The invitation proves control of the address, so the address counts as verified.
    Raises ``Conflict`` if an account with that address exists (the invitee should sign in).
    """
    invitation = invitation_get_open(tenant=tenant, token=token)
    if User.objects.filter(email__iexact=invitation.email).exists():
        raise Conflict("An account with this address exists: sign in to accept.", code="account_exists")
    try:
        user = User.objects.create_user(email=invitation.email, password=password, name=name.strip()[:200])
    except IntegrityError as exc:
        raise Conflict("An account with this address exists: sign in to accept.", code="account_exists") from exc
    from allauth.account.models import EmailAddress

    EmailAddress.objects.create(user=user, email=user.email, primary=True, verified=True)
    return invitation_accept(tenant=tenant, token=token, user=user)


@transaction.atomic
def invitation_revoke(*, principal: Principal, invitation: Invitation) -> Invitation:
    """Revoke an open invitation so its link stops working. Idempotent."""
    principal.require("members:write")
    if invitation.role == Role.OWNER and _acting_role(principal) != Role.OWNER:
        raise Forbidden("Only owners can revoke an owner invitation.", code="role_not_assignable")
    if invitation.revoked_at or invitation.accepted_at:
        return invitation
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_event_create(actor=principal, action="invitation.revoked", target_type="invitation",
                       target_id=invitation.pk, payload={"email": invitation.email},
                       schema=invitation.tenant.schema_name)
    return invitation


@transaction.atomic
def membership_role_change(*, principal: Principal, membership: Membership, role: str) -> Membership:
    """Give ``membership`` a new role and narrow the member's API keys to it (revoking those
    left with no scope).

    Raises ``Forbidden`` without ``members:write``, when an admin touches an owner or grants
    ownership, and ``Conflict`` when it would leave the tenant without an owner.
    """
    principal.require("members:write")
    _check_role(role)
    # Only the membership row: FOR UPDATE of the joined tenant row would wait for every transaction
    # that inserts a row referencing the tenant (a SCIM create's foreign-key check) while holding the
    # tenant's audit-chain lock, and deadlock with it (docs/perf/2026-12-07-identity-endpoints-under-load.md).
    membership = Membership.objects.select_for_update(of=("self",)).select_related("user", "tenant").get(
        pk=membership.pk)
    acting = _acting_role(principal)
    assignable = roles_assignable_by(acting)
    if role not in assignable or membership.role not in assignable:
        raise Forbidden("Only owners can change an owner's role or make someone an owner.",
                        code="role_not_assignable")
    if membership.role == role:
        return membership
    if membership.role == Role.OWNER:
        # Lock the tenant's owner rows so two concurrent demotions cannot both pass the check.
        list(Membership.objects.select_for_update().filter(tenant=membership.tenant, role=Role.OWNER))
        if _owner_count(membership.tenant) <= 1:
            raise Conflict("A tenant must keep at least one owner.", code="last_owner")
    previous = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit_event_create(actor=principal, action="member.role_changed", target_type="membership",
                       target_id=membership.pk,
                       payload={"email": membership.user.email, "from": previous, "to": role},
                       schema=membership.tenant.schema_name)
    api_keys_fit_to_role(actor=principal, user=membership.user, tenant=membership.tenant, role=role,
                         reason="role_changed")
    return membership


@transaction.atomic
def membership_remove(*, principal: Principal, membership: Membership) -> None:
    """Remove a member from the tenant (their account stays; their API keys are revoked).

    Raises ``Forbidden`` without ``members:write`` or when an admin removes an owner, and
    ``Conflict`` when removing the last owner.
    """
    principal.require("members:write")
    # Only the membership row: FOR UPDATE of the joined tenant row would wait for every transaction
    # that inserts a row referencing the tenant (a SCIM create's foreign-key check) while holding the
    # tenant's audit-chain lock, and deadlock with it (docs/perf/2026-12-07-identity-endpoints-under-load.md).
    membership = Membership.objects.select_for_update(of=("self",)).select_related("user", "tenant").get(
        pk=membership.pk)
    if membership.role not in roles_assignable_by(_acting_role(principal)):
        raise Forbidden("Only owners can remove an owner.", code="role_not_assignable")
    if membership.role == Role.OWNER:
        list(Membership.objects.select_for_update().filter(tenant=membership.tenant, role=Role.OWNER))
        if _owner_count(membership.tenant) <= 1:
            raise Conflict("The last owner cannot be removed.", code="last_owner")
    tenant = membership.tenant
    user = membership.user
    membership_id = membership.pk
    membership.delete()
    # Every key acting for them (keys their keys minted included) dies, each with its own event.
    fitted = api_keys_fit_to_role(actor=principal, user=user, tenant=tenant, role=None, reason="member_removed")
    audit_event_create(actor=principal, action="member.removed", target_type="membership",
                       target_id=membership_id,
                       payload={"email": user.email, "role": membership.role, "api_keys_revoked": fitted.revoked},
                       schema=tenant.schema_name)
