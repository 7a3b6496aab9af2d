"""The synchronous API client of the command-line paths (submit, integrate), from a kubeconfig.

The kubernetes client raises its own ``ConfigException`` (no file, no current context, a
broken file); callers of the CLI get a :class:`~core.errors.KubeConfigError` naming the
option to fix instead of a traceback.
"""

from __future__ import annotations

import yaml
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from core.errors import KubeConfigError


def api_client_from(kubeconfig: str | None) -> client.ApiClient:
    """An API client for ``kubeconfig`` (None: ``$KUBECONFIG`` or ``~/.kube/config``)."""
    try:
        api_client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig
        )
    except (ConfigException, OSError, yaml.YAMLError, ValueError, KeyError, TypeError) as exc:
        where = kubeconfig or "$KUBECONFIG / ~/.kube/config"
        raise KubeConfigError(
            f"no usable Kubernetes configuration in {where}: {exc}\n"
            "  fix: pass --kubeconfig with a readable kubeconfig whose current context names the "
            "cluster, or set KUBECONFIG"
        ) from exc
    return api_client
