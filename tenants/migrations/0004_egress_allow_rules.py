# The staff egress allowlist (issue #28): the only way for a tenant-supplied URL to reach a private address.

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0003_modelendpoint'),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.CreateModel(
            name='EgressAllowRule',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('target', models.CharField(help_text='Host name, IP address or CIDR network, e.g. 10.20.0.0/16.', max_length=255)),
                ('port', models.PositiveIntegerField(blank=True, help_text='The one port this rule opens; empty opens 80 and 443 only.', null=True)),
                ('description', models.CharField(blank=True, help_text='Why this is open, and for whom.', max_length=200)),
                ('enabled', models.BooleanField(default=True)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['target', 'port'],
            },
        ),
    ]
