"""The runner inside adapter and gate pods (``python -m core.runner adapter|gate``).

It holds no Kubernetes API credentials and imports neither kopf nor the kubernetes client:
the request comes from the environment and the evidence goes to stdout
(:mod:`core.runner.protocol`), which the operator reads through the pod log.
"""
