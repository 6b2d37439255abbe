"""Console pages of billing, one module per topic: usage, budgets, invoices."""
