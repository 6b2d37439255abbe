"""Console pages for a tenant's own model endpoints (``/models/``)."""

from __future__ import annotations

urlpatterns: list[object] = []
