"""manage.py invoice_verify [--tenant SLUG | --all]: recompute every finalized invoice from the
usage events and compare it with what was stored.

Exits 0 when all match; exits 1 after naming each mismatch on stderr (tenant, invoice number,
period, line, stored vs recomputed). Void invoices are not checked (they bill nothing), drafts
neither (they are recomputed whenever drafted).
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_tenants.utils import schema_context

from billing.models import Invoice
from billing.selectors.invoices import invoice_mismatches
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Recompute finalized invoices from the usage events; exit 1 naming any mismatch."

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--tenant", help="The tenant's slug")
        which.add_argument("--all", action="store_true", help="Every tenant")

    def handle(self, *args: Any, **options: Any) -> None:
        tenants = Tenant.objects.exclude(schema_name="public").order_by("slug")
        if options["tenant"]:
            tenants = tenants.filter(slug=options["tenant"])
            if not tenants.exists():
                raise CommandError(f"No tenant {options['tenant']!r}.")
        checked = failed = 0
        for tenant in tenants:
            with schema_context(tenant.schema_name):
                finalized = Invoice.objects.filter(status=Invoice.Status.FINALIZED).prefetch_related("lines")
                for invoice in finalized.order_by("number"):
                    checked += 1
                    mismatches = invoice_mismatches(tenant=tenant, invoice=invoice)
                    failed += bool(mismatches)
                    for m in mismatches:
                        self.stderr.write(
                            f"MISMATCH tenant={tenant.slug} invoice={m.number} period={m.period} "
                            f"line: {m.line}: stored {m.stored}, recomputed {m.recomputed}"
                        )
        summary = f"{checked} finalized invoice(s) checked, {failed} mismatched."
        if failed:
            self.stderr.write(summary)
            sys.exit(1)
        self.stdout.write(summary)
