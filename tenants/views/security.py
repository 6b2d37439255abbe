"""Two-factor authentication with django-otp: TOTP enrolment, verification, recovery codes.

Flow: enrolment creates an unconfirmed TOTP device and shows its QR code; entering a valid code
confirms it, marks the session verified and issues ten single-use recovery codes (shown once).
After a later sign-in, ``TenantAccessMiddleware`` sends the user to ``two_factor_verify``,
which accepts a TOTP code or a recovery code.
"""

from __future__ import annotations

from typing import Any

import qrcode
import qrcode.image.svg
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_http_methods, require_POST
from django_otp import login as otp_login
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from compliance.services import audit_event_create
from tenants.forms import TokenForm
from tenants.middleware import otp_verified, two_factor_required
from tenants.principal import Principal


def otp_exempt(view: Any) -> Any:
    """Let a signed-in but not yet verified user reach ``view`` (the 2FA pages themselves)."""
    view.otp_exempt = True
    return view


def _actor(request: HttpRequest) -> Principal:
    principal = getattr(request, "principal", None)
    return principal or Principal(kind="user", tenant=None, permissions=frozenset(), user=request.user,  # type: ignore[arg-type]
                                  label=request.user.email)  # type: ignore[union-attr]


def _safe_next(request: HttpRequest, default: str = "/") -> str:
    target = request.GET.get("next") or request.POST.get("next") or default
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return default


def qr_svg(data: str) -> str:
    """An inline SVG QR code of ``data`` (error correction M, the otpauth convention)."""
    image = qrcode.make(data, image_factory=qrcode.image.svg.SvgPathImage, box_size=8, border=2,
                        error_correction=qrcode.constants.ERROR_CORRECT_M)
    return image.to_string(encoding="unicode")


@transaction.atomic
def recovery_codes_issue(user: Any) -> list[str]:
    """Replace the user's recovery codes with ``OTP_STATIC_RECOVERY_TOKENS`` new ones."""
    device, _ = StaticDevice.objects.get_or_create(user=user, name="recovery", defaults={"confirmed": True})
    device.token_set.all().delete()
    codes = [StaticToken.random_token() for _ in range(settings.OTP_STATIC_RECOVERY_TOKENS)]
    StaticToken.objects.bulk_create([StaticToken(device=device, token=c) for c in codes])
    return codes


@otp_exempt
@login_required  # The public host's middleware lets anonymous visitors through to every view.
@require_http_methods(["GET", "POST"])
def two_factor_setup(request: HttpRequest) -> HttpResponse:
    """Enrol an authenticator app (TOTP, RFC 6238: 30-second steps, 6 digits, SHA-1)."""
    user = request.user
    if TOTPDevice.objects.filter(user=user, confirmed=True).exists():
        if otp_verified(request.user):
            return redirect("two_factor_security")
        # Replacing the second factor needs the current one: a password alone must not do it.
        return redirect(f"{reverse('two_factor_verify')}?{urlencode({'next': request.get_full_path()})}")
    device = TOTPDevice.objects.filter(user=user, confirmed=False).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="authenticator", confirmed=False)
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["token"]):
            with transaction.atomic():
                TOTPDevice.objects.filter(user=user, confirmed=True).delete()
                device.confirmed = True
                device.save(update_fields=["confirmed"])
                codes = recovery_codes_issue(user)
                audit_event_create(actor=_actor(request), action="user.2fa_enabled", target_type="user",
                                   target_id=user.pk or "", payload={"method": "totp"})
            otp_login(request, device)
            return render(request, "security/recovery_codes.html", {"codes": codes, "next": _safe_next(request)})
        form.add_error("token", "That code is not valid. Check the time on your phone and try the newest code.")
    return render(request, "security/setup.html", {
        "form": form, "qr_svg": qr_svg(device.config_url), "secret": _base32(device),
        "otpauth_uri": device.config_url, "required": bool(request.GET.get("required")),
        "next": _safe_next(request),
    })


def _base32(device: TOTPDevice) -> str:
    import base64

    return base64.b32encode(device.bin_key).decode().rstrip("=")


def _device_for_code(user: Any, code: str) -> TOTPDevice | StaticDevice | None:
    """The device that accepts ``code``: six digits are an authenticator code, anything else a
    recovery code. Only that device is tried, so a mistyped code never counts as a failed
    attempt against (and throttles) the user's other device."""
    if code.isdigit() and len(code) == 6:
        devices: list[Any] = list(TOTPDevice.objects.filter(user=user, confirmed=True))
    else:
        devices = list(StaticDevice.objects.filter(user=user, confirmed=True))
    for device in devices:
        allowed, _ = device.verify_is_allowed()
        if allowed and device.verify_token(code):
            return device
    return None


@otp_exempt
@login_required
@require_http_methods(["GET", "POST"])
def two_factor_verify(request: HttpRequest) -> HttpResponse:
    """Second step after sign-in: a TOTP code or a single-use recovery code."""
    if otp_verified(request.user):
        return redirect(_safe_next(request))
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        device = _device_for_code(request.user, form.cleaned_data["token"])
        if device is not None:
            otp_login(request, device)
            if isinstance(device, StaticDevice):
                audit_event_create(actor=_actor(request), action="user.recovery_code_used", target_type="user",
                                   target_id=request.user.pk or "", payload={"remaining": device.token_set.count()})
            return redirect(_safe_next(request))
        form.add_error("token", "That code is not valid.")
    return render(request, "security/verify.html", {"form": form, "next": _safe_next(request)})


@login_required
def two_factor_security(request: HttpRequest) -> HttpResponse:
    """The account's security page: 2FA status, recovery codes left, actions."""
    user = request.user
    static = StaticDevice.objects.filter(user=user, name="recovery").first()
    return render(request, "security/security.html", {
        "totp": TOTPDevice.objects.filter(user=user, confirmed=True).first(),
        "recovery_left": static.token_set.count() if static else 0,
        "required": two_factor_required(user, getattr(request, "membership", None), getattr(request, "tenant", None)),
    })


@require_POST
def recovery_codes_regenerate(request: HttpRequest) -> HttpResponse:
    """New recovery codes (the old ones stop working); needs a verified session."""
    if not otp_verified(request.user):
        return redirect(f"{reverse('two_factor_verify')}?next={reverse('two_factor_security')}")
    codes = recovery_codes_issue(request.user)
    audit_event_create(actor=_actor(request), action="user.recovery_codes_regenerated", target_type="user",
                       target_id=request.user.pk or "")
    return render(request, "security/recovery_codes.html", {"codes": codes, "next": reverse("two_factor_security")})


@require_POST
def two_factor_disable(request: HttpRequest) -> HttpResponse:
    """Remove 2FA, unless it is required of this user here; needs a verified session."""
    user = request.user
    if not otp_verified(user):  # type: ignore[union-attr]
        return redirect(f"{reverse('two_factor_verify')}?next={reverse('two_factor_security')}")
    if two_factor_required(user, getattr(request, "membership", None), getattr(request, "tenant", None)):
        return render(request, "errors/error.html",
                      {"status": 403, "message": "Two-factor authentication is required for your account here."},
                      status=403)
    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).delete()
        StaticDevice.objects.filter(user=user).delete()
        audit_event_create(actor=_actor(request), action="user.2fa_disabled", target_type="user",
                           target_id=user.pk or "")
    return redirect("two_factor_security")
