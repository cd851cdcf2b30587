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
    from mmalign.devcluster.testing import create_namespace

    applied = dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                                  str(REPO / "manifests/crds/alignmentjobs.yaml"))
    assert applied.returncode == 0, applied.stderr
    established = dev_cluster.kubectl("wait", "--for=condition=Established", "crd/alignmentjobs.mmalign.io",
                                      "--timeout=30s")
    assert established.returncode == 0, established.stderr
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
