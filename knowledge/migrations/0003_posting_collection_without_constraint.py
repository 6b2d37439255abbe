"""The posting's collection is checked through its chunk, not by a foreign key of its own.

The column is copied from the chunk by the statement that writes both, and the chunk's foreign
key ties it to an existing collection; the posting's own constraint only cost PostgreSQL CPU
on every posting written. The constraint is dropped in SQL by its name (Django's name for it,
the same in every schema): tenant schemas are created from the migrations' collected SQL
(``tenants.services.provisioning.tenant_ddl``), and Django's AlterField looks the name up in the
database, which the collection cannot do, so it would collect nothing.
"""

import django.db.models.deletion
from django.db import migrations, models

CONSTRAINT = "knowledge_posting_collection_id_03ab4823_fk_knowledge"


class Migration(migrations.Migration):

    dependencies = [
        ("knowledge", "0002_posting_composite_primary_key"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=f"ALTER TABLE knowledge_posting DROP CONSTRAINT IF EXISTS {CONSTRAINT}",
                    reverse_sql=f"ALTER TABLE knowledge_posting ADD CONSTRAINT {CONSTRAINT} FOREIGN KEY (collection_id) "
                                "REFERENCES knowledge_collection (id) DEFERRABLE INITIALLY DEFERRED",
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="posting",
                    name="collection",
                    field=models.ForeignKey(db_constraint=False, db_index=False,
                                            on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                            to="knowledge.collection"),
                ),
            ],
        ),
    ]
