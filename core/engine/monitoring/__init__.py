"""Observability of the engine: event log, metrics, progress display."""
