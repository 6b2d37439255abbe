"""Console pages for tools (``/tools/``): the list, create and edit HTTP tools, delete, and a test
page that runs a tool once with sample arguments.

Permissions and tenant scoping are enforced by ``agents.tool_services`` and
``agents.tool_selectors``. Builtins are shown read-only. Secret headers are write-only: the
pages show their names, and the "replace secrets" field (blank keeps them) is never rendered
back.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from agents import tool_selectors as selectors
from agents import tool_services as services
from agents.models import Tool
from config.errors import Conflict, DomainError, ValidationFailed
from config.htmx import domain_errors_as_pages, render_page
from tenants.principal import request_principal

APPROVAL_CHOICES = [("", "Default (yes for write, no for read)"), ("yes", "Yes"), ("no", "No")]


def _json_text(value: Any) -> str:
    return "" if value is None else json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


class JSONField(forms.CharField):
    """A textarea holding JSON: the parsed value (``None`` when blank), or a clear error."""

    def __init__(self, *, rows: int = 4, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": rows, "class": "font-monospace"}))
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        text = (super().to_python(value) or "").strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}") from None


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders its value back (a secret typed into a form that failed is
    not echoed into the page)."""

    def format_value(self, value: Any) -> str | None:
        return None


class ToolForm(forms.Form):
    """Shape only; the rules live in ``agents.tool_services.tool_fields_clean``."""

    name = forms.CharField(
        max_length=64, help_text="Letters, digits, underscores or hyphens; the model calls the tool by this name."
    )
    description = forms.CharField(
        required=False,
        max_length=services.DESCRIPTION_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="What the tool does and when to use it, as the model reads it.",
    )
    side_effect = forms.ChoiceField(choices=Tool.SideEffect.choices, initial=Tool.SideEffect.READ)
    requires_approval = forms.ChoiceField(choices=APPROVAL_CHOICES, required=False, label="Needs approval")
    method = forms.ChoiceField(choices=[(m, m) for m in services.METHODS], initial="GET")
    url = forms.CharField(
        max_length=2000,
        label="URL",
        help_text="http(s) URL; {param} placeholders (properties of the parameters) may appear "
        "in the path and query only.",
    )
    timeout_seconds = forms.FloatField(initial=10.0, label="Timeout (seconds)", help_text="0.5 to 120.")
    max_response_bytes = forms.IntegerField(initial=65536, label="Max response bytes")
    parameters = JSONField(
        rows=8,
        label="Parameters (JSON Schema)",
        help_text='A JSON Schema object, e.g. {"type": "object", "properties": {"q": {"type": '
        '"string"}}, "required": ["q"]}. Blank: no arguments.',
    )
    headers = JSONField(rows=3, label="Headers (JSON)", help_text='Plain headers, e.g. {"Accept": "application/json"}.')
    secret_headers = JSONField(
        rows=2,
        label="Secret headers (JSON)",
        widget=WriteOnlyTextarea(attrs={"rows": 2}),
        help_text='Write-only, stored encrypted, e.g. {"Authorization": "Bearer ..."}.',
    )
    clear_secret_headers = forms.BooleanField(required=False, label="Remove the stored secret headers")
    body_template = JSONField(
        rows=4,
        label="Body template (JSON)",
        help_text='POST, PUT and PATCH only; "{param}" strings become the arguments\' values.',
    )

    def __init__(self, *args: Any, creating: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if creating:
            del self.fields["clear_secret_headers"]
        else:
            self.fields["secret_headers"].label = "Replace secret headers (JSON)"
            self.fields["secret_headers"].help_text = (
                "Write-only. Blank keeps the stored ones; a JSON object replaces them all."
            )
        for field in self.fields.values():
            widget = field.widget
            css = "form-check-input" if isinstance(widget, forms.CheckboxInput) else "form-control"
            if isinstance(widget, forms.Select):
                css = "form-select"
            widget.attrs["class"] = f"{widget.attrs.get('class', '')} {css}".strip()
        self.fields["secret_headers"].widget.attrs["autocomplete"] = "off"

    def tool_fields(self) -> dict[str, Any]:
        """The cleaned fields as ``tool_create``/``tool_update`` keywords (secrets left out)."""
        data = self.cleaned_data
        approval = {"": None, "yes": True, "no": False}[data.get("requires_approval") or ""]
        return {
            "name": data["name"],
            "description": data["description"],
            "side_effect": data["side_effect"],
            "requires_approval": approval,
            "method": data["method"],
            "url": data["url"],
            "timeout_seconds": data["timeout_seconds"],
            "max_response_bytes": data["max_response_bytes"],
            "parameters": data["parameters"],
            "headers": data["headers"] or {},
            "body_template": data["body_template"],
        }

    def add_domain_error(self, exc: DomainError) -> None:
        """Show a service's error on the field it names, or above the form."""
        details = exc.details if isinstance(exc.details, dict) else {}
        field = details.get("field")
        if isinstance(exc, ValidationFailed | Conflict) and field in self.fields:
            self.add_error(field, exc.message)
        else:
            self.add_error(None, exc.message)


def _initial(tool: Tool) -> dict[str, Any]:
    return {
        "name": tool.name,
        "description": tool.description,
        "side_effect": tool.side_effect,
        "requires_approval": "yes" if tool.requires_approval else "no",
        "method": tool.method or "GET",
        "url": tool.url,
        "timeout_seconds": tool.timeout_seconds,
        "max_response_bytes": tool.max_response_bytes,
        "parameters": _json_text(tool.parameters),
        "headers": _json_text(tool.headers or {}),
        "body_template": _json_text(tool.body_template),
    }


@require_GET
@domain_errors_as_pages
def tool_list(request: HttpRequest) -> HttpResponse:
    """Every tool (builtins first) with its kind, side effect, approval and the active agents
    that use it."""
    principal = request_principal(request)
    tools = sorted(selectors.tool_list(principal=principal), key=lambda t: (t.kind != Tool.Kind.BUILTIN, t.name))
    users = services.tool_active_users()
    rows = [{"tool": t, "used_by": users.get(t.name, [])} for t in tools]
    return render_page(
        request,
        "agents/tool_list.html",
        {"rows": rows, "can_write": principal.can("tools:write")},
        partial="tool-table",
    )


@sensitive_post_parameters("secret_headers")
@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def tool_create(request: HttpRequest) -> HttpResponse:
    """The new-tool form; creates an HTTP tool and opens it."""
    principal = request_principal(request)
    principal.require("tools:write")
    form = ToolForm(
        request.POST or None, initial={"parameters": _json_text(services.DEFAULT_PARAMETERS), "headers": "{}"}
    )
    if request.method == "POST" and form.is_valid():
        try:
            tool = services.tool_create(
                principal=principal, secret_headers=form.cleaned_data["secret_headers"], **form.tool_fields()
            )
        except DomainError as exc:
            form.add_domain_error(exc)
        else:
            messages.success(request, f"Tool “{tool.name}” created.")
            return redirect("tool_edit", tool_id=tool.pk)
    return render(
        request, "agents/tool_form.html", {"form": form, "tool": None}, status=422 if request.method == "POST" else 200
    )


@sensitive_post_parameters("secret_headers")
@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def tool_edit(request: HttpRequest, tool_id: int) -> HttpResponse:
    """A tool: read-only for builtins and for members without ``tools:write``, else the edit form.
    A blank "replace secret headers" keeps the stored ones."""
    principal = request_principal(request)
    tool = selectors.tool_get(principal=principal, tool_id=tool_id)
    editable = tool.kind == Tool.Kind.HTTP and principal.can("tools:write")
    form = None
    if editable:
        form = ToolForm(request.POST if request.method == "POST" else None, initial=_initial(tool), creating=False)
        if request.method == "POST" and form.is_valid():
            secrets = form.cleaned_data["secret_headers"]
            if form.cleaned_data["clear_secret_headers"]:
                secrets = {}
            try:
                services.tool_update(principal=principal, tool=tool, secret_headers=secrets, **form.tool_fields())
            except DomainError as exc:
                form.add_domain_error(exc)
            else:
                messages.success(request, f"Tool “{form.cleaned_data['name']}” saved.")
                return redirect("tool_edit", tool_id=tool.pk)
    elif request.method == "POST":
        principal.require("tools:write")
        raise Conflict(f"“{tool.name}” is a builtin tool and cannot be changed.", code="builtin_tool")
    used_by = services.tool_active_users([tool.name]).get(tool.name, [])
    return render(
        request,
        "agents/tool_form.html",
        {
            "form": form,
            "tool": tool,
            "used_by": used_by,
            "parameters_text": _json_text(tool.parameters),
            "secret_header_names": services.tool_secret_header_names(tool),
            "can_write": principal.can("tools:write"),
        },
        status=422 if form is not None and form.errors else 200,
    )


@require_POST
@domain_errors_as_pages
def tool_delete(request: HttpRequest, tool_id: int) -> HttpResponse:
    """Delete a tool after the member types its name; a tool in use stays, with the reason shown."""
    principal = request_principal(request)
    principal.require("tools:write")
    tool = selectors.tool_get(principal=principal, tool_id=tool_id)
    if request.POST.get("confirm") != tool.name:
        messages.error(request, "Type the tool's name to confirm its deletion.")
        return redirect("tool_edit", tool_id=tool_id)
    try:
        services.tool_delete(principal=principal, tool=tool)
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("tool_edit", tool_id=tool_id)
    messages.success(request, f"Tool “{tool.name}” deleted.")
    return redirect("tool_list")


def _sample_arguments(tool: Tool) -> str:
    """``{}`` with each required property of the schema given a placeholder of its type."""
    schema = tool.parameters or {}
    properties = schema.get("properties") or {}
    samples: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}
    sample: dict[str, Any] = {}
    for name in schema.get("required") or []:
        spec = properties.get(name) if isinstance(name, str) else None
        if isinstance(spec, dict):
            sample[name] = samples.get(str(spec.get("type")))
    return _json_text(sample)


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def tool_test(request: HttpRequest, tool_id: int) -> HttpResponse:
    """Run a tool once with sample arguments (JSON) and show the outcome: the request sent
    (secret header values redacted) and the response."""
    principal = request_principal(request)
    principal.require("tools:write")
    tool = selectors.tool_get(principal=principal, tool_id=tool_id)
    text = request.POST.get("arguments", "") if request.method == "POST" else _sample_arguments(tool)
    error, outcome = "", None
    if request.method == "POST":
        try:
            arguments = json.loads(text or "{}")
        except ValueError as exc:
            error = f"The arguments are not valid JSON: {exc}"
        else:
            if not isinstance(arguments, dict):
                error = "The arguments must be a JSON object."
            else:
                try:
                    outcome = services.tool_test_run(principal=principal, tool=tool, arguments=arguments)
                except ValidationFailed as exc:
                    error = exc.message
    return render(
        request,
        "agents/tool_test.html",
        {
            "tool": tool,
            "arguments": text,
            "error": error,
            "outcome": outcome,
            "request_text": _json_text(outcome.request) if outcome and outcome.request is not None else "",
            "response_text": _json_text(outcome.response) if outcome and outcome.response is not None else "",
        },
        status=422 if error else 200,
    )
