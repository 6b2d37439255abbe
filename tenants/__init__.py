"""Control plane: tenants, accounts, memberships, API keys (public schema)."""
