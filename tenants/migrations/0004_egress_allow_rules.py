# Placeholder reserved for issue #28 (the staff egress allowlist); its operations are filled in by that change.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0003_modelendpoint'),
    ]

    operations: list[migrations.operations.base.Operation] = []
