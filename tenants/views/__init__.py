"""Console pages of the control plane: dashboard, members, API keys, settings, 2FA."""
