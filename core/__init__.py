"""Execution controller for pipelines of AI coding tasks (phase 5: execution and validation)."""

from __future__ import annotations

__version__ = "0.1.0"
