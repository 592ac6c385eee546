"""Keeping worker processes running: the local supervisor (scaling policy comes later)."""
