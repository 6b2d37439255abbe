"""Staff admin pages on the public host: tenants, domains, users, memberships, plans, keys,
model endpoints, the egress allowlist.

The admin site is django-otp's ``OTPAdminSite``: staff sign in with e-mail, password and a
TOTP code. Every change made here is recorded in the public audit chain through
``audit_event_create`` (and, for a tenant's members, in that tenant's chain too).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, cast

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.views import redirect_to_login
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.views.decorators.debug import sensitive_post_parameters
from django_otp.admin import OTPAdminSite

from compliance.services import audit_event_create
from config.crypto import secret_encrypt
from config.errors import DomainError
from tenants.models import ApiKey, Domain, EgressAllowRule, Membership, ModelEndpoint, Plan, Tenant, User
from tenants.principal import Principal
from tenants.services.keys import api_key_revoke, api_keys_fit_to_role
from tenants.services.provisioning import (
    schema_name_for,
    slug_validate,
    tenant_create,
    tenant_delete,
    tenant_resume,
    tenant_suspend,
)


class PortalAdminSite(OTPAdminSite):
    """The staff pages. Like ``OTPAdminSite`` they need a session verified by a second factor;
    signing in goes through the portal's own sign-in and two-factor pages (one flow for staff and
    members) instead of django-otp's two-step admin form."""

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if request.user.is_authenticated and not request.user.is_staff:
            return render(request, "errors/error.html",
                          {"status": 403, "message": "The staff pages are for platform staff."}, status=403)
        target = request.GET.get("next") or reverse("admin:index")
        return redirect_to_login(target, login_url=reverse("account_login"))

    def get_urls(self) -> list[Any]:
        # Built when the URLconf loads, after every app's admin module registered its models
        # (allauth's and django-otp's come after this app in INSTALLED_APPS).
        _unregister_unaudited()
        return super().get_urls()


admin.site.__class__ = PortalAdminSite
admin.site.site_header = "Agent Ops Portal — staff"
admin.site.site_title = "Agent Ops Portal staff"


def _unregister_unaudited() -> None:
    """Library admin pages that would change rows without an audit event. Staff reset a user's
    two-factor devices with the audited action on the user page instead. Single sign-on builds
    its OIDC apps per request from each tenant's settings and stores no tokens, so allauth's
    SocialApp and SocialToken pages would only mislead."""
    from allauth.account.models import EmailAddress
    from allauth.socialaccount.models import SocialApp, SocialToken
    from django.contrib.auth.models import Group
    from django_otp.plugins.otp_static.models import StaticDevice
    from django_otp.plugins.otp_totp.models import TOTPDevice

    for model in (Group, EmailAddress, TOTPDevice, StaticDevice, SocialApp, SocialToken):
        if admin.site.is_registered(model):
            admin.site.unregister(model)

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def _staff(request: HttpRequest) -> Principal:
    return Principal.for_staff(request.user)  # type: ignore[arg-type]


def _changes(form: forms.ModelForm[Any]) -> dict[str, Any]:
    return {name: str(form.cleaned_data.get(name)) for name in form.changed_data if "password" not in name}


class AuditedAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Records staff saves and deletions in the public audit chain (bulk deletes one by one)."""

    audit_target = ""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_event_create(actor=_staff(request), action=f"{self.audit_target}.{'changed' if change else 'created'}",
                           target_type=self.audit_target, target_id=obj.pk, payload=_changes(form), schema="public")

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        pk = obj.pk
        super().delete_model(request, obj)
        audit_event_create(actor=_staff(request), action=f"{self.audit_target}.deleted",
                           target_type=self.audit_target, target_id=pk, payload={"repr": str(obj)},
                           schema="public")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset:
            self.delete_model(request, obj)


class TenantAddForm(forms.ModelForm):  # type: ignore[type-arg]
    owner_email = forms.EmailField(help_text="The first owner. A new account is created if none exists.")
    region = forms.ChoiceField(choices=[])

    class Meta:
        model = Tenant
        fields = ("slug", "name", "plan", "region", "require_2fa")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cast(forms.ChoiceField, self.fields["region"]).choices = [(r, r) for r in settings.TENANT_REGIONS]

    def clean_slug(self) -> str:
        slug = self.cleaned_data["slug"]
        try:
            slug_validate(slug)
        except DomainError as exc:
            raise forms.ValidationError(exc.message) from exc
        host = f"{slug}.{settings.BASE_DOMAIN}"
        if Domain.objects.filter(domain=host).exists():
            raise forms.ValidationError(f"The host {host} is already routed to a tenant.")
        return slug


class DeleteTenantForm(forms.Form):
    confirm = forms.CharField(label="Type the tenant's slug to confirm")


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("slug", "name", "status", "plan", "region", "require_2fa", "created_at", "host_link")
    list_filter = ("status", "plan", "region")
    search_fields = ("slug", "name")
    readonly_fields = ("slug", "schema_name", "status", "created_at", "suspended_at", "suspended_reason",
                       "delete_link")
    fields = ("slug", "schema_name", "name", "plan", "region", "require_2fa", "status", "suspended_at",
              "suspended_reason", "created_at", "delete_link")
    actions = ("suspend_selected", "resume_selected")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return super().get_queryset(request).exclude(schema_name=settings.PUBLIC_SCHEMA_NAME).select_related("plan")

    def get_form(self, request: HttpRequest, obj: Tenant | None = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = TenantAddForm
            kwargs["fields"] = ("slug", "name", "plan", "region", "require_2fa", "owner_email")
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Tenant | None = None) -> Any:
        if obj is None:
            return ("slug", "name", "plan", "region", "require_2fa", "owner_email")
        return self.fields

    def get_readonly_fields(self, request: HttpRequest, obj: Tenant | None = None) -> Any:
        return () if obj is None else self.readonly_fields

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        # Deletion drops a schema: it goes through delete_tenant_view, which asks for the slug.
        return False

    @admin.display(description="Host")
    def host_link(self, obj: Tenant) -> str:
        return format_html('<a href="http://{}:{}/">{}</a>', obj.primary_host, settings.PUBLIC_PORT or "80",
                           obj.primary_host)

    @admin.display(description="Delete")
    def delete_link(self, obj: Tenant) -> str:
        if not obj.pk:
            return "-"
        url = reverse("admin:tenants_tenant_delete_tenant", args=[obj.pk])
        return format_html('<a class="deletelink" href="{}">Delete this tenant and its schema…</a>', url)

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            audit_event_create(actor=_staff(request), action="tenant.changed", target_type="tenant",
                               target_id=obj.pk, payload=_changes(form), schema="public")
            return
        result = tenant_create(
            actor=_staff(request), slug=obj.slug, name=obj.name, owner_email=form.cleaned_data["owner_email"],
            plan=obj.plan, region=form.cleaned_data["region"], require_2fa=obj.require_2fa,
        )
        obj.pk = result.tenant.pk
        obj.schema_name = schema_name_for(obj.slug)
        obj._state.adding = False
        messages.info(request, f"Provisioned {result.tenant.primary_host}; owner {result.owner.email}"
                               + (" (new account: send them a password-reset link)" if result.owner_created else ""))

    def get_urls(self) -> list[Any]:
        return [
            path("<int:pk>/delete-tenant/", self.admin_site.admin_view(self.delete_tenant_view),
                 name="tenants_tenant_delete_tenant"),
            *super().get_urls(),
        ]

    def delete_tenant_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Delete a tenant after the staff member types its slug."""
        tenant = get_object_or_404(Tenant.objects.exclude(schema_name=settings.PUBLIC_SCHEMA_NAME), pk=pk)
        form = DeleteTenantForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                tenant_delete(actor=_staff(request), tenant=tenant, confirm=form.cleaned_data["confirm"])
            except DomainError as exc:
                form.add_error("confirm", exc.message)
            else:
                messages.success(request, f"Tenant {tenant.slug} and its schema were deleted.")
                return HttpResponseRedirect(reverse("admin:tenants_tenant_changelist"))
        context = {**self.admin_site.each_context(request), "tenant": tenant, "form": form,
                   "opts": self.model._meta, "title": f"Delete tenant {tenant.slug}"}
        return render(request, "admin/tenants/delete_tenant.html", context)

    @admin.action(description="Suspend selected tenants")
    def suspend_selected(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset:
            tenant_suspend(actor=_staff(request), tenant=tenant, reason="suspended by staff")
        messages.success(request, f"Suspended {queryset.count()} tenant(s).")

    @admin.action(description="Resume selected tenants")
    def resume_selected(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset:
            tenant_resume(actor=_staff(request), tenant=tenant)
        messages.success(request, f"Resumed {queryset.count()} tenant(s).")


class DomainForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Domain
        fields = ("domain", "tenant", "is_primary")

    def clean_domain(self) -> str:
        domain = self.cleaned_data["domain"].strip().lower().rstrip(".")
        if not HOSTNAME_RE.match(domain):
            raise forms.ValidationError("Not a valid host name.")
        if domain == settings.PUBLIC_HOST:
            raise forms.ValidationError("The public host cannot be routed to a tenant.")
        return domain


@admin.register(Domain)
class DomainAdmin(AuditedAdmin):
    form = DomainForm
    audit_target = "domain"
    list_display = ("domain", "tenant", "is_primary")
    search_fields = ("domain", "tenant__slug")
    list_select_related = ("tenant",)

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "tenant":
            kwargs["queryset"] = Tenant.objects.exclude(schema_name=settings.PUBLIC_SCHEMA_NAME)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    audit_target = "plan"
    list_display = ("code", "name", "monthly_fee", "currency", "max_members", "max_agents",
                    "api_requests_per_minute", "chat_turns_per_minute", "kb_searches_per_minute",
                    "monthly_token_quota", "is_active")
    # An empty limit is unlimited; the rate limits apply per API key and per member (config.ratelimit).
    fieldsets = (
        (None, {"fields": ("code", "name", "description", "is_active")}),
        ("Price", {"fields": ("monthly_fee", "currency")}),
        ("Seats and storage (empty = unlimited)", {"fields": ("max_members", "max_agents", "max_storage_mb")}),
        ("Rate limits per minute, per API key or member (empty = unlimited)",
         {"fields": ("api_requests_per_minute", "chat_turns_per_minute", "kb_searches_per_minute")}),
        ("Quota (empty = unlimited)", {"fields": ("monthly_token_quota",)}),
    )


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Membership
    fk_name = "user"
    extra = 0
    fields = ("tenant", "role", "created_at")
    readonly_fields = ("tenant", "role", "created_at")
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    ordering = ("email",)
    list_display = ("email", "name", "is_staff", "is_active", "date_joined", "last_login")
    list_filter = ("is_staff", "is_active")
    search_fields = ("email", "name")
    inlines = (MembershipInline,)
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Profile", {"fields": ("name",)}),
        ("Access", {"fields": ("is_active", "is_staff", "is_superuser")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "password1", "password2", "is_staff")}),)
    readonly_fields = ("last_login", "date_joined")
    actions = ("reset_two_factor",)

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_event_create(actor=_staff(request), action=f"user.{'changed' if change else 'created'}",
                           target_type="user", target_id=obj.pk, payload={"email": obj.email, **_changes(form)},
                           schema="public")
        if not obj.is_active:
            # A deactivated account's keys die in every tenant (issue #28).
            api_keys_fit_to_role(actor=_staff(request), user=obj, tenant=None, role=None, reason="user_deactivated")

    def delete_model(self, request: HttpRequest, obj: User) -> None:
        pk, email = obj.pk, obj.email
        super().delete_model(request, obj)
        audit_event_create(actor=_staff(request), action="user.deleted", target_type="user", target_id=pk,
                           payload={"email": email}, schema="public")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            self.delete_model(request, user)

    @admin.action(description="Reset two-factor authentication (lost device)")
    def reset_two_factor(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        from django.db import transaction
        from django_otp.plugins.otp_static.models import StaticDevice
        from django_otp.plugins.otp_totp.models import TOTPDevice

        for user in queryset:
            with transaction.atomic():
                TOTPDevice.objects.filter(user=user).delete()
                StaticDevice.objects.filter(user=user).delete()
                audit_event_create(actor=_staff(request), action="user.2fa_reset_by_staff", target_type="user",
                                   target_id=user.pk, payload={"email": user.email}, schema="public")
        messages.success(request, f"Two-factor authentication reset for {queryset.count()} user(s); "
                                  "they enrol again at their next sign-in.")


@admin.register(Membership)
class MembershipAdmin(AuditedAdmin):
    audit_target = "membership"
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant")
    search_fields = ("user__email", "tenant__slug")
    list_select_related = ("user", "tenant")
    autocomplete_fields = ("user",)
    # The tenant's identity provider owns it (tenants.scim); staff editing it would unlink the person.
    readonly_fields = ("scim_external_id",)

    def save_model(self, request: HttpRequest, obj: Membership, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_event_create(actor=_staff(request), action=f"member.{'role_changed' if change else 'added'}_by_staff",
                           target_type="membership", target_id=obj.pk,
                           payload={"email": obj.user.email, "role": obj.role}, schema=obj.tenant.schema_name)
        api_keys_fit_to_role(actor=_staff(request), user=obj.user, tenant=obj.tenant, role=obj.role,
                             reason="role_changed")

    def delete_model(self, request: HttpRequest, obj: Membership) -> None:
        schema, pk, email = obj.tenant.schema_name, obj.pk, obj.user.email
        super().delete_model(request, obj)
        audit_event_create(actor=_staff(request), action="member.removed_by_staff", target_type="membership",
                           target_id=pk, payload={"email": email}, schema=schema)
        api_keys_fit_to_role(actor=_staff(request), user=obj.user, tenant=obj.tenant, role=None,
                             reason="member_removed")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("prefix", "name", "tenant", "state", "created_at", "last_used_at", "expires_at")
    list_filter = ("tenant",)
    search_fields = ("key_id", "name", "tenant__slug")
    list_select_related = ("tenant", "created_by", "acting_user")
    readonly_fields = ("tenant", "name", "key_id", "scopes", "created_by", "acting_user", "created_at", "expires_at",
                       "last_used_at", "revoked_at")
    exclude = ("secret_hash",)
    actions = ("revoke_selected",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke selected keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        staff = Principal(kind="system", tenant=None, permissions=frozenset(), label=f"staff:{request.user}")
        for key in queryset:
            api_key_revoke(principal=staff, key=key)
        messages.success(request, f"Revoked {queryset.count()} key(s).")


class ModelEndpointForm(forms.ModelForm):  # type: ignore[type-arg]
    """A platform endpoint. The API key is write-only: the input never carries the stored key,
    blank keeps it, and "clear key" removes it. The rules are the tenants' ones
    (``agents.endpoints.model_endpoint_validate``)."""

    api_key = forms.CharField(label="API key", required=False, strip=True,
                              widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
                              help_text="Write-only: stored encrypted, never shown. Blank keeps the current key.")
    clear_api_key = forms.BooleanField(label="Clear key", required=False, help_text="Remove the stored key.")
    # Plain text: the http(s) rule is model_endpoint_validate's, and no scheme is guessed.
    api_base = forms.CharField(label="API base", max_length=500, required=False,
                               help_text="OpenAI-compatible base URL (http or https); empty for the provider's.")

    class Meta:
        model = ModelEndpoint
        fields = ("name", "model", "api_base", "tier", "priority", "context_window", "input_price_per_mtok",
                  "output_price_per_mtok", "currency", "timeout_seconds", "enabled")
        # A CharField, not the model's URLField (which would guess a scheme for "host/v1").
        field_classes: ClassVar = {"api_base": forms.CharField}

    def clean(self) -> dict[str, Any]:
        from agents.endpoints import EDITABLE_FIELDS, model_endpoint_validate
        from config.errors import ValidationFailed

        cleaned = super().clean() or {}
        if cleaned.get("api_key") and cleaned.get("clear_api_key"):
            self.add_error("clear_api_key", "Give a new key or clear it, not both.")
        present = {name: cleaned[name] for name in EDITABLE_FIELDS if name in cleaned and name not in self.errors}
        try:
            cleaned.update(model_endpoint_validate(present))
        except ValidationFailed as exc:
            for name, message in (exc.details or {}).items():
                self.add_error(name if name in self.fields else None, str(message))
        return cleaned


@admin.register(ModelEndpoint)
class ModelEndpointAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Platform endpoints (``tenant`` null) are edited here; tenants' own endpoints are listed
    read-only (tenants manage them in their console). Every change is audited in the public
    chain with the changed fields' values, and for the key only ``"key": "set" | "cleared"``."""

    form = ModelEndpointForm
    list_display = ("name", "scope", "tier", "priority", "model", "api_base", "enabled", "has_key")
    list_filter = ("tier", "enabled", ("tenant", admin.EmptyFieldListFilter))
    search_fields = ("name", "model", "tenant__slug")
    list_select_related = ("tenant",)
    ordering = ("tenant__slug", "tier", "priority", "name")
    fields = ("name", "model", "api_base", "api_key", "clear_api_key", "tier", "priority", "context_window",
              "input_price_per_mtok", "output_price_per_mtok", "currency", "timeout_seconds", "enabled")
    readonly_fields = ()

    @method_decorator(sensitive_post_parameters("api_key"))
    def changeform_view(self, request: HttpRequest, object_id: str | None = None, form_url: str = "",
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # Error reports (and the debug page) must not show the submitted key.
        return super().changeform_view(request, object_id, form_url, extra_context)

    @admin.display(description="Scope", ordering="tenant__slug")
    def scope(self, obj: ModelEndpoint) -> str:
        return obj.tenant.slug if obj.tenant_id else "platform"  # type: ignore[union-attr]

    @admin.display(description="Has key", boolean=True)
    def has_key(self, obj: ModelEndpoint) -> bool:
        return obj.has_api_key

    def get_fields(self, request: HttpRequest, obj: ModelEndpoint | None = None) -> Any:
        if obj is not None and obj.tenant_id is not None:
            return ("tenant", *(f for f in self.fields if f not in ("api_key", "clear_api_key")), "has_key")
        return self.fields

    def get_readonly_fields(self, request: HttpRequest, obj: ModelEndpoint | None = None) -> Any:
        if obj is not None and obj.tenant_id is not None:
            return self.get_fields(request, obj)
        return ()

    def has_change_permission(self, request: HttpRequest, obj: ModelEndpoint | None = None) -> bool:
        # A tenant's own endpoint is the tenant's to change, through its console or API.
        if obj is not None and obj.tenant_id is not None:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: ModelEndpoint | None = None) -> bool:
        if obj is not None and obj.tenant_id is not None:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: ModelEndpoint, form: Any, change: bool) -> None:
        from django.db import transaction
        from django.utils import timezone

        from agents.endpoints import audit_changes

        new_key, clear = form.cleaned_data.get("api_key") or "", form.cleaned_data.get("clear_api_key", False)
        key_change = None
        if new_key:
            obj.api_key_encrypted, key_change = secret_encrypt(new_key), "set"
        elif clear and obj.api_key_encrypted:
            obj.api_key_encrypted, key_change = "", "cleared"
        obj.tenant = None  # staff create and edit platform endpoints only
        obj.updated_at = timezone.now()
        changed = {name: form.cleaned_data.get(name) for name in form.changed_data}
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            audit_event_create(actor=_staff(request), action=f"model_endpoint.{'changed' if change else 'created'}",
                               target_type="model_endpoint", target_id=obj.pk,
                               payload={"name": obj.name, **audit_changes(changed, key_change=key_change)},
                               schema="public")

    def delete_model(self, request: HttpRequest, obj: ModelEndpoint) -> None:
        from django.db import transaction

        pk, name = obj.pk, obj.name
        with transaction.atomic():
            super().delete_model(request, obj)
            audit_event_create(actor=_staff(request), action="model_endpoint.deleted", target_type="model_endpoint",
                               target_id=pk, payload={"name": name}, schema="public")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelEndpoint]) -> None:
        for endpoint in queryset.filter(tenant__isnull=True):
            self.delete_model(request, endpoint)


class EgressAllowRuleForm(forms.ModelForm):  # type: ignore[type-arg]
    """A rule is stored as typed once ``config.egress.allow_rule_parse`` reads it."""

    class Meta:
        model = EgressAllowRule
        fields = ("target", "port", "description", "enabled")

    def clean(self) -> dict[str, Any]:
        from config.egress import allow_rule_parse

        cleaned = super().clean() or {}
        target, port = (cleaned.get("target") or "").strip(), cleaned.get("port")
        if target:
            try:
                allow_rule_parse(target, port)
            except ValueError as exc:
                self.add_error("target", str(exc))
            cleaned["target"] = target
        return cleaned


@admin.register(EgressAllowRule)
class EgressAllowRuleAdmin(AuditedAdmin):
    """The staff egress allowlist (besides ``EGRESS_ALLOWLIST``): each rule opens a private
    address, network or host name, on 80/443 or on the one port it names, to every tenant's
    model endpoints (and later HTTP tools, webhooks, OIDC discovery). Changes are audited."""

    form = EgressAllowRuleForm
    audit_target = "egress_allow_rule"
    list_display = ("target", "port", "enabled", "description", "created_at")
    list_filter = ("enabled",)
    search_fields = ("target", "description")
