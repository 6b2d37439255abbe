from django.db import migrations

from compliance.sql import append_only_triggers, drop_append_only_triggers


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [
        migrations.RunSQL(append_only_triggers("billing_usageevent"),
                          drop_append_only_triggers("billing_usageevent")),
    ]
