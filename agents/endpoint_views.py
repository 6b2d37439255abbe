"""Console pages for model endpoints: the platform's (read-only) and the tenant's own.

Every view runs behind ``TenantAccessMiddleware`` (``request.principal`` is the member);
permissions and tenant scoping are enforced again by ``agents.endpoints``. The API key field is
write-only: it is never rendered back, and leaving it blank keeps the stored key.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_POST

from agents import endpoints as services
from config.errors import DomainError, ValidationFailed
from config.htmx import domain_errors_as_pages, is_fragment, render_page
from tenants.models import ModelEndpoint
from tenants.principal import request_principal
from tenants.services.endpoint_probe import model_endpoint_test as probe_service


class ModelEndpointForm(forms.Form):
    """Shape only; the rules live in ``agents.endpoints.model_endpoint_validate``."""

    name = forms.CharField(max_length=100)
    model = forms.CharField(max_length=200, help_text="litellm model string, e.g. openai/gpt-4o-mini")
    api_base = forms.CharField(max_length=500, required=False, label="API base URL",
                               help_text="OpenAI-compatible base URL (http or https); empty for the provider's.")
    api_key = forms.CharField(required=False, label="API key", strip=True,
                              widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
                              help_text="Write-only. Leave blank to keep the current key.")
    clear_api_key = forms.BooleanField(required=False, label="Clear the stored key")
    tier = forms.ChoiceField(choices=ModelEndpoint.Tier.choices, initial=ModelEndpoint.Tier.STANDARD)
    priority = forms.IntegerField(min_value=0, initial=100, help_text="Lower is tried first within the tier.")
    context_window = forms.IntegerField(min_value=services.MIN_CONTEXT_WINDOW, initial=8192,
                                        help_text="Tokens the model accepts in all.")
    input_price_per_mtok = forms.DecimalField(min_value=0, max_digits=12, decimal_places=6, initial=0,
                                              label="Input price per million tokens")
    output_price_per_mtok = forms.DecimalField(min_value=0, max_digits=12, decimal_places=6, initial=0,
                                               label="Output price per million tokens")
    currency = forms.CharField(max_length=3, min_length=3, initial="USD")
    timeout_seconds = forms.FloatField(min_value=0.1, max_value=3600, initial=60.0, label="Timeout (seconds)")
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, creating: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if creating:
            del self.fields["clear_api_key"]
            self.fields["api_key"].help_text = "Write-only: stored encrypted and never shown again."
        for field in self.fields.values():
            css = "form-check-input" if isinstance(field.widget, forms.CheckboxInput) else "form-control"
            if isinstance(field.widget, forms.Select):
                css = "form-select"
            field.widget.attrs.setdefault("class", css)

    def endpoint_fields(self) -> dict[str, Any]:
        """The cleaned editable fields (without the key fields)."""
        return {name: self.cleaned_data[name] for name in services.EDITABLE_FIELDS}

    def add_domain_error(self, exc: DomainError) -> None:
        """Show a service's error on the fields it names, or above the form."""
        details = exc.details if isinstance(exc, ValidationFailed) and isinstance(exc.details, dict) else {}
        named = {k: v for k, v in details.items() if k in self.fields}
        for field, message in named.items():
            self.add_error(field, str(message))
        if not named:
            self.add_error(None, exc.message)


def _initial(endpoint: ModelEndpoint) -> dict[str, Any]:
    return {name: getattr(endpoint, name) for name in services.EDITABLE_FIELDS}


@sensitive_post_parameters("api_key")
@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def model_endpoint_list(request: HttpRequest) -> HttpResponse:
    """The platform's endpoints (read-only) and the tenant's own; POST creates an own one."""
    principal = request_principal(request)
    form = ModelEndpointForm(request.POST or None)
    if request.method == "POST":
        principal.require("agents:write")
        if form.is_valid():
            try:
                endpoint = services.model_endpoint_create(principal=principal, api_key=form.cleaned_data["api_key"],
                                                          **form.endpoint_fields())
            except DomainError as exc:
                form.add_domain_error(exc)
            else:
                messages.success(request, f"Model endpoint “{endpoint.name}” created.")
                return redirect("model_endpoint_list")
    endpoints = list(services.model_endpoint_list(principal=principal))
    return render_page(request, "agents/endpoint_list.html", {
        "own": [e for e in endpoints if e.tenant_id is not None],
        "platform": [e for e in endpoints if e.tenant_id is None],
        "form": form, "can_write": principal.can("agents:write"),
    }, partial="endpoint-tables", status=422 if form.errors else 200)


@sensitive_post_parameters("api_key")
@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def model_endpoint_edit(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    """Edit an own endpoint. The key field starts empty: blank keeps the stored key."""
    principal = request_principal(request)
    principal.require("agents:write")
    endpoint = services.model_endpoint_get(principal=principal, endpoint_id=endpoint_id)
    if request.method == "POST":
        form = ModelEndpointForm(request.POST, creating=False)
        if form.is_valid():
            try:
                services.model_endpoint_update(principal=principal, endpoint=endpoint,
                                               api_key=form.cleaned_data["api_key"],
                                               clear_api_key=form.cleaned_data["clear_api_key"],
                                               **form.endpoint_fields())
            except DomainError as exc:
                form.add_domain_error(exc)
            else:
                messages.success(request, f"Model endpoint “{endpoint.name}” saved.")
                return redirect("model_endpoint_list")
        endpoint.refresh_from_db()
    else:
        form = ModelEndpointForm(initial=_initial(endpoint), creating=False)
    return render_page(request, "agents/endpoint_edit.html", {"endpoint": endpoint, "form": form},
                       status=422 if form.errors else 200)


@require_POST
@domain_errors_as_pages
def model_endpoint_delete(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    """Delete an own endpoint after the member types its name."""
    principal = request_principal(request)
    principal.require("agents:write")
    endpoint = services.model_endpoint_get(principal=principal, endpoint_id=endpoint_id)
    if request.POST.get("confirm") != endpoint.name:
        messages.error(request, "Type the endpoint's name to confirm its deletion.")
        return redirect("model_endpoint_edit", endpoint_id=endpoint_id)
    services.model_endpoint_delete(principal=principal, endpoint=endpoint)
    messages.success(request, f"Model endpoint “{endpoint.name}” deleted.")
    return redirect("model_endpoint_list")


@require_POST
@domain_errors_as_pages
def model_endpoint_test(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    """Probe an own endpoint now (one-token completion through the egress guard; audited): htmx
    gets the result fragment for the endpoint's row, a page without JavaScript a message."""
    principal = request_principal(request)
    principal.require("agents:write")
    endpoint = services.model_endpoint_get(principal=principal, endpoint_id=endpoint_id)
    result = probe_service(principal=principal, endpoint=endpoint)
    if is_fragment(request):
        return render_page(request, "agents/endpoint_list.html", {"endpoint": endpoint, "result": result},
                           partial="endpoint-probe")
    if result.ok:
        messages.success(request, f"Model endpoint “{endpoint.name}” answered in {result.latency_ms} ms.")
    else:
        messages.error(request, f"Model endpoint “{endpoint.name}” failed: {result.error}")
    return redirect("model_endpoint_list")
