"""The API server itself rejects bad AlignmentJobs (CRD structural schema + CEL rules), naming the field.

The same table (tests/bad_specs.py) runs against the offline validator in tests/unit/test_api.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bad_specs import BAD_SPECS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crd_namespace(dev_cluster: Any) -> str:
    from mmalign.devcluster.testing import create_namespace, wait_for

    applied = dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                                  str(REPO / "manifests/crds/alignmentjobs.yaml"))
    assert applied.returncode == 0, applied.stderr
    # Poll: `kubectl wait` fails at once while the new CRD has no status.conditions yet (the API server
    # takes a moment to build the schema of the large CRD: it embeds the PodSpec schema four times).
    wait_for(lambda: "True" in dev_cluster.kubectl(
        "get", "crd/alignmentjobs.mmalign.io", "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}"
    ).stdout, 60, what="the AlignmentJob CRD Established")
    return create_namespace(dev_cluster, "op-api")


def _dry_run(dev_cluster: Any, namespace: str, text: str) -> Any:
    return dev_cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=text)


def test_the_examples_are_accepted(dev_cluster: Any, crd_namespace: str) -> None:
    for example in sorted((REPO / "manifests/examples").glob("*.yaml")):
        result = _dry_run(dev_cluster, crd_namespace, example.read_text())
        assert result.returncode == 0, f"{example.name}: {result.stderr}"


@pytest.mark.parametrize(("name", "text", "path"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_spec_is_rejected_with_its_field_path(dev_cluster: Any, crd_namespace: str, name: str, text: str,
                                                  path: str) -> None:
    result = _dry_run(dev_cluster, crd_namespace, text)
    assert result.returncode != 0, f"{name}: the API server accepted it"
    assert path in result.stderr, f"{name}: {path!r} not named in: {result.stderr.strip()}"


def test_the_crd_with_the_pod_schema_fits_the_api_servers_limits(dev_cluster: Any, crd_namespace: str) -> None:
    """The embedded PodSpec schemas (spec.podTemplate.spec and each stage's) keep the CRD storable: well
    under etcd's default 1.5 MiB per value. It no longer fits a client-side `kubectl apply`'s
    last-applied annotation (256 KiB), so the docs say to install it with Helm or `--server-side`, as
    Kubeflow Trainer's and JobSet's CRDs are."""
    import json

    stored = dev_cluster.kubectl("get", "crd/alignmentjobs.mmalign.io", "-o", "json")
    assert stored.returncode == 0, stored.stderr
    spec = json.loads(stored.stdout)["spec"]
    assert len(json.dumps(spec, separators=(",", ":"))) < 1024 * 1024
    served = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "affinity" in served["podTemplate"]["properties"]["spec"]["properties"]


def test_pods_built_from_the_overlay_example_are_valid_pods(dev_cluster: Any, crd_namespace: str) -> None:
    """The merged pods (manifests/examples/pod-template.yaml: affinity, imagePullSecrets, valueFrom, a PVC and
    a hostPath, a sidecar, RDMA devices) pass the API server's own Pod validation."""
    import json

    from mmalign.api.jobfile import load_job
    from mmalign.operator.builders import JobRef, build_gang

    manifest = load_job(REPO / "manifests/examples/pod-template.yaml")
    job = JobRef(manifest.metadata["name"], crd_namespace, "00000000-0000-4000-8000-000000000001", manifest.spec)
    for stage in ("reward", "dpo"):
        pod = build_gang(job, stage, 0)[0]
        pod["metadata"].pop("ownerReferences")  # the owner does not exist: a dry run still checks the rest
        result = dev_cluster.kubectl("-n", crd_namespace, "create", "--dry-run=server", "-f", "-",
                                     input=json.dumps(pod))
        assert result.returncode == 0, f"{stage}: {result.stderr}"
