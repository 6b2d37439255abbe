"""Console forms. They validate shape only; rules live in the services."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from django import forms
from django.contrib.auth.password_validation import validate_password
from django.utils import timezone

from tenants.roles import PERMISSIONS, Role

EXPIRY_CHOICES = [
    ("", "Never"),
    ("7", "7 days"),
    ("30", "30 days"),
    ("90", "90 days"),
    ("365", "1 year"),
]


class InviteForm(forms.Form):
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=Role.choices)

    def __init__(self, *args: Any, assignable: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if assignable is not None:
            cast(forms.ChoiceField, self.fields["role"]).choices = [
                (v, label) for v, label in Role.choices if v in assignable
            ]
        self.fields["role"].initial = Role.VIEWER


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(choices=[], widget=forms.CheckboxSelectMultiple)
    expires_in_days = forms.ChoiceField(choices=EXPIRY_CHOICES, required=False, label="Expires")

    def __init__(self, *args: Any, held: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Offer only the scopes the creator holds: a key can never exceed its maker.
        cast(forms.ChoiceField, self.fields["scopes"]).choices = [
            (p, f"{p} — {d}") for p, d in PERMISSIONS.items() if p in held
        ]

    def expires_at(self) -> dt.datetime | None:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + dt.timedelta(days=int(days)) if days else None


class TenantSettingsForm(forms.Form):
    require_2fa = forms.BooleanField(
        required=False, label="Require two-factor authentication for owners and admins"
    )


class BillingSettingsForm(forms.Form):
    """The tenant's billing settings (``tenants.services.billing_settings`` checks the values:
    the IANA name, the egress guard on the URL, the secret's length)."""

    time_zone = forms.CharField(max_length=64, label="Time zone",
                                help_text="IANA name, e.g. Europe/Berlin: budget periods and invoice months follow it.")
    # A CharField, not a URLField: the egress guard's reason is the message a person needs.
    alert_webhook_url = forms.CharField(max_length=500, required=False, label="Alert webhook URL",
                                        help_text="Budget alerts are POSTed here, signed. Empty removes the webhook.")
    alert_webhook_secret = forms.CharField(
        max_length=256, required=False, strip=True, label="Webhook secret",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave empty to keep the current secret.",
    )
    generate_secret = forms.BooleanField(required=False, label="Generate a new random secret (shown once)")


class AcceptInvitationForm(forms.Form):
    name = forms.CharField(max_length=200, required=False)
    password1 = forms.CharField(widget=forms.PasswordInput, label="Password")
    password2 = forms.CharField(widget=forms.PasswordInput, label="Password again")

    def __init__(self, *args: Any, email: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.email = email

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password1") != data.get("password2"):
            raise forms.ValidationError("The two passwords differ.")
        if data.get("password1"):
            from tenants.models import User

            validate_password(data["password1"], user=User(email=self.email, name=data.get("name", "")))
        return data


class TokenForm(forms.Form):
    token = forms.CharField(
        max_length=16,
        label="Code",
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True}),
    )

    def clean_token(self) -> str:
        return self.cleaned_data["token"].replace(" ", "").strip()


class SsoSettingsForm(forms.Form):
    """The tenant's single sign-on settings, as text fields; ``tenants.services.sso`` checks the
    values (the egress guard on the issuer, scopes, roles, domains). ``role_mapping`` is one
    ``group = role`` per line; scopes and domains are separated by spaces or commas."""

    enabled = forms.BooleanField(required=False, label="Single sign-on is on")
    display_name = forms.CharField(max_length=100, required=False, label="Identity provider name",
                                   help_text='The login page shows "Sign in with <name>".')
    # A CharField, not a URLField: the egress guard's reason is the message a person needs.
    issuer_url = forms.CharField(max_length=500, required=False, label="Issuer URL",
                                 help_text="Discovery is read from <issuer>/.well-known/openid-configuration.")
    client_id = forms.CharField(max_length=255, required=False, label="Client id")
    client_secret = forms.CharField(
        max_length=1024, required=False, strip=True, label="Client secret",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave empty to keep the current secret.",
    )
    scopes = forms.CharField(max_length=1000, required=False, label="Scopes", help_text="openid is always included.")
    groups_claim = forms.CharField(max_length=100, label="Groups claim",
                                   help_text="The claim whose values are mapped to roles, e.g. groups.")
    role_mapping = forms.CharField(max_length=20000, required=False, widget=forms.Textarea(attrs={"rows": 4}),
                                   label="Group to role mapping", help_text="One 'group = role' per line.")
    default_role = forms.CharField(max_length=16, required=False, label="Role when no group maps")
    allowed_email_domains = forms.CharField(max_length=5000, required=False, label="Allowed e-mail domains")
    enforce_sso = forms.BooleanField(required=False, label="Refuse password sign-in to members (owners excepted)")

    @staticmethod
    def _words(value: str) -> list[str]:
        return [word for word in value.replace(",", " ").split() if word]

    def clean_scopes(self) -> list[str]:
        return self._words(self.cleaned_data.get("scopes") or "")

    def clean_allowed_email_domains(self) -> list[str]:
        return self._words(self.cleaned_data.get("allowed_email_domains") or "")

    def clean_role_mapping(self) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for number, line in enumerate((self.cleaned_data.get("role_mapping") or "").splitlines(), start=1):
            if not line.strip():
                continue
            group, equals, role = line.rpartition("=")
            if not equals or not group.strip():
                raise forms.ValidationError(f"Line {number} is not 'group = role'.")
            mapping[group.strip()] = role.strip()
        return mapping
