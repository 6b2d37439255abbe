"""Host routing and access control for tenant hosts.

``TenantRoutingMiddleware`` picks the schema from the Host header. ``TenantAccessMiddleware``
then enforces, for every view not marked ``login_not_required``: the tenant is active, the user
is signed in, is a member of this tenant, and has passed two-factor authentication where it is
required. New views are therefore protected by default. The REST API authenticates itself
(``config.api``), but suspension is enforced here for it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import structlog
from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.middleware.main import TenantMainMiddleware

from tenants.models import Domain, Membership, Tenant
from tenants.principal import Principal
from tenants.roles import Role

_public_tenant: Tenant | None = None


class TenantRoutingMiddleware(TenantMainMiddleware):
    """django-tenants routing, with ``PUBLIC_HOST`` always meaning the public schema."""

    def get_tenant(self, domain_model: type[Domain], hostname: str) -> Tenant:
        global _public_tenant
        if hostname == settings.PUBLIC_HOST:
            if _public_tenant is None:
                _public_tenant = Tenant.objects.get(schema_name=settings.PUBLIC_SCHEMA_NAME)
            return _public_tenant
        # With the plan: the API's rate limit reads it on every request (config.ratelimit).
        return domain_model.objects.select_related("tenant", "tenant__plan").get(domain=hostname).tenant


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def _error(request: HttpRequest, status: int, code: str, message: str, template: str,
           context: dict[str, Any] | None = None) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse(
            {"error": {"code": code, "message": message, "details": None,
                       "request_id": getattr(request, "request_id", None)}},
            status=status,
        )
    return render(request, template, {"message": message, **(context or {})}, status=status)


def otp_verified(user: Any) -> bool:
    """True when this session passed two-factor verification (set by django-otp's middleware)."""
    is_verified = getattr(user, "is_verified", None)
    return bool(is_verified and is_verified())


def two_factor_required(user: Any, membership: Membership | None, tenant: Tenant | None) -> bool:
    """True when ``user`` must use 2FA here: staff always (``STAFF_REQUIRE_2FA``), owners and
    admins of a tenant that requires it."""
    if user.is_staff and settings.STAFF_REQUIRE_2FA:
        return True
    return bool(
        membership is not None and tenant is not None and tenant.require_2fa
        and membership.role in (Role.OWNER, Role.ADMIN)
    )


class TenantAccessMiddleware:
    """Suspension, membership and two-factor checks (see module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view_func: Callable[..., Any], view_args: Any,
                     view_kwargs: Any) -> HttpResponse | None:
        tenant: Tenant | None = getattr(request, "tenant", None)
        request.membership = None  # type: ignore[attr-defined]
        request.principal = None  # type: ignore[attr-defined]
        if tenant is None:
            return None
        if not tenant.is_public and not tenant.is_active:
            return _error(request, 403, "tenant_suspended",
                          f"The workspace '{tenant.slug}' is suspended. Contact your administrator.",
                          "errors/suspended.html", {"tenant": tenant})
        if _wants_json(request) or getattr(view_func, "login_required", True) is False:
            return None

        user = request.user
        membership = None
        if not tenant.is_public:
            if not user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            membership = (
                Membership.objects.select_related("user", "tenant").filter(user=user, tenant=tenant).first()
            )
            if membership is None:
                return _error(request, 403, "not_a_member",
                              f"{user.email} is not a member of the workspace '{tenant.slug}'.",
                              "errors/not_member.html", {"tenant": tenant})
            request.membership = membership  # type: ignore[attr-defined]
            request.principal = Principal.for_member(membership)  # type: ignore[attr-defined]
            structlog.contextvars.bind_contextvars(role=membership.role, user_id=user.pk)

        if user.is_authenticated and not getattr(view_func, "otp_exempt", False) and not otp_verified(user):
            has_device = TOTPDevice.objects.filter(user=user, confirmed=True).exists()
            if has_device:
                return redirect(f"{_url('two_factor_verify')}?{urlencode({'next': request.get_full_path()})}")
            if two_factor_required(user, membership, tenant):
                query = urlencode({"required": 1, "next": request.get_full_path()})
                return redirect(f"{_url('two_factor_setup')}?{query}")
        return None


def _url(name: str) -> str:
    from django.urls import reverse

    return reverse(name)
