from django.urls import path

from tenants.views import console, security, sso

urlpatterns = [
    path("", console.dashboard, name="dashboard"),
    path("members/", console.member_list, name="member_list"),
    path("members/<int:membership_id>/role/", console.member_role_change, name="member_role_change"),
    path("members/<int:membership_id>/remove/", console.member_remove, name="member_remove"),
    path("members/invitations/<int:invitation_id>/revoke/", console.invitation_revoke, name="invitation_revoke"),
    path("keys/", console.api_key_list, name="api_key_list"),
    path("keys/<str:key_id>/revoke/", console.api_key_revoke, name="api_key_revoke"),
    path("settings/", console.tenant_settings, name="tenant_settings"),
    path("settings/sso/", sso.sso_settings, name="sso_settings"),
    # Under /budgets/ (the Budgets section), for owners and admins; /settings/ is owners' only.
    path("budgets/settings/", console.billing_settings, name="billing_settings"),
    path("invitations/<str:token>/", console.invitation_accept, name="invitation_accept"),
]

security_urlpatterns = [
    path("", security.two_factor_security, name="two_factor_security"),
    path("setup/", security.two_factor_setup, name="two_factor_setup"),
    path("verify/", security.two_factor_verify, name="two_factor_verify"),
    path("recovery-codes/", security.recovery_codes_regenerate, name="recovery_codes_regenerate"),
    path("disable/", security.two_factor_disable, name="two_factor_disable"),
]
