from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("agents", "0003_agentversion_retrieval_max_chunks_per_document")]

    operations = [
        migrations.AddField(
            model_name="turn",
            name="heartbeat_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
