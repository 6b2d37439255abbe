"""URLs of the public host (``PUBLIC_HOST``): staff admin pages and staff accounts."""

from django.contrib import admin
from django.urls import include, path

from billing.views.staff import staff_invoice_list
from config.views import favicon, public_home
from tenants.urls import security_urlpatterns
from tenants.views.ops import staff_endpoint_test, staff_ops

urlpatterns = [
    path("", public_home, name="public_home"),
    path("favicon.ico", favicon),
    path("admin/rq/", include("django_rq.urls")),
    # Before admin/: admin_view asks what every staff page asks (staff, session verified by 2FA).
    path("admin/billing/invoices/", admin.site.admin_view(staff_invoice_list), name="staff_invoice_list"),
    path("admin/ops/", admin.site.admin_view(staff_ops), name="staff_ops"),
    path("admin/ops/endpoints/<int:endpoint_id>/test/", admin.site.admin_view(staff_endpoint_test),
         name="staff_endpoint_test"),
    path("admin/", admin.site.urls),
    path("accounts/2fa/", include(security_urlpatterns)),
    path("accounts/", include("allauth.urls")),
]

handler403 = "config.views.permission_denied"
handler404 = "config.views.page_not_found"
handler500 = "config.views.server_error"
