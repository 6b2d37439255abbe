"""Console pages: invoices (built by issue #30)."""

from django.http import HttpRequest, HttpResponse


def invoice_list(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")
