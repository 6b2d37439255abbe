"""Receivers: log context for requests, audit events for sign-ins."""

from __future__ import annotations

from typing import Any

import structlog
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver
from django_structlog import signals as structlog_signals

from compliance.services import audit_event_create
from tenants.principal import Principal


@receiver(structlog_signals.bind_extra_request_metadata)
def bind_tenant(request: Any, logger: Any, log_kwargs: dict[str, Any], **kwargs: Any) -> None:
    """Put the tenant on every log line of the request, from ``request_started`` on."""
    tenant = getattr(request, "tenant", None)
    if tenant is not None:
        structlog.contextvars.bind_contextvars(tenant=tenant.slug)


# The session key naming the schema of the host a session signed in on, so that deprovisioning a
# member of one tenant ends their sessions there and not on other tenants' hosts (tenants.scim).
SESSION_TENANT_KEY = "tenant_schema"


@receiver(user_logged_in)
def mark_session_tenant(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Write the host's schema into the new session (``SESSION_TENANT_KEY``)."""
    tenant = getattr(request, "tenant", None)
    session = getattr(request, "session", None)
    if tenant is not None and session is not None:
        session[SESSION_TENANT_KEY] = tenant.schema_name


@receiver(user_logged_in)
def audit_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Sign-ins are recorded in the chain of the host's schema (tenant or public)."""
    if request is None:
        return
    audit_event_create(actor=Principal(kind="user", tenant=None, permissions=frozenset(), user=user,
                                       label=user.email),
                       action="user.logged_in", target_type="user", target_id=user.pk)


@receiver(user_login_failed)
def audit_login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    if request is None:
        return
    label = str(credentials.get("email") or credentials.get("username") or "")[:254]
    audit_event_create(actor=Principal.system(label="anonymous"), action="user.login_failed",
                       target_type="user", payload={"email": label})


def _user_actor(user: Any) -> Principal:
    return Principal(kind="user", tenant=None, permissions=frozenset(), user=user, label=user.email)


def _connect_allauth() -> None:
    from allauth.account.signals import email_confirmed, password_changed, password_reset, password_set

    @receiver(password_changed, weak=False)
    def audit_password_changed(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
        audit_event_create(actor=_user_actor(user), action="user.password_changed", target_type="user",
                           target_id=user.pk)

    @receiver(password_set, weak=False)
    def audit_password_set(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
        audit_event_create(actor=_user_actor(user), action="user.password_set", target_type="user",
                           target_id=user.pk)

    @receiver(password_reset, weak=False)
    def audit_password_reset(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
        audit_event_create(actor=_user_actor(user), action="user.password_reset", target_type="user",
                           target_id=user.pk)

    @receiver(email_confirmed, weak=False)
    def audit_email_confirmed(sender: Any, request: Any, email_address: Any, **kwargs: Any) -> None:
        audit_event_create(actor=_user_actor(email_address.user), action="user.email_confirmed",
                           target_type="user", target_id=email_address.user_id,
                           payload={"email": email_address.email})


_connect_allauth()
