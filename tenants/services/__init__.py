"""Writes on the control plane: provisioning, members and invitations, API keys."""
