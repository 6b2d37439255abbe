"""The billing part of the REST API: usage, budgets, invoices and settings, one router per topic."""

from ninja import Router

from billing.api.budgets import router as budgets_router
from billing.api.invoices import router as invoices_router
from billing.api.settings import router as settings_router
from billing.api.usage import router as usage_router

router = Router()
router.add_router("/", usage_router)
router.add_router("/", budgets_router)
router.add_router("/", invoices_router)
router.add_router("/", settings_router)
