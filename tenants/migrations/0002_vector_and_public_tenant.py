from django.conf import settings
from django.db import migrations
from pgvector.django import VectorExtension


def create_public_tenant(apps, schema_editor):
    Tenant = apps.get_model("tenants", "Tenant")
    Tenant.objects.get_or_create(
        schema_name=settings.PUBLIC_SCHEMA_NAME, defaults={"slug": "public", "name": "Platform"}
    )


class Migration(migrations.Migration):
    dependencies = [("tenants", "0001_initial")]

    operations = [
        # pgvector lives in the public schema; tenant schemas reach it through their search path.
        VectorExtension(),
        migrations.RunPython(create_public_tenant, migrations.RunPython.noop),
    ]
