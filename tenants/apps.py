from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and accounts"

    def ready(self) -> None:
        from tenants import checks, signals  # noqa: F401  (registers checks, connects receivers)
