"""Sign-in through a tenant's OpenID Connect IdP, on django-allauth's ``openid_connect`` provider.

- ``SsoAdapter.list_apps`` builds the one ``SocialApp`` of the request's tenant from its
  ``SsoConfig`` (never a database ``SocialApp`` row). Its ``provider_id`` is ``oidc-<slug>``,
  so an IdP's callback on another tenant's host names an app that host does not have (404),
  and the IdP subjects of different tenants are different social accounts.
- Every HTTP call allauth makes (discovery, token, userinfo, JWKS) goes through the egress guard
  (``SsoAdapter.get_requests_session`` -> ``config.egress_requests``).
- ``TenantOidcProvider`` turns PKCE on, sends a nonce and keeps it in allauth's state;
  ``TenantOidcAdapter`` has allauth/PyJWT verify every ID token's signature against the IdP's
  JWKS (allauth skips it for tokens fetched from the token endpoint), with ``iss`` (the
  configured issuer), ``aud`` (the client id) and ``exp`` as allauth always does. allauth has no
  nonce support, so ``SsoAdapter.pre_social_login`` compares the token's ``nonce`` with the one
  sent, and the userinfo ``sub`` with the ID token's (OpenID Connect Core 1.0, 3.1.3.7 and 5.3.2).
- Then ``tenants.services.sso`` decides (e-mail domain, role, account ownership) and records
  the membership; refusals render the error page and are audited.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import jwt
import structlog
from allauth.core import context
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter, get_adapter
from allauth.socialaccount.internal import jwtkit
from allauth.socialaccount.models import SocialApp, SocialLogin
from allauth.socialaccount.providers.oauth2.client import OAuth2Error
from allauth.socialaccount.providers.openid_connect.provider import OpenIDConnectProvider
from allauth.socialaccount.providers.openid_connect.views import OpenIDConnectOAuth2Adapter
from allauth.utils import build_absolute_uri
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import urlencode

from config.crypto import SecretUnreadable
from config.egress_requests import egress_requests_session
from config.errors import DomainError, Forbidden
from tenants.models import SsoConfig, Tenant, User
from tenants.services import sso as sso_services

logger = structlog.get_logger(__name__)

PROVIDER = "openid_connect"


def provider_id_for(tenant: Tenant) -> str:
    """The allauth provider id of ``tenant``'s IdP: ``oidc-<slug>``."""
    return f"oidc-{tenant.slug}"


def _request_tenant(request: HttpRequest | None) -> Tenant | None:
    request = request or context.request
    return getattr(request, "tenant", None) if request is not None else None


def app_for_request(request: HttpRequest | None) -> SocialApp | None:
    """The request's tenant's app, built once per request from its active ``SsoConfig``."""
    request = request or context.request
    if request is None:
        return None
    cached = getattr(request, "_sso_app", False)
    if cached is not False:
        return cached  # type: ignore[no-any-return]
    tenant = _request_tenant(request)
    config = sso_services.sso_config_active(tenant=tenant)
    app = None
    if config is not None and tenant is not None:
        try:
            secret = config.client_secret()
        except SecretUnreadable:
            logger.error("sso_client_secret_unreadable", tenant=tenant.slug)
            secret = None
        if secret is not None:
            app = SocialApp(
                provider=PROVIDER, provider_id=provider_id_for(tenant), name=config.display_name,
                client_id=config.client_id, secret=secret,
                settings={
                    "server_url": config.issuer_url.rstrip("/"),
                    # The iss check is against the issuer the tenant configured, whatever the
                    # discovery document says (OpenID Connect Discovery 1.0, 4.3).
                    "openid_configuration_overrides": {"issuer": config.issuer_url},
                    "oauth_pkce_enabled": True,
                    "scope": list(config.scopes),
                    "fetch_userinfo": True,
                    # Only addresses in allowed_email_domains get this far, for which the tenant
                    # made its IdP the authority.
                    "verified_email": True,
                    "email_authentication": False,
                },
            )
    request._sso_app = app  # type: ignore[union-attr]
    request._sso_config = config  # type: ignore[union-attr]
    return app


