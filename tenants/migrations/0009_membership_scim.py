"""SCIM 2.0 ids on memberships (tenants.scim): a unique ``scim_id`` and the IdP's ``externalId``.

Existing rows get their own random UUID in SQL (an ``AddField`` default would give all of them
the same one), then the column becomes unique and required.
"""

import uuid

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("tenants", "0008_plan_rate_limits_tenant_billing"),
    ]

    operations = [
        migrations.AddField(
            model_name="membership",
            name="scim_id",
            field=models.UUIDField(null=True, editable=False),
        ),
        migrations.RunSQL(
            "UPDATE tenants_membership SET scim_id = gen_random_uuid() WHERE scim_id IS NULL",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="membership",
            name="scim_id",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
        ),
        migrations.AddField(
            model_name="membership",
            name="scim_external_id",
            field=models.CharField(blank=True, help_text="The identity provider's id of this person (SCIM externalId).",
                                   max_length=255, null=True),
        ),
        migrations.AddConstraint(
            model_name="membership",
            constraint=models.UniqueConstraint(condition=models.Q(("scim_external_id__isnull", False)),
                                               fields=("tenant", "scim_external_id"),
                                               name="membership_scim_external_id_unique"),
        ),
    ]
