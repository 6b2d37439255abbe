"""Celery beat task of the control plane: probe the platform's model endpoints
(``tenants.model_endpoints_probe``)."""

from __future__ import annotations

import structlog
from celery import shared_task

from tenants.services.endpoint_probe import platform_endpoints_probe

logger = structlog.get_logger(__name__)


@shared_task(name="tenants.model_endpoints_probe", ignore_result=True)
def model_endpoints_probe() -> dict[str, int]:
    """Beat entry point, sent once, to the public schema (``tenant_schemas: ["public"]``), every
    ``MODEL_ENDPOINT_PROBE_SECONDS``: probe every enabled platform endpoint and record the results
    in the endpoint-health hash (``tenants.services.endpoint_probe``). Returns counts by outcome."""
    counts = platform_endpoints_probe()
    logger.info("model_endpoints_probed", **counts)
    return counts
