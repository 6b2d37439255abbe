# Issue #28: every API key records the person it acts for (ApiKey.acting_user).
#
# Backfill of existing keys, in this order:
# 1. ``created_by``: the member who made the key in the console or the API is the person it has
#    always acted for. If they have since left the tenant, the key keeps them as its person and is
#    refused at authentication (it should already have died with their access).
# 2. Otherwise (a key minted by a key, by ``manage.py apikey_create`` or by a seeder): the
#    tenant's first owner membership (oldest, then lowest id). These keys were made by someone
#    holding the tenant's credentials on the owners' behalf, and an owner's role allows every
#    scope, so no existing key loses a scope by the backfill; later role changes of that owner
#    clip or revoke it like any of their keys.
# 3. A tenant without any owner (only possible after staff deleted accounts) falls back to its
#    oldest membership of any role, whose role then narrows the key at authentication.
# 4. A key of a tenant without any member acts for nobody: it is deleted, since it could not
#    be used any more anyway (authentication refuses a key whose person is not a member).
# Scopes are left as they are: authentication intersects them with the person's current role.

from django.db import migrations, models
import django.db.models.deletion
from django.conf import settings


def _backfill(apps, schema_editor):
    ApiKey = apps.get_model("tenants", "ApiKey")
    Membership = apps.get_model("tenants", "Membership")
    fallback: dict[int, int | None] = {}
    for key in ApiKey.objects.filter(acting_user__isnull=True).order_by("pk"):
        user_id = key.created_by_id
        if user_id is None:
            if key.tenant_id not in fallback:
                members = Membership.objects.filter(tenant_id=key.tenant_id).order_by("created_at", "pk")
                first = members.filter(role="owner").first() or members.first()
                fallback[key.tenant_id] = first.user_id if first else None
            user_id = fallback[key.tenant_id]
        if user_id is None:
            key.delete()
            continue
        ApiKey.objects.filter(pk=key.pk).update(acting_user_id=user_id)
    # Check the new foreign keys now: PostgreSQL refuses the ALTER TABLE (NOT NULL) below while
    # deferred constraint checks of these updates are pending in the same transaction.
    schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0004_egress_allow_rules'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.AddField(
            model_name='apikey',
            name='acting_user',
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.CASCADE, related_name='acting_api_keys',
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(_backfill, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='apikey',
            name='acting_user',
            field=models.ForeignKey(
                help_text='The member this key acts for; it never holds more than their role.',
                on_delete=django.db.models.deletion.CASCADE, related_name='acting_api_keys',
                to=settings.AUTH_USER_MODEL,
            ),
        ),
    ]
