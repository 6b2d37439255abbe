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
