"""An invoice as a PDF document (fpdf2): tenant, number (or DRAFT), period, the lines table, the
plan fee, the usage subtotal and the total, in the invoice's currency.

Text uses the PDF core font Helvetica (nothing to ship or find on the host); it covers
Latin-1, so other characters of descriptions and names are replaced by ``?``. Amounts are the
stored decimals written as they are, so the PDF's total is the API's and the CSV's.
"""

from __future__ import annotations

from decimal import Decimal

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from billing.models import Invoice
from billing.services.invoices import PLAN_FEE_KIND
from tenants.models import Tenant

# Column widths (mm) of the lines table on an A4 page with 15 mm margins: 180 mm in all.
_COLUMNS = [
    ("Description", 78, "L"),
    ("Quantity", 24, "R"),
    ("Unit", 14, "L"),
    ("Unit price", 36, "R"),
    ("Amount", 28, "R"),
]


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _money(value: Decimal, currency: str) -> str:
    return f"{currency} {value:.2f}"


def invoice_pdf(*, invoice: Invoice, tenant: Tenant) -> bytes:
    """The PDF bytes of ``invoice`` (its lines prefetched or not) of ``tenant``."""
    pdf = FPDF(format="A4")
    pdf.set_margins(15, 15, 15)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.set_title(_latin1(f"Invoice {invoice.number or 'DRAFT'} {invoice.period}"))
    pdf.set_creator("Agent Ops Portal")
    pdf.add_page()

    pdf.set_font("Helvetica", "B", 18)
    title = f"Invoice {invoice.number}" if invoice.number else "Invoice DRAFT"
    if invoice.status == Invoice.Status.VOID:
        title += " (VOID)"
    pdf.cell(0, 10, _latin1(title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 10)
    facts = [
        ("Customer", f"{tenant.name} ({tenant.slug})"),
        (
            "Period",
            f"{invoice.period} ({invoice.period_start:%Y-%m-%d %H:%M %Z} to "
            f"{invoice.period_end:%Y-%m-%d %H:%M %Z}, {tenant.time_zone})",
        ),
        ("Status", invoice.status),
        ("Plan", invoice.plan_code or "none"),
        ("Currency", invoice.currency),
    ]
    if invoice.finalized_at:
        facts.append(("Finalized", f"{invoice.finalized_at:%Y-%m-%d %H:%M UTC}"))
    for label, value in facts:
        pdf.cell(30, 6, _latin1(label), new_x=XPos.RIGHT, new_y=YPos.TOP)
        pdf.cell(0, 6, _latin1(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)

    pdf.set_font("Helvetica", "B", 9)
    pdf.set_fill_color(230, 230, 230)
    for name, width, align in _COLUMNS:
        pdf.cell(width, 7, name, border=1, align=align, fill=True, new_x=XPos.RIGHT, new_y=YPos.TOP)
    pdf.ln(7)
    pdf.set_font("Helvetica", "", 8)
    for line in invoice.lines.all():
        if line.kind == PLAN_FEE_KIND:
            continue
        cells = [
            _latin1(line.description or line.kind)[:60],
            f"{line.quantity:,}",
            _latin1(line.unit),
            f"{line.unit_price:f}",
            f"{line.amount:.2f}",
        ]
        for (_, width, align), text in zip(_COLUMNS, cells, strict=True):
            pdf.cell(width, 6, text, border=1, align=align, new_x=XPos.RIGHT, new_y=YPos.TOP)
        pdf.ln(6)
    if not any(line.kind != PLAN_FEE_KIND for line in invoice.lines.all()):
        pdf.cell(180, 6, "No usage in this period.", border=1, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)

    pdf.set_font("Helvetica", "", 10)
    for label, amount in (
        ("Usage subtotal", invoice.usage_total),
        (f"Plan fee ({invoice.plan_code or 'no plan'})", invoice.plan_fee),
    ):
        pdf.cell(130, 7, _latin1(label), align="R", new_x=XPos.RIGHT, new_y=YPos.TOP)
        pdf.cell(50, 7, _money(amount, invoice.currency), align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(130, 9, "Total", align="R", new_x=XPos.RIGHT, new_y=YPos.TOP)
    pdf.cell(50, 9, _money(invoice.total, invoice.currency), align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 8)
    pdf.ln(2)
    pdf.multi_cell(
        0,
        4,
        "Each usage line is the exact sum of its usage events' costs rounded to cents (half up); "
        "the total is the sum of the lines plus the plan fee.",
    )
    return bytes(pdf.output())
