"""REST endpoints for budgets (built by issue #30)."""

from ninja import Router

router = Router(tags=["budgets"])
