"""Console pages: budgets (built by issue #30)."""

from django.http import HttpRequest, HttpResponse


def budget_list(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")
