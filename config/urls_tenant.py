"""URLs of tenant hosts (``<slug>.<BASE_DOMAIN>``): the console, accounts and the REST API."""

from django.urls import include, path, re_path

from agents.api import router as agents_router
from agents.approval_api import router as approvals_router
from agents.endpoint_api import router as endpoint_router
from agents.openai_api import router as openai_router
from agents.tool_api import router as tool_router
from billing.api import router as billing_router
from compliance.api import router as audit_router
from config.api import api, api_not_found
from config.views import favicon
from knowledge.api import router as knowledge_router
from tenants.api import router as tenant_router
from tenants.sso_api import router as sso_router
from tenants.urls import security_urlpatterns
from tenants.views import sso as sso_views

api.add_router("/", tenant_router)
api.add_router("/", audit_router)
api.add_router("/", billing_router)
api.add_router("/", knowledge_router)
api.add_router("/", agents_router)
api.add_router("/openai", openai_router)
api.add_router("/", endpoint_router)
api.add_router("/", tool_router)
api.add_router("/", approvals_router)
api.add_router("/", sso_router)

urlpatterns = [
    path("favicon.ico", favicon),
    path("api/v1/", api.urls),
    re_path(r"^api/(?P<rest>.*)$", api_not_found),
    path("scim/v2/", include("tenants.scim.urls")),
    path("accounts/2fa/", include(security_urlpatterns)),
    # The tenant's IdP (tenants.sso): allauth's openid_connect views run with the portal's adapter.
    path("accounts/login/", sso_views.login_page, name="account_login"),
    path("accounts/oidc/<str:provider_id>/login/", sso_views.oidc_login, name="sso_login"),
    path("accounts/oidc/<str:provider_id>/login/callback/", sso_views.oidc_callback, name="sso_callback"),
    path("accounts/", include("allauth.urls")),
    path("audit/", include("compliance.urls")),
    path("kb/", include("knowledge.urls")),
    path("models/", include("agents.endpoint_urls")),
    path("", include("billing.urls")),
    path("", include("agents.urls")),
    path("", include("tenants.urls")),
]

handler403 = "config.views.permission_denied"
handler404 = "config.views.page_not_found"
handler500 = "config.views.server_error"
