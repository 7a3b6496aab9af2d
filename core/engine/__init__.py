"""The execution engine: shared by the embedded (local process) and Kubernetes backends.

This package imports neither kopf nor the kubernetes client (checked by import-linter).
"""
