"""REST endpoints for a tenant's own model endpoints (``/api/v1/model-endpoints``)."""

from __future__ import annotations

from ninja import Router

router = Router(tags=["model endpoints"])
