"""REST endpoints for invoices (built by issue #30)."""

from ninja import Router

router = Router(tags=["invoices"])
