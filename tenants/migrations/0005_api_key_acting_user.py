# Placeholder reserved for issue #28 (keys act for a person); its operations are filled in by that change.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0004_egress_allow_rules'),
    ]

    operations: list[migrations.operations.base.Operation] = []
