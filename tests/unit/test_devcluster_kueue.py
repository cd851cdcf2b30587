"""devcluster/kueue.py's pure parts: Kueue's webhooks and CRDs pointed at the manager on loopback, its config.

tests/integration/test_kueue.py runs the real manager with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmalign.devcluster import kueue

URL, CA = "https://127.0.0.1:24443", "Q0E="


def hook(name: str, group: str, resource: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
        "rules": [
            {"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": [resource]}
        ],
        "failurePolicy": "Fail",
        "sideEffects": "None",
    }


def test_only_the_served_webhooks_are_installed_each_calling_the_manager_on_loopback() -> None:
    rendered = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [
                hook("mpod.kb.io", "", "pods", "/mutate--v1-pod"),
                hook("mjob.kb.io", "batch", "jobs", "/mutate-batch-v1-job"),  # batch/job: not enabled here
                hook(
                    "mworkload.kb.io",
                    "kueue.x-k8s.io",
                    "workloads",
                    "/mutate-kueue-x-k8s-io-v1beta2-workload",
                ),
            ],
        },
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webhook-service"}},
    ]
    (mutating,) = kueue.loopback_webhooks(rendered, URL, CA)
    assert mutating["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
    assert [h["name"] for h in mutating["webhooks"]] == ["mpod.kb.io", "mworkload.kb.io"]
    assert mutating["webhooks"][0]["clientConfig"] == {"url": URL + "/mutate--v1-pod", "caBundle": CA}
    assert mutating["webhooks"][0]["failurePolicy"] == "Fail"  # the rest of Kueue's webhook as it is


def test_the_crds_conversion_webhook_calls_the_manager_on_loopback() -> None:
    conversion = {
        "strategy": "Webhook",
        "webhook": {
            "clientConfig": {
                "service": {"name": "webhook-service", "namespace": "system", "path": "/convert"}
            },
            "conversionReviewVersions": ["v1"],
        },
    }
    rendered = [
        {
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "workloads.kueue.x-k8s.io"},
            "spec": {"group": "kueue.x-k8s.io", "conversion": conversion},
        },
        {
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "topologies.kueue.x-k8s.io"},
            "spec": {"group": "kueue.x-k8s.io"},
        },
    ]
    workloads, topologies = kueue.loopback_crds(rendered, URL, CA)
    assert workloads["spec"]["conversion"] == {
        "strategy": "Webhook",
        "webhook": {
            "clientConfig": {"url": URL + "/convert", "caBundle": CA},
            "conversionReviewVersions": ["v1"],
        },
    }
    assert topologies == rendered[1]


def test_the_manager_runs_its_pod_integration_on_loopback_with_its_own_certificates() -> None:
    config = kueue.config(24443, 24444, Path("/state/kueue/certs"))
    assert config["integrations"] == {"frameworks": ["pod"]}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 24443, "certDir": "/state/kueue/certs"}
    assert config["internalCertManagement"] == {"enable": False}
    assert config["health"] == {"healthProbeBindAddress": "127.0.0.1:24444"}
    argv = kueue.command(
        Path("/cache/kueue"),
        Path("/state/kubeconfig"),
        Path("/state/kueue/config.yaml"),
        Path("/state/kueue/etc-upper"),
        Path("/state/kueue/etc-work"),
    )
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    # /etc is an overlay (the metrics certificate's fixed path) in the manager's mount namespace only
    script = argv[argv.index("-c") + 1]
    assert "lowerdir=/etc" in script and script.endswith('exec "$@"')
    assert argv[-4:] == [
        "/cache/kueue",
        "--config=/state/kueue/config.yaml",
        "--kubeconfig=/state/kubeconfig",
        "--feature-gates=VisibilityOnDemand=false",
    ]
