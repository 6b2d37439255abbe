# Issue #28: signed checkpoints of every audit chain's head, in the public schema (compliance.chain).

from django.db import migrations, models

from compliance.sql import append_only_triggers, drop_append_only_triggers


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0005_api_key_acting_user'),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.CreateModel(
            name='AuditCheckpoint',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('schema_name', models.CharField(max_length=63)),
                ('seq', models.BigIntegerField()),
                ('hash', models.CharField(max_length=64)),
                ('legacy_events', models.BigIntegerField(default=0)),
                ('created_at', models.DateTimeField()),
                ('key_id', models.CharField(max_length=16)),
                ('signature', models.CharField(max_length=64)),
            ],
            options={
                'ordering': ['-created_at', '-id'],
                'indexes': [models.Index(fields=['schema_name', '-seq'], name='audit_checkpoint_head')],
            },
        ),
        migrations.RunSQL(append_only_triggers("tenants_auditcheckpoint"),
                          drop_append_only_triggers("tenants_auditcheckpoint")),
    ]
