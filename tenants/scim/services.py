"""SCIM writes: provision, update and deprovision members; set the members of a role's group.

Every change goes through the member services (``tenants.services.members``), so SCIM obeys the
same rules as the console: a SCIM token is an API key, and a key acts as an admin, never as an
owner, so SCIM neither grants ownership nor changes or removes an owner; the tenant keeps its
owners. Deprovisioning (``active: false`` or ``DELETE``) removes the membership, revokes every
API key acting for the person in this tenant and ends their browser sessions on this tenant's
host, each step audited in the tenant's chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

import structlog
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import IntegrityError, transaction
from django.utils import timezone

from compliance.services import audit_event_create
from tenants.models import Membership, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role
from tenants.scim.errors import ScimError
from tenants.services.limits import plan_limit_check
from tenants.services.members import membership_remove, membership_role_change
from tenants.signals import SESSION_TENANT_KEY

logger = structlog.get_logger(__name__)

# The role of a member the IdP creates (before any group gives them one), and of a member the IdP
# takes out of their role's group: the least a member can hold.
PROVISIONED_ROLE = Role.VIEWER

_UNSET: Any = object()


def _valid_email(value: Any) -> str:
    if not isinstance(value, str):
        raise ScimError(400, "userName is required: the person's e-mail address.", scim_type="invalidValue")
    email = User.objects.normalize_email(value.strip()).lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email or len(email) > 254:
        raise ScimError(400, f"userName '{value}' is not an e-mail address; people sign in with their e-mail.",
                        scim_type="invalidValue")
    return email


def _external_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 255 or not value.strip():
        raise ScimError(400, "externalId is a non-empty string of at most 255 characters.", scim_type="invalidValue")
    return value


def _external_id_free(*, tenant: Tenant, external_id: str | None, exclude: int | None = None) -> None:
    if external_id is None:
        return
    taken = Membership.objects.filter(tenant=tenant, scim_external_id=external_id)
    if exclude is not None:
        taken = taken.exclude(pk=exclude)
    if taken.exists():
        raise ScimError(409, f"Another member of this workspace has externalId '{external_id}'.",
                        scim_type="uniqueness")


@transaction.atomic
def scim_user_create(*, principal: Principal, tenant: Tenant, user_name: Any, external_id: Any = None,
                     display_name: str = "") -> Membership:
    """Make the person with e-mail ``user_name`` a member of ``tenant`` (role ``PROVISIONED_ROLE``).

    Creates their account if there is none (no password: they sign in through SSO or reset
    one); an existing account keeps its name. Raises ``ScimError`` 400 ``invalidValue`` for a
    userName that is not an e-mail address or a bad externalId, 409 ``uniqueness`` when the
    person already is a member or the externalId belongs to another member, and ``Conflict``
    (``plan_limit``) when the plan's seats are taken.
    """
    principal.require("members:write")
    email = _valid_email(user_name)
    external = _external_id(external_id)
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise ScimError(409, f"{email} is already a member of this workspace.", scim_type="uniqueness")
    _external_id_free(tenant=tenant, external_id=external)
    plan_limit_check(tenant=tenant, limit="max_members", used=lambda: Membership.objects.filter(tenant=tenant).count())
    user = User.objects.filter(email__iexact=email).first()
    created_account = user is None
    if user is None:
        try:
            with transaction.atomic():
                user = User.objects.create_user(email=email, password=None, name=(display_name or "").strip()[:200])
        except IntegrityError:
            # A concurrent request created the account (and, if it provisioned the same person here,
            # the membership too, which the create below then refuses as 409).
            user = User.objects.filter(email__iexact=email).first()
            if user is None:
                raise
            created_account = False
    try:
        with transaction.atomic():
            membership = Membership.objects.create(user=user, tenant=tenant, role=PROVISIONED_ROLE,
                                                   scim_external_id=external, invited_by=principal.person)
    except IntegrityError as exc:  # a concurrent request provisioned the same person or id
        raise ScimError(409, f"{email} is already a member of this workspace.", scim_type="uniqueness") from exc
    membership.user = user
    audit_event_create(actor=principal, action="member.provisioned", target_type="membership",
                       target_id=membership.pk,
                       payload={"email": email, "role": membership.role, "external_id": external,
                                "account_created": created_account, "via": "scim"},
                       schema=tenant.schema_name)
    return membership


@dataclass(frozen=True)
class UserChanges:
    """What a SCIM PUT or PATCH asks of a user; ``_UNSET`` fields are left alone."""

    user_name: Any = _UNSET
    external_id: Any = _UNSET
    display_name: Any = _UNSET
    active: Any = _UNSET


@transaction.atomic
def scim_user_update(*, principal: Principal, membership: Membership, changes: UserChanges) -> Membership | None:
    """Apply ``changes`` to the member; ``None`` when they were deprovisioned (``active`` false).

    ``userName`` is the person's sign-in address, shared by every workspace they belong to, so
    it cannot change here (400 ``mutability``; the same address in another case is accepted);
    a display name is written only to an account that has none, for the same reason. Raises
    ``ScimError`` 400 / 409 as ``scim_user_create`` does, and what ``scim_user_deprovision``
    raises.
    """
    principal.require("members:write")
    membership = Membership.objects.select_for_update(of=("self",)).select_related("user", "tenant").get(
        pk=membership.pk)
    user, tenant = membership.user, membership.tenant
    if changes.user_name is not _UNSET and _valid_email(changes.user_name) != user.email.lower():
        raise ScimError(400, f"userName is {user.email}, the person's sign-in address in every workspace; "
                        "it cannot be changed over SCIM.", scim_type="mutability")
    changed: dict[str, Any] = {}
    if changes.external_id is not _UNSET:
        external = _external_id(changes.external_id)
        if external != membership.scim_external_id:
            _external_id_free(tenant=tenant, external_id=external, exclude=membership.pk)
            changed["external_id"] = {"from": membership.scim_external_id, "to": external}
            membership.scim_external_id = external
            membership.save(update_fields=["scim_external_id"])
    if changes.display_name is not _UNSET and isinstance(changes.display_name, str) \
            and changes.display_name.strip() and not user.name:
        user.name = changes.display_name.strip()[:200]
        user.save(update_fields=["name"])
        changed["name"] = user.name
    if changed:
        audit_event_create(actor=principal, action="member.scim_updated", target_type="membership",
                           target_id=membership.pk, payload={"email": user.email, **changed},
                           schema=tenant.schema_name)
    if changes.active is False:
        scim_user_deprovision(principal=principal, membership=membership, reason="deactivated")
        return None
    return membership


def sessions_end(*, user: User, tenant: Tenant) -> int:
    """End ``user``'s browser sessions made on ``tenant``'s host; return how many.

    A session remembers the schema of the host it signed in on (``tenants.signals``); one
    without that mark (made before the mark existed) is ended too, as it could be this
    tenant's. The session store has no index by user, so this reads every unexpired session:
    deprovisioning is rare, and the membership is already gone, which locks the person out of
    the tenant whatever this finds.
    """
    engine = import_module(settings.SESSION_ENGINE)
    if not hasattr(engine.SessionStore, "get_model_class"):  # not a database-backed store
        logger.warning("sessions_end_unsupported", engine=settings.SESSION_ENGINE)
        return 0
    user_id = str(user.pk)
    ended = []
    for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator(chunk_size=500):
        data = session.get_decoded()
        if data.get("_auth_user_id") == user_id and data.get(SESSION_TENANT_KEY) in (None, tenant.schema_name):
            ended.append(session.session_key)
    for key in ended:
        engine.SessionStore(session_key=key).delete()  # also drops a cached copy (cached_db)
    return len(ended)


@transaction.atomic
def scim_user_deprovision(*, principal: Principal, membership: Membership, reason: str) -> None:
    """Remove the member from the tenant, revoke their API keys there and end their sessions on
    the tenant's host (``reason``: ``deactivated`` or ``deleted``), all audited.

    Raises ``ScimError`` 403 for an owner: a SCIM token acts as an admin, and owners (the last
    one above all) are removed only by an owner in the console.
    """
    principal.require("members:write")
    membership = Membership.objects.select_related("user", "tenant").get(pk=membership.pk)
    if membership.role == Role.OWNER:
        raise ScimError(403, f"{membership.user.email} is an owner of this workspace: SCIM does not deprovision "
                        "owners. An owner can remove them in the console, after another owner is in place.")
    user, tenant = membership.user, membership.tenant
    membership_remove(principal=principal, membership=membership)  # audits member.removed and key revocations
    ended = sessions_end(user=user, tenant=tenant)
    audit_event_create(actor=principal, action="member.deprovisioned", target_type="user", target_id=user.pk,
                       payload={"email": user.email, "reason": reason, "sessions_ended": ended, "via": "scim"},
                       schema=tenant.schema_name)


@transaction.atomic
def scim_group_members_change(*, principal: Principal, tenant: Tenant, role: str,
                              add: list[Membership], remove: list[Membership]) -> None:
    """Give the members in ``add`` the role ``role``; give those in ``remove`` who hold it
    ``PROVISIONED_ROLE`` instead (a member is in exactly one role's group).

    Each change is ``membership_role_change``: audited, API keys clipped to the new role, and
    refused with ``Forbidden`` for owners and for making anyone an owner.
    """
    principal.require("members:write")
    if role not in Role.values:
        raise ScimError(404, f"Group {role} not found.")
    for membership in add:
        if membership.tenant_id != tenant.pk:
            raise ScimError(404, f"User {membership.scim_id} not found.")
        if membership.role == role:
            continue  # already there (an owner listed in the owners' group is no change to refuse)
        membership_role_change(principal=principal, membership=membership, role=role)
    if role == PROVISIONED_ROLE:
        return  # nobody holds less: leaving the viewers' group keeps the member a viewer
    for membership in remove:
        if membership.tenant_id == tenant.pk and membership.role == role:
            membership_role_change(principal=principal, membership=membership, role=PROVISIONED_ROLE)
