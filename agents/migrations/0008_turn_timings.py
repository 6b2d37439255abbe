from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('agents', '0007_tool_choice_named'),
    ]

    operations = [
        migrations.AddField(
            model_name='turn',
            name='timings',
            field=models.JSONField(blank=True, default=dict),
        ),
    ]