class TenantOidcAdapter(OpenIDConnectOAuth2Adapter):
    """allauth's OpenID Connect client, verifying every ID token's signature."""

    def _decode_id_token(self, app: SocialApp, id_token: str) -> dict[str, Any]:
        """The ID token's claims after PyJWT verified its signature (against the IdP's JWKS),
        ``iss``, ``aud`` and ``exp``. Raises ``OAuth2Error`` when any check fails."""
        try:
            has_kid = "kid" in jwt.get_unverified_header(id_token)
        except jwt.PyJWTError as exc:
            raise OAuth2Error("Invalid id_token") from exc
        if has_kid:
            data: dict[str, Any] = jwtkit.verify_and_decode(
                credential=id_token, keys_url=self.openid_config["jwks_uri"], issuer=self.openid_config["issuer"],
                audience=app.client_id, lookup_kid=jwtkit.lookup_kid_jwk, verify_signature=True,
            )
            return data
        return self._decode_without_kid(app, id_token)

    def _decode_without_kid(self, app: SocialApp, id_token: str) -> dict[str, Any]:
        # allauth's jwtkit needs a "kid" header, which a JWKS of one key does not require (RFC
        # 7517, 4.5): such a token is checked against the JWKS's only signing key, with that
        # key's algorithm (never the token header's), by PyJWT as jwtkit would.
        with get_adapter().get_requests_session() as session:
            response = session.get(self.openid_config["jwks_uri"])
            response.raise_for_status()
            keys = [k for k in response.json().get("keys", []) if k.get("use", "sig") == "sig"]
        if len(keys) != 1:
            raise OAuth2Error("The ID token names no key ('kid') and the IdP's JWKS has more than one.")
        try:
            key = jwt.PyJWK.from_dict(keys[0])
            data = jwt.decode(
                id_token, key=key.key, algorithms=[key.algorithm_name],
                options={"verify_signature": True, "verify_iss": True, "verify_aud": True, "verify_exp": True},
                issuer=self.openid_config["issuer"], audience=app.client_id,
            )
            jwtkit.verify_jti(data)
        except jwt.PyJWTError as exc:
            raise OAuth2Error("Invalid id_token") from exc
        return dict(data)

    def get_callback_url(self, request: HttpRequest, app: SocialApp) -> str:
        callback_url = reverse("sso_callback", kwargs={"provider_id": self.provider_id})
        return str(build_absolute_uri(request, callback_url, self.redirect_uri_protocol))


class TenantOidcProvider(OpenIDConnectProvider):
    """allauth's OpenID Connect provider with a nonce in every authorization request (kept in
    allauth's state, compared in ``SsoAdapter.pre_social_login``) and ``TenantOidcAdapter``."""

    oauth2_adapter_class = TenantOidcAdapter

    def get_login_url(self, request: HttpRequest, **kwargs: Any) -> str:
        url = reverse("sso_login", kwargs={"provider_id": self.app.provider_id})
        return f"{url}?{urlencode(kwargs)}" if kwargs else url

    def get_callback_url(self) -> str:
        return reverse("sso_callback", kwargs={"provider_id": self.app.provider_id})

    def redirect(self, request: HttpRequest, process: Any, next_url: str | None = None, data: Any = None,
                 **kwargs: Any) -> HttpResponse:
        nonce = secrets.token_urlsafe(32)
        auth_params = kwargs.pop("auth_params", None)
        auth_params = dict(auth_params if auth_params is not None else self.get_auth_params())
        auth_params["nonce"] = nonce
        response: HttpResponse = super().redirect(request, process, next_url, data, auth_params=auth_params,
                                                  nonce=nonce, **kwargs)
        return response


def _claims(sociallogin: SocialLogin) -> tuple[dict[str, Any], dict[str, Any]]:
    data = sociallogin.account.extra_data or {}
    return dict(data.get("id_token") or {}), dict(data.get("userinfo") or {})


def _refusal(request: HttpRequest, *, status: int, message: str) -> ImmediateHttpResponse:
    return ImmediateHttpResponse(render(request, "errors/error.html", {"status": status, "message": message},
                                        status=status))


