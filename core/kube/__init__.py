"""The Kubernetes backend: Job manifests, the API calls the operator makes, status mapping and
the reconciler. Imports the kubernetes client, never kopf (that is ``operator/``)."""
