"""Console pages for a tenant's own model endpoints (``/models/``)."""

from __future__ import annotations

from django.urls import URLPattern, path

from agents import endpoint_views as views

urlpatterns: list[URLPattern] = [
    path("", views.model_endpoint_list, name="model_endpoint_list"),
    path("<int:endpoint_id>/", views.model_endpoint_edit, name="model_endpoint_edit"),
    path("<int:endpoint_id>/delete/", views.model_endpoint_delete, name="model_endpoint_delete"),
    path("<int:endpoint_id>/test/", views.model_endpoint_test, name="model_endpoint_test"),
]
