"""Reads of billing: usage events and summaries (``usage``), budgets (``budgets``), invoices
(``invoices``)."""

from billing.selectors.usage import usage_event_list

__all__ = ["usage_event_list"]
