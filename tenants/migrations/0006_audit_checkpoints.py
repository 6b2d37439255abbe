# Placeholder reserved for issue #28 (audit chain checkpoints); its operations are filled in by that change.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0005_api_key_acting_user'),
    ]

    operations: list[migrations.operations.base.Operation] = []
