"""Dashboard, members, API keys and settings pages of the tenant console.

Every view here runs behind ``TenantAccessMiddleware``, so ``request.principal`` is the
signed-in member; permissions are checked again by the selectors and services they call.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth import login
from django.contrib.auth.decorators import login_not_required
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing.selectors import usage as usage_selectors
from compliance.models import AuditEvent
from config.errors import DomainError
from config.htmx import after_write, domain_errors_as_pages, is_htmx, render_page
from tenants import selectors
from tenants.forms import (
    AcceptInvitationForm,
    ApiKeyForm,
    BillingSettingsForm,
    InviteForm,
    RoleForm,
    TenantSettingsForm,
)
from tenants.principal import request_principal
from tenants.roles import DEFAULT_KEY_SCOPES, Role, roles_assignable_by
from tenants.services import keys as key_services
from tenants.services import members as member_services
from tenants.services.billing_settings import (
    tenant_alert_webhook_test,
    tenant_billing_settings_get,
    tenant_billing_settings_update,
)
from tenants.services.provisioning import tenant_settings_update


@require_GET
@domain_errors_as_pages
def dashboard(request: HttpRequest) -> HttpResponse:
    """Overview: plan, member and key counts, this month's tokens and cost (in the tenant's
    timezone), recent audit events."""
    principal = request_principal(request)
    tenant = request.tenant  # type: ignore[attr-defined]
    principal.require("tenant:read")
    counts = tenant.memberships.aggregate(members=Count("id"))
    keys = tenant.api_keys.aggregate(active=Count("id", filter=Q(revoked_at__isnull=True)))
    usage = None
    if principal.can("usage:read"):
        period = usage_selectors.usage_period(principal=principal)
        usage = {"period": period, "last_day": period.end - dt.timedelta(days=1),
                 **usage_selectors.usage_summary(principal=principal, period=period, group_by="model")}
    recent = list(AuditEvent.objects.order_by("-seq")[:8]) if principal.can("audit:read") else []
    return render(request, "tenants/dashboard.html", {
        "member_count": counts["members"], "active_key_count": keys["active"], "usage": usage,
        "recent_events": recent,
    })


def _members_context(request: HttpRequest, invite_form: InviteForm | None = None) -> dict[str, Any]:
    principal = request_principal(request)
    tenant = request.tenant  # type: ignore[attr-defined]
    assignable = roles_assignable_by(principal.role or "")
    members = list(selectors.member_list(principal=principal, tenant=tenant))
    can_manage = principal.can("members:write")
    for member in members:
        # Admins see owners read-only: only owners may change or remove an owner.
        member.editable = can_manage and member.role in assignable  # type: ignore[attr-defined]
    return {
        "members": members,
        "invitations": list(selectors.invitation_list(principal=principal, tenant=tenant)),
        "invite_form": invite_form or InviteForm(assignable=assignable),
        "assignable_roles": [(v, label) for v, label in Role.choices if v in assignable],
        "can_manage": can_manage,
        "owner_count": sum(1 for m in members if m.role == Role.OWNER),
    }


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def member_list(request: HttpRequest) -> HttpResponse:
    """Members and open invitations; POST invites someone."""
    principal = request_principal(request)
    tenant = request.tenant  # type: ignore[attr-defined]
    if request.method == "POST":
        form = InviteForm(request.POST, assignable=roles_assignable_by(principal.role or ""))
        if form.is_valid():
            try:
                issued = member_services.invitation_create(
                    principal=principal, tenant=tenant, email=form.cleaned_data["email"],
                    role=form.cleaned_data["role"],
                )
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                return after_write(
                    request,
                    message=f"Invitation sent to {issued.invitation.email}. Link: {issued.accept_url()}",
                    fragment=lambda: render_page(request, "tenants/member_list.html", _members_context(request),
                                                 partial="members-section"),
                    redirect_to=reverse("member_list"),
                )
        return render_page(request, "tenants/member_list.html", _members_context(request, form),
                           partial="members-section", status=422 if not is_htmx(request) else 200)
    return render_page(request, "tenants/member_list.html", _members_context(request), partial="members-section")


def _member_write(request: HttpRequest, action: Any, message: str) -> HttpResponse:
    try:
        action()
    except DomainError as exc:
        return after_write(
            request, message=exc.message, level="danger",
            fragment=lambda: render_page(request, "tenants/member_list.html", _members_context(request),
                                         partial="members-section"),
            redirect_to=reverse("member_list"),
        )
    return after_write(
        request, message=message,
        fragment=lambda: render_page(request, "tenants/member_list.html", _members_context(request),
                                     partial="members-section"),
        redirect_to=reverse("member_list"),
    )


@require_POST
@domain_errors_as_pages
def member_role_change(request: HttpRequest, membership_id: int) -> HttpResponse:
    principal = request_principal(request)
    membership = selectors.member_get(principal=principal, tenant=request.tenant,  # type: ignore[attr-defined]
                                      membership_id=membership_id)
    form = RoleForm(request.POST)
    role = form.cleaned_data["role"] if form.is_valid() else request.POST.get("role", "")
    return _member_write(
        request,
        lambda: member_services.membership_role_change(principal=principal, membership=membership, role=role),
        f"{membership.user.email} is now {role}.",
    )


@require_POST
@domain_errors_as_pages
def member_remove(request: HttpRequest, membership_id: int) -> HttpResponse:
    principal = request_principal(request)
    membership = selectors.member_get(principal=principal, tenant=request.tenant,  # type: ignore[attr-defined]
                                      membership_id=membership_id)
    return _member_write(
        request,
        lambda: member_services.membership_remove(principal=principal, membership=membership),
        f"{membership.user.email} was removed.",
    )


@require_POST
@domain_errors_as_pages
def invitation_revoke(request: HttpRequest, invitation_id: int) -> HttpResponse:
    principal = request_principal(request)
    invitation = selectors.invitation_get(principal=principal, tenant=request.tenant,  # type: ignore[attr-defined]
                                          invitation_id=invitation_id)
    return _member_write(
        request,
        lambda: member_services.invitation_revoke(principal=principal, invitation=invitation),
        f"The invitation to {invitation.email} was revoked.",
    )


def _keys_context(request: HttpRequest, form: ApiKeyForm | None = None, secret: str | None = None,
                  created: Any = None) -> dict[str, Any]:
    principal = request_principal(request)
    return {
        "keys": list(selectors.api_key_list(principal=principal, tenant=request.tenant)),  # type: ignore[attr-defined]
        "form": form or ApiKeyForm(held=principal.permissions, initial={"scopes": list(DEFAULT_KEY_SCOPES)}),
        "can_write": principal.can("keys:write"),
        "can_revoke_any": principal.can("members:write"),
        "new_secret": secret,
        "new_key": created,
    }


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def api_key_list(request: HttpRequest) -> HttpResponse:
    """API keys; POST creates one and shows its secret once (never stored, never shown again)."""
    principal = request_principal(request)
    if request.method == "POST":
        form = ApiKeyForm(request.POST, held=principal.permissions)
        if form.is_valid():
            try:
                issued = key_services.api_key_create(
                    principal=principal, tenant=request.tenant, name=form.cleaned_data["name"],  # type: ignore[attr-defined]
                    scopes=form.cleaned_data["scopes"], expires_at=form.expires_at(),
                )
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                # The secret is rendered in this response only, even without JavaScript: a
                # redirect would have to carry it through the session.
                response = render_page(request, "tenants/api_key_list.html",
                                       _keys_context(request, secret=issued.secret, created=issued.key),
                                       partial="keys-section", status=201 if not is_htmx(request) else 200)
                response["Cache-Control"] = "no-store"
                return response
        return render_page(request, "tenants/api_key_list.html", _keys_context(request, form),
                           partial="keys-section", status=422 if not is_htmx(request) else 200)
    return render_page(request, "tenants/api_key_list.html", _keys_context(request), partial="keys-section")


@require_POST
@domain_errors_as_pages
def api_key_revoke(request: HttpRequest, key_id: str) -> HttpResponse:
    principal = request_principal(request)
    key = selectors.api_key_get(principal=principal, tenant=request.tenant, key_id=key_id)  # type: ignore[attr-defined]
    try:
        key_services.api_key_revoke(principal=principal, key=key)
    except DomainError as exc:
        message, level = exc.message, "danger"
    else:
        message, level = f"Key {key.prefix} revoked.", "success"
    return after_write(
        request, message=message, level=level,
        fragment=lambda: render_page(request, "tenants/api_key_list.html", _keys_context(request),
                                     partial="keys-section"),
        redirect_to=reverse("api_key_list"),
    )


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def tenant_settings(request: HttpRequest) -> HttpResponse:
    """Security settings of the tenant (owners)."""
    principal = request_principal(request)
    tenant = request.tenant  # type: ignore[attr-defined]
    principal.require("tenant:admin")
    form = TenantSettingsForm(request.POST or None, initial={"require_2fa": tenant.require_2fa})
    if request.method == "POST" and form.is_valid():
        tenant_settings_update(actor=principal, tenant=tenant, require_2fa=form.cleaned_data["require_2fa"])
        return after_write(
            request, message="Settings saved.",
            fragment=lambda: render_page(request, "tenants/tenant_settings.html",
                                         {"form": TenantSettingsForm(initial={"require_2fa": tenant.require_2fa})},
                                         partial="settings-form"),
            redirect_to=reverse("tenant_settings"),
        )
    return render_page(request, "tenants/tenant_settings.html", {"form": form}, partial="settings-form")


def _billing_settings_context(request: HttpRequest, form: BillingSettingsForm | None = None,
                              **extra: Any) -> dict[str, Any]:
    principal = request_principal(request)
    current = tenant_billing_settings_get(principal=principal, tenant=request.tenant)  # type: ignore[attr-defined]
    if form is None:
        form = BillingSettingsForm(initial={"time_zone": current.time_zone,
                                            "alert_webhook_url": current.alert_webhook_url})
    return {"form": form, "current": current, **extra}


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def billing_settings(request: HttpRequest) -> HttpResponse:
    """Billing settings of the tenant (``billing:write``: owners and admins): time zone and the
    budget-alert webhook. At /budgets/settings/ rather than on /settings/, which is for owners
    only (``tenant:admin``) while admins manage budgets too. A generated secret is shown in this
    response only (no redirect, so it is never stored for a later page)."""
    principal = request_principal(request)
    tenant = request.tenant  # type: ignore[attr-defined]
    principal.require("billing:write")
    page = "tenants/tenant_billing_settings.html"
    if request.method == "POST" and request.POST.get("action") == "test":
        tested = tenant_alert_webhook_test(principal=principal, tenant=tenant)
        return after_write(
            request, message=tested.message, level="success" if tested.delivered else "danger",
            fragment=lambda: render_page(request, page, _billing_settings_context(request, test_outcome=tested),
                                         partial="billing-settings"),
            redirect_to=reverse("billing_settings"),
        )
    if request.method == "POST":
        form = BillingSettingsForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                outcome = tenant_billing_settings_update(
                    principal=principal, tenant=tenant, time_zone=data["time_zone"],
                    alert_webhook_url=data["alert_webhook_url"], alert_webhook_secret=data["alert_webhook_secret"],
                    generate_secret=data["generate_secret"],
                )
            except DomainError as exc:
                field = (exc.details or [{}])[0].get("field") if isinstance(exc.details, list) else None
                form.add_error(field if field in form.fields else None, exc.message)
            else:
                if outcome.generated_secret:
                    response = render_page(request, page, _billing_settings_context(
                        request, generated_secret=outcome.generated_secret), partial="billing-settings")
                    response["Cache-Control"] = "no-store"
                    return response
                return after_write(
                    request, message="Billing settings saved.",
                    fragment=lambda: render_page(request, page, _billing_settings_context(request),
                                                 partial="billing-settings"),
                    redirect_to=reverse("billing_settings"),
                )
        return render_page(request, page, _billing_settings_context(request, form), partial="billing-settings",
                           status=422 if not is_htmx(request) else 200)
    return render_page(request, page, _billing_settings_context(request), partial="billing-settings")


@login_not_required
def invitation_accept(request: HttpRequest, token: str) -> HttpResponse:
    """Accept an invitation: sign in as the invited address, or create the account here."""
    tenant = request.tenant  # type: ignore[attr-defined]
    try:
        invitation = member_services.invitation_get_open(tenant=tenant, token=token)
    except DomainError as exc:
        return render(request, "errors/error.html", {"status": exc.status, "message": exc.message},
                      status=exc.status)
    from tenants.models import User

    user = request.user
    existing = User.objects.filter(email__iexact=invitation.email).exists()
    if request.method == "POST" and user.is_authenticated:
        try:
            member_services.invitation_accept(tenant=tenant, token=token, user=user)  # type: ignore[arg-type]
        except DomainError as exc:
            return render(request, "errors/error.html", {"status": exc.status, "message": exc.message},
                          status=exc.status)
        return redirect("dashboard")
    form = AcceptInvitationForm(request.POST or None, email=invitation.email)
    if request.method == "POST" and not user.is_authenticated and not existing and form.is_valid():
        try:
            membership = member_services.invitation_accept_new_user(
                tenant=tenant, token=token, name=form.cleaned_data.get("name", ""),
                password=form.cleaned_data["password1"],
            )
        except DomainError as exc:
            form.add_error(None, exc.message)
        else:
            login(request, membership.user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("dashboard")
    return render(request, "tenants/invitation_accept.html", {
        "invitation": invitation, "form": form, "existing_account": existing,
        "login_url": f"{reverse('account_login')}?next={request.path}",
    })

