# The audit chain becomes keyed (HMAC-SHA256 under AUDIT_SIGNING_KEYS): each event records the id
# of the key that signed it; existing rows keep '' (plain SHA-256, see compliance.chain).
# Adding a column with a constant default rewrites no row, so the append-only trigger is not hit.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('compliance', '0002_append_only'),
    ]

    operations = [
        migrations.AddField(
            model_name='auditevent',
            name='key_id',
            field=models.CharField(blank=True, default='', max_length=16),
        ),
    ]
