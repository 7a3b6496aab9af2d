"""Test doubles shipped with the package (like httpx's mock transport).

* :mod:`core.testing.fake_ai`: a scripted stand-in for an AI coding CLI, used by the demo, the
  tests and the chart's sample `script` adapter;
* :mod:`core.testing.fake_kube`: an in-memory :class:`core.kube.api.KubeApi` on
  :mod:`core.testing.fake_apiserver`, held to a real API server by
  ``tests/e2e/test_kube_api_contract.py``, with fault injection;
* :mod:`core.testing.fake_kubelet`: runs that fake server's Jobs as local processes (the
  runner, real git), so the operator's controller runs end to end without a cluster.
"""
