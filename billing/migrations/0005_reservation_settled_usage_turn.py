"""A reservation records its call's real usage (``settled_*``, written in the call's meter
transaction) until the fold moves it into the budget counters; and an index on usage events'
``turn_id`` for the chat page's per-turn cost query. New nullable columns and an index only:
nothing to backfill."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0004_invoice_immutable"),
    ]

    operations = [
        migrations.AddField(
            model_name="budgetreservation",
            name="settled_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="budgetreservation",
            name="settled_cost",
            field=models.DecimalField(blank=True, decimal_places=12, max_digits=24, null=True),
        ),
        migrations.AddField(
            model_name="budgetreservation",
            name="settled_tokens",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="usageevent",
            index=models.Index(fields=["turn_id"], name="usage_turn_id"),
        ),
    ]
