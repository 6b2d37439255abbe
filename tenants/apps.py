from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and accounts"

    def ready(self) -> None:
        from config import checks as config_checks  # noqa: F401  (registers the web security checks)
        from tenants import checks, signals  # noqa: F401  (registers checks, connects receivers)
