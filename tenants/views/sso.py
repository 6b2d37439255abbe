"""Single sign-on pages: the IdP login and callback (allauth's OpenID Connect views, run with
``tenants.sso.TenantOidcAdapter``) and the console's SSO settings page."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
from allauth.account.views import login as allauth_login
from allauth.socialaccount.models import SocialApp
from allauth.socialaccount.providers.oauth2.views import OAuth2CallbackView, OAuth2LoginView
from django.contrib.auth.decorators import login_not_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from config.errors import DomainError
from config.htmx import after_write, domain_errors_as_pages, is_htmx, render_page
from tenants.forms import SsoSettingsForm
from tenants.principal import request_principal
from tenants.services.sso import SSO_ROLES, SsoSettings, sso_login_refused, sso_settings_get, sso_settings_update
from tenants.sso import TenantOidcAdapter, app_for_request


def _idp_form_action(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """Let this page's forms lead to the tenant's IdP: the "Sign in with" form posts here and is
    redirected there, and CSP's ``form-action`` also governs where a submission is redirected."""
    app_for_request(request)
    config = getattr(request, "_sso_config", None)
    if config is not None and config.issuer_url:
        parts = urlsplit(config.issuer_url)
        response._csp_update = {"form-action": [f"{parts.scheme}://{parts.netloc}"]}  # type: ignore[attr-defined]
    return response


@login_not_required
def login_page(request: HttpRequest) -> HttpResponse:
    """allauth's login page, whose "Sign in with" form may lead to the tenant's IdP."""
    return _idp_form_action(request, allauth_login(request))


@login_not_required
def oidc_login(request: HttpRequest, provider_id: str) -> HttpResponse:
    """Start a sign-in at the tenant's IdP (POST; a GET shows allauth's confirmation page).
    404 when ``provider_id`` is not this host's tenant's IdP; 502 (audited) when its discovery
    document cannot be read, the egress guard's refusal included."""
    try:
        response = OAuth2LoginView.adapter_view(TenantOidcAdapter(request, provider_id))(request)
        return _idp_form_action(request, response)
    except SocialApp.DoesNotExist:
        raise Http404("No such identity provider here.") from None
    except (requests.RequestException, ValueError) as exc:
        # allauth reads the discovery document here without catching transport errors.
        tenant = request.tenant  # type: ignore[attr-defined]
        sso_login_refused(tenant=tenant, reason="discovery_failed", detail=f"{type(exc).__name__}: {exc}")
        message = "The identity provider could not be reached. Try again, or ask your administrator."
        return render(request, "errors/error.html", {"status": 502, "message": message}, status=502)


@login_not_required
def oidc_callback(request: HttpRequest, provider_id: str) -> HttpResponse:
    """The IdP's redirect back: allauth exchanges the code (PKCE), verifies the ID token and hands
    over to ``tenants.sso.SsoAdapter``. 404 when ``provider_id`` is not this host's tenant's IdP."""
    try:
        return OAuth2CallbackView.adapter_view(TenantOidcAdapter(request, provider_id))(request)  # type: ignore[no-any-return]
    except SocialApp.DoesNotExist:
        raise Http404("No such identity provider here.") from None


def _initial(current: SsoSettings) -> dict[str, Any]:
    return {
        "enabled": current.enabled, "display_name": current.display_name, "issuer_url": current.issuer_url,
        "client_id": current.client_id, "scopes": " ".join(current.scopes), "groups_claim": current.groups_claim,
        "role_mapping": "\n".join(f"{group} = {role}" for group, role in current.role_mapping.items()),
        "default_role": current.default_role, "allowed_email_domains": " ".join(current.allowed_email_domains),
        "enforce_sso": current.enforce_sso,
    }


def _context(request: HttpRequest, form: SsoSettingsForm | None = None) -> dict[str, Any]:
    from tenants.sso import provider_id_for

    tenant = request.tenant  # type: ignore[attr-defined]
    current = sso_settings_get(principal=request_principal(request), tenant=tenant)
    callback = request.build_absolute_uri(
        reverse("sso_callback", kwargs={"provider_id": provider_id_for(tenant)}))
    return {"form": form or SsoSettingsForm(initial=_initial(current)), "current": current,
            "roles": SSO_ROLES, "callback_url": callback}


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def sso_settings(request: HttpRequest) -> HttpResponse:
    """Single sign-on settings of the tenant (``members:write``: owners and admins)."""
    principal = request_principal(request)
    principal.require("members:write")
    page = "tenants/tenant_sso_settings.html"
    if request.method == "POST":
        form = SsoSettingsForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                sso_settings_update(
                    principal=principal, tenant=request.tenant,  # type: ignore[attr-defined]
                    enabled=data["enabled"], display_name=data["display_name"], issuer_url=data["issuer_url"],
                    client_id=data["client_id"], client_secret=data["client_secret"], scopes=data["scopes"],
                    groups_claim=data["groups_claim"], role_mapping=data["role_mapping"],
                    default_role=data["default_role"], allowed_email_domains=data["allowed_email_domains"],
                    enforce_sso=data["enforce_sso"],
                )
            except DomainError as exc:
                field = (exc.details or [{}])[0].get("field") if isinstance(exc.details, list) else None
                form.add_error(field if field in form.fields else None, exc.message)
            else:
                return after_write(
                    request, message="Single sign-on settings saved.",
                    fragment=lambda: render_page(request, page, _context(request), partial="sso-settings"),
                    redirect_to=reverse("sso_settings"),
                )
        return render_page(request, page, _context(request, form), partial="sso-settings",
                           status=422 if not is_htmx(request) else 200)
    return render_page(request, page, _context(request), partial="sso-settings")
