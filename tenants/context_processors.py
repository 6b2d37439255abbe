"""Template context for the console layout: tenant, member, and the navigation they may see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse

from tenants.principal import Principal

# (url name, label, permission needed). Only sections that exist are listed here.
NAVIGATION: list[tuple[str, str, str]] = [
    ("dashboard", "Dashboard", "tenant:read"),
    ("agent_list", "Agents", "agents:read"),
    ("tool_list", "Tools", "tools:read"),
    ("chat_session_list", "Chat", "chat"),
    ("approval_list", "Approvals", "approvals:read"),
    ("collection_list", "Knowledge", "kb:read"),
    ("model_endpoint_list", "Models", "agents:read"),
    ("usage_dashboard", "Usage", "usage:read"),
    ("budget_list", "Budgets", "billing:read"),
    ("invoice_list", "Invoices", "billing:read"),
    ("member_list", "Members", "members:read"),
    ("api_key_list", "API keys", "keys:read"),
    ("audit_event_list", "Audit", "audit:read"),
    ("tenant_settings", "Settings", "tenant:admin"),
]


def _budget_alerts(principal: Principal | None, tenant: Any) -> Callable[[], list[dict[str, Any]]]:
    """The banner's budgets past a threshold in the current period, read (one query) only when
    the page's layout renders the banner, and only for members with ``billing:read``."""

    def read() -> list[dict[str, Any]]:
        if principal is None or tenant is None or tenant.is_public or not principal.can("billing:read"):
            return []
        from billing.selectors.budgets import budget_banner

        return budget_banner(principal=principal)

    return read


def console(request: HttpRequest) -> dict[str, Any]:
    tenant = getattr(request, "tenant", None)
    principal: Principal | None = getattr(request, "principal", None)
    nav: list[dict[str, Any]] = [
        {"url": reverse(name), "label": label}
        for name, label, permission in NAVIGATION
        if principal is not None and principal.can(permission)
    ]
    # The active section is the one whose URL is the longest prefix of the current path; the
    # dashboard's "/" prefixes every path, so it is active only on itself.
    matches = [item for item in nav
               if request.path == item["url"] or (item["url"] != "/" and request.path.startswith(item["url"]))]
    active = max(matches, key=lambda item: len(item["url"]))["url"] if matches else None
    for item in nav:
        item["active"] = item["url"] == active
        if item["label"] == "Approvals" and principal is not None:
            from agents.approval_selectors import approval_pending_count

            # The requests waiting for a decision: one COUNT, only for members who read approvals.
            item["badge"] = approval_pending_count(principal=principal)
    return {
        "budget_alerts": _budget_alerts(principal, tenant),
        "base_domain": settings.BASE_DOMAIN,
        "tenant": tenant,
        "is_public_host": tenant is None or tenant.is_public,
        "principal": principal,
        # The account pages (two-factor, password) belong to the sidebar's Security link.
        "security_active": request.path.startswith(("/accounts/2fa/", "/accounts/password/")),
        "membership": getattr(request, "membership", None),
        "nav": nav,
    }
