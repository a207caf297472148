"""Observing a run: the live view, the report and its figures."""
