"""System checks of the web-facing and egress security settings (registered by ``tenants.apps``).

The production checks of the other settings are in ``tenants/checks.py``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=False)
def metrics_exposure(app_configs: Any, **kwargs: Any) -> list[Error]:
    """In production ``/metrics`` answers on every host of the portal, so it must need
    ``METRICS_TOKEN``, unless the metrics are served on their own port (``METRICS_PORT``) that
    only the scraper reaches. Development keeps it open."""
    if settings.DEVELOPMENT or settings.METRICS_TOKEN or settings.METRICS_PORT:
        return []
    return [Error("/metrics is open to anyone who can reach the portal: set METRICS_TOKEN (scrapers send it as "
                  "'Authorization: Bearer <token>'), or METRICS_PORT to serve the metrics on a port of their own.",
                  id="portal.E030")]


@register(Tags.security)
def egress_allowlist(app_configs: Any, **kwargs: Any) -> list[Error]:
    """Every ``EGRESS_ALLOWLIST`` entry must parse (``config.egress.allow_rule_parse``), so a typo
    stops start-up instead of failing the first save or turn that consults the allowlist."""
    from config.egress import allow_rule_parse

    errors = []
    for position, entry in enumerate(settings.EGRESS_ALLOWLIST, start=1):
        try:
            allow_rule_parse(entry)
        except ValueError as exc:
            errors.append(Error(f"EGRESS_ALLOWLIST entry {position} ({entry!r}) is not a rule: {exc}",
                                hint="Rules are host, host:port, an IP address or a CIDR network, e.g. "
                                     "10.0.0.0/8 or [fd00::/8]:8000.", id="portal.E031"))
    return errors
