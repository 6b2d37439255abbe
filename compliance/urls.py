from django.urls import path

from compliance import views

urlpatterns = [
    path("", views.audit_event_list_view, name="audit_event_list"),
    path("<int:seq>/", views.audit_event_detail, name="audit_event_detail"),
]
