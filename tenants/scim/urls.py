"""``/scim/v2/`` on tenant hosts (``config.urls_tenant``). Paths take no trailing slash, as IdPs
send them, and accept one."""

from django.urls import re_path

from tenants.scim import views

_ID = r"(?P<resource_id>[^/]+)"

urlpatterns = [
    re_path(r"^Users/?$", views.users, name="scim_users"),
    re_path(rf"^Users/{_ID}/?$", views.user_detail, name="scim_user"),
    re_path(r"^Groups/?$", views.groups, name="scim_groups"),
    re_path(rf"^Groups/{_ID}/?$", views.group_detail, name="scim_group"),
    re_path(r"^ServiceProviderConfig/?$", views.service_provider_config_view, name="scim_service_provider_config"),
    re_path(r"^ResourceTypes/?$", views.resource_types_view, name="scim_resource_types"),
    re_path(rf"^ResourceTypes/{_ID}/?$", views.resource_types_view, name="scim_resource_type"),
    re_path(r"^Schemas/?$", views.schemas_view, name="scim_schemas"),
    re_path(rf"^Schemas/{_ID}/?$", views.schemas_view, name="scim_schema"),
    re_path(r"^(?P<rest>.*)$", views.scim_not_found),
]
