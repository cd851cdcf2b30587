"""Which cluster and namespace, the way kubectl picks them: --kubeconfig, else $KUBECONFIG, else
~/.kube/config; --context, else the file's current context; the namespace of that context, else
`default`. In a pod with none of these, the pod's ServiceAccount and its namespace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def connect(kubeconfig: str | None = None, context: str | None = None) -> tuple[Any, str]:
    """(kubernetes.client.ApiClient, the default namespace)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    files = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    if not any(Path(file).expanduser().exists() for file in files.split(os.pathsep) if file):
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            namespace = (
                IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else "default"
            )
            return client.ApiClient(configuration), namespace
        raise FileNotFoundError(f"no kubeconfig at {files}: pass --kubeconfig FILE (or set KUBECONFIG)")
    # config_file=None: the library reads $KUBECONFIG (several files merged, as kubectl does) or ~/.kube/config
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return client.ApiClient(configuration), str(namespace)
