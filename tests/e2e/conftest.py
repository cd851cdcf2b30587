"""tests/e2e's cluster: the dev cluster, started for the session and stopped after it, or, with
MMALIGN_KUBECONFIG and MMALIGN_IMAGE set, a cluster of yours that is neither started nor stopped
(devcluster/usercluster.py; docs/quickstart.md, "Bring your own cluster"):

    MMALIGN_KUBECONFIG=~/.kube/config MMALIGN_IMAGE=registry.example.com/mmalign:0.3.0 \\
    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... .venv/bin/pytest tests/e2e -q
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from mmalign.devcluster import demo, usercluster
from mmalign.devcluster.testing import started_dev_cluster, wait_for


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[demo.Cluster]:
    user = usercluster.from_env()
    if user is None:
        yield from started_dev_cluster(tmp_path_factory)
        return
    user.check_tools()
    print(f"\n[e2e] on {user.describe()}: no dev cluster started or stopped")
    yield user


@pytest.fixture
def namespace(dev_cluster: demo.Cluster) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount, made with kubectl (which speaks every kubeconfig's
    authentication: exec plugins, OIDC, tokens), deleted after the test."""
    name = f"e2e-{secrets.token_hex(3)}"
    demo.run(dev_cluster, "kubectl", "create", "namespace", name)
    wait_for(
        lambda: demo.run(
            dev_cluster,
            "kubectl",
            "get",
            "serviceaccount",
            "default",
            "-n",
            name,
            "--ignore-not-found",
            "-o",
            "name",
        ).strip(),
        60,
        interval=1,
        what=f"the default ServiceAccount in {name}",
    )
    yield name
    demo.run(dev_cluster, "kubectl", "delete", "namespace", name, "--wait=false", "--ignore-not-found")
