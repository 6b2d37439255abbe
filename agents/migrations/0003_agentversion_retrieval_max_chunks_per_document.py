from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("agents", "0002_agentversion_immutable")]

    operations = [
        migrations.AddField(
            model_name="agentversion",
            name="retrieval_max_chunks_per_document",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
