from django.db import migrations

from compliance.sql import GUARD_FUNCTION

# An agent version is immutable: editing an agent creates a new version. Deleting (with the
# agent) stays allowed; only UPDATE is refused.
IMMUTABLE = GUARD_FUNCTION + """
CREATE TRIGGER agents_agentversion_no_update BEFORE UPDATE ON agents_agentversion
    FOR EACH ROW EXECUTE FUNCTION append_only_guard();
"""


class Migration(migrations.Migration):
    dependencies = [("agents", "0001_initial")]

    operations = [
        migrations.RunSQL(IMMUTABLE, "DROP TRIGGER IF EXISTS agents_agentversion_no_update ON agents_agentversion;"),
    ]
