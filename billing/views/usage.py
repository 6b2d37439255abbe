"""Console pages: usage (built by issue #30)."""

from django.http import HttpRequest, HttpResponse


def usage_dashboard(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")
