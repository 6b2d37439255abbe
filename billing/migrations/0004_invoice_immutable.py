"""A finalized invoice is immutable: triggers refuse UPDATE and DELETE of finalized and void
invoices (except voiding: finalized -> void, changing only ``status`` and ``voided_at``), any
change to the lines of an invoice that is not a draft, and TRUNCATE of either table.

RunSQL only (tenant schemas are provisioned by replaying SQL). The functions are created in the
schema the migration runs in, like ``compliance.sql``'s guard; the line guard reads the invoice
in the trigger's own schema (``TG_TABLE_SCHEMA``), whatever the search path.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION invoice_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION '%.% holds finalized invoices: TRUNCATE is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status = 'draft' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'finalized' AND NEW.status = 'void' AND NEW.voided_at IS NOT NULL
       AND (to_jsonb(NEW) - 'status' - 'voided_at') = (to_jsonb(OLD) - 'status' - 'voided_at') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'invoice % (number %) is %: % is not allowed', OLD.id, OLD.number, OLD.status, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE OR REPLACE FUNCTION invoice_line_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    invoice_status text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION '%.% holds lines of finalized invoices: TRUNCATE is not allowed', TG_TABLE_SCHEMA,
            TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        EXECUTE format('SELECT status FROM %I.billing_invoice WHERE id = $1', TG_TABLE_SCHEMA)
            INTO invoice_status USING OLD.invoice_id;
        IF invoice_status IS NOT NULL AND invoice_status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is %: its lines cannot change (% refused)', OLD.invoice_id, invoice_status, TG_OP
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        EXECUTE format('SELECT status FROM %I.billing_invoice WHERE id = $1', TG_TABLE_SCHEMA)
            INTO invoice_status USING NEW.invoice_id;
        IF invoice_status IS NOT NULL AND invoice_status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is %: lines cannot be added or moved to it (% refused)', NEW.invoice_id,
                invoice_status, TG_OP USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER billing_invoice_immutable BEFORE UPDATE OR DELETE ON billing_invoice
    FOR EACH ROW EXECUTE FUNCTION invoice_guard();
CREATE TRIGGER billing_invoice_no_truncate BEFORE TRUNCATE ON billing_invoice
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_guard();
CREATE TRIGGER billing_invoiceline_immutable BEFORE INSERT OR UPDATE OR DELETE ON billing_invoiceline
    FOR EACH ROW EXECUTE FUNCTION invoice_line_guard();
CREATE TRIGGER billing_invoiceline_no_truncate BEFORE TRUNCATE ON billing_invoiceline
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_line_guard();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS billing_invoice_immutable ON billing_invoice;
DROP TRIGGER IF EXISTS billing_invoice_no_truncate ON billing_invoice;
DROP TRIGGER IF EXISTS billing_invoiceline_immutable ON billing_invoiceline;
DROP TRIGGER IF EXISTS billing_invoiceline_no_truncate ON billing_invoiceline;
DROP FUNCTION IF EXISTS invoice_guard();
DROP FUNCTION IF EXISTS invoice_line_guard();
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0003_budgets_invoices")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
