"""SQL for append-only tables, shared by the audit and usage-event migrations.

The guard function is created in whichever schema the migration runs in (public or a tenant's),
so every schema carries its own copy and cloning a schema carries it along.
"""

GUARD_FUNCTION = """
CREATE OR REPLACE FUNCTION append_only_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
"""


def append_only_triggers(table: str) -> str:
    """SQL that makes ``table`` refuse UPDATE, DELETE and TRUNCATE."""
    return f"""
{GUARD_FUNCTION}
CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION append_only_guard();
CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION append_only_guard();
"""


def drop_append_only_triggers(table: str) -> str:
    """SQL that undoes ``append_only_triggers`` (the shared function is left in place)."""
    return f"""
DROP TRIGGER IF EXISTS {table}_no_update_delete ON {table};
DROP TRIGGER IF EXISTS {table}_no_truncate ON {table};
"""
