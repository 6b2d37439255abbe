"""Writes of billing: recording usage events (``usage``), budgets (``budgets``), invoices
(``invoices``). Usage recording is re-exported here, where the other apps import it from."""

from billing.services.usage import UNITS, UsageFields, usage_event_record, usage_event_values

__all__ = ["UNITS", "UsageFields", "usage_event_record", "usage_event_values"]