class SsoAdapter(DefaultSocialAccountAdapter):
    """Per-tenant apps, guarded HTTP, and the portal's rules for who an IdP signs in."""

    def list_apps(self, request: HttpRequest | None, provider: str | None = None,
                  client_id: str | None = None) -> list[SocialApp]:
        app = app_for_request(request)
        if app is None:
            return []
        if provider and provider not in (app.provider, app.provider_id):
            return []
        if client_id and client_id != app.client_id:
            return []
        return [app]

    def get_requests_session(self) -> Any:
        return egress_requests_session(timeout=float(settings.SOCIALACCOUNT_REQUESTS_TIMEOUT))

    def is_open_for_signup(self, request: HttpRequest, sociallogin: SocialLogin) -> bool:
        # Reached only after pre_social_login allowed this person into an SSO tenant.
        return getattr(request, "_sso_decision", None) is not None

    def is_auto_signup_allowed(self, request: HttpRequest, sociallogin: SocialLogin) -> bool:
        return True

    def pre_social_login(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        """Check nonce and subject, then the tenant's rules; link an existing account of this
        tenant; for an existing social account, record the membership now (a new account's is
        recorded in ``save_user``). Raises ``ImmediateHttpResponse`` with the error page."""
        tenant = _request_tenant(request)
        app_for_request(request)
        config: SsoConfig | None = getattr(request, "_sso_config", None)
        if tenant is None or config is None:
            raise _refusal(request, status=404, message="Single sign-on is not set up for this workspace.")
        id_token, userinfo = _claims(sociallogin)
        expected_nonce = str((sociallogin.state or {}).get("nonce") or "")
        if not id_token or not expected_nonce or not hmac.compare_digest(
                str(id_token.get("nonce") or ""), expected_nonce):
            sso_services.sso_login_refused(tenant=tenant, reason="nonce_mismatch")
            raise _refusal(request, status=403, message="The sign-in could not be verified (nonce). Try again.")
        if userinfo and str(userinfo.get("sub")) != str(id_token.get("sub")):
            sso_services.sso_login_refused(tenant=tenant, reason="subject_mismatch")
            raise _refusal(request, status=403, message="The sign-in could not be verified (subject). Try again.")
        claims = {**id_token, **userinfo}
        linked: User | None = sociallogin.user if sociallogin.is_existing else None  # type: ignore[assignment]
        try:
            decision = sso_services.sso_login_check(tenant=tenant, config=config, claims=claims, linked_user=linked)
        except DomainError as exc:
            sso_services.sso_login_refused(tenant=tenant, reason=exc.code, email=str(claims.get("email") or ""))
            raise _refusal(request, status=exc.status, message=exc.message) from exc
        request._sso_decision = decision  # type: ignore[attr-defined]
        if not sociallogin.is_existing and decision.existing_user is not None:
            sociallogin.connect(request, decision.existing_user)
        if sociallogin.is_existing:
            user = sociallogin.user
            assert isinstance(user, User)
            sso_services.sso_membership_sync(tenant=tenant, user=user, role=decision.role,
                                             subject=sociallogin.account.uid, created_user=False)

    def populate_user(self, request: HttpRequest, sociallogin: SocialLogin, data: dict[str, Any]) -> Any:
        user = super().populate_user(request, sociallogin, data)
        decision = getattr(request, "_sso_decision", None)
        if decision is not None:
            user.email = decision.email
        name = " ".join(part for part in (data.get("first_name"), data.get("last_name")) if part)
        user.name = (data.get("name") or name or "")[:200]
        return user

    def save_user(self, request: HttpRequest, sociallogin: SocialLogin, form: Any = None) -> Any:
        """Create the account of a person new to the portal, then their membership."""
        decision = getattr(request, "_sso_decision", None)
        tenant = _request_tenant(request)
        if decision is None or tenant is None:
            raise Forbidden("Single sign-on did not approve this account.", code="sso_not_approved")
        user = super().save_user(request, sociallogin, form)
        sso_services.sso_membership_sync(tenant=tenant, user=user, role=decision.role,
                                         subject=sociallogin.account.uid, created_user=True)
        return user

    def on_authentication_error(self, request: HttpRequest, provider: Any, error: Any = None,
                                exception: Any = None, extra_context: Any = None) -> None:
        """Audit a failed sign-in (a token that failed verification, a refused address, a
        cancelled login): the error kind and the exception's class and message, never a token."""
        tenant = _request_tenant(request)
        if tenant is not None and not tenant.is_public:
            detail = f"{type(exception).__name__}: {exception}" if exception is not None else ""
            if exception is not None and exception.__cause__ is not None:
                detail += f" ({type(exception.__cause__).__name__}: {exception.__cause__})"
            sso_services.sso_login_refused(tenant=tenant, reason=f"authentication_error:{error or 'unknown'}",
                                           detail=detail)
