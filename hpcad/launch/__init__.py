"""Launchers: where a stage runs (``launcher=local`` runs it in this process)."""
