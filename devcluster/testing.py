"""pytest fixtures for tests against the dev cluster (`pytest_plugins = ["mmalign.devcluster.testing"]`).

- `dev_cluster` (session): one real cluster for the whole run, started with the same code as
  `mmalign dev up` in a temporary state folder and stopped at the end. Missing binaries are built first
  (minutes, once per machine); a failure to build or start fails the tests loudly, it never skips.
  Attributes: `.kubeconfig`, `.env` (KUBECONFIG, PATH, AWS_*), `.s3_endpoint`, `.s3_credentials`
  (boto3 keyword arguments), `.state_dir`, `.kubectl(*args) -> CompletedProcess`, `.api()` (JSON client).
- `namespace` (function): a fresh namespace per test, with its default ServiceAccount ready; deleted after.
- `dev_env` (function): os.environ patched with `dev_cluster.env`, for code that reads KUBECONFIG/AWS_*.

Knobs: MMALIGN_TEST_NODES (default 2), MMALIGN_TEST_GPUS_PER_NODE (default 0); MMALIGN_NODE=real starts
the real node instead (docs/devcluster.md), where pods run images: `node_image(dev, target)` puts the
project's image into the node's containerd. tests/e2e's conftest
replaces `dev_cluster` and `namespace` with the user's cluster when MMALIGN_KUBECONFIG is set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmalign.devcluster import binaries, cluster
from mmalign.devcluster.kubeapi import ApiError


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "") -> Any:
    """Poll until `predicate()` is truthy and return it; a TimeoutError names `what` on failure."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (ApiError, OSError) as err:
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}"
                       + (f" (last error: {last_error})" if last_error else ""))


def create_namespace(dev: cluster.DevCluster, prefix: str = "t") -> str:
    """A new namespace whose default ServiceAccount exists (pods are refused until it does)."""
    name = f"{re.sub(r'[^a-z0-9-]', '-', prefix.lower())[:40].strip('-') or 't'}-{secrets.token_hex(3)}"
    api = dev.api()
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
             what=f"default ServiceAccount in {name}")
    return name


def is_real_node(dev: cluster.DevCluster) -> bool:
    """Whether pods run as containers of an image (the real node), not as local processes."""
    return getattr(dev, "node", "process") == "real"


def node_image(dev: cluster.DevCluster, target: str = "operator", image: str | None = None) -> str:
    """The project's image (Dockerfile `target`, built for the current source, or `image` when given: one
    built before) in the node's registry and the real node's containerd; pods give it with any
    imagePullPolicy (Always and IfNotPresent pull from that registry, see realnode.REGISTRY)."""
    from mmalign.devcluster import images

    repo = Path(__file__).resolve().parents[1]
    image = image or images.project_image(repo, target=target)
    images.ensure_pulled(dev.node_layout, image)
    return image


def pod_phase(dev: cluster.DevCluster, namespace: str, name: str) -> str:
    phase: str = dev.api().get(f"/api/v1/namespaces/{namespace}/pods/{name}").get("status", {}).get("phase", "")
    return phase


def wait_pod_phase(dev: cluster.DevCluster, namespace: str, name: str, phases: tuple[str, ...],
                   timeout: float = 60) -> str:
    phase: str = wait_for(lambda: (p := pod_phase(dev, namespace, name)) in phases and p, timeout,
                          what=f"pod {namespace}/{name} in {phases}")
    return phase


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.DevCluster]:
    yield from started_dev_cluster(tmp_path_factory)


def started_dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.DevCluster]:
    """The body of `dev_cluster`, for a conftest whose own `dev_cluster` may use another cluster
    (tests/e2e: the user's, with MMALIGN_KUBECONFIG)."""
    binaries.ensure_all()
    if os.environ.get(cluster.NODE_ENV) == "real":
        binaries.ensure_real_node()
    # Short path: SeaweedFS puts unix sockets in the state folder (108-byte limit on socket paths).
    state_dir = tmp_path_factory.mktemp("dev")
    started = time.monotonic()
    dev = cluster.up(state_dir, nodes=int(os.environ.get("MMALIGN_TEST_NODES", "2")),
                     gpus_per_node=int(os.environ.get("MMALIGN_TEST_GPUS_PER_NODE", "0")), timeout=180)
    print(f"\n[dev_cluster] up in {time.monotonic() - started:.1f}s at {state_dir}")
    try:
        yield dev
    finally:
        # Keep the components' logs (and which of them were still alive) beside pytest's other temp
        # folders: `down` removes the state folder, and a flaky failure is undebuggable without them.
        kept = tmp_path_factory.getbasetemp() / "dev-cluster-logs"
        shutil.copytree(dev.layout.logs, kept, dirs_exist_ok=True)
        (kept / "alive-at-teardown.json").write_text(json.dumps(dev.alive(), indent=2))
        dev.down()


@pytest.fixture
def namespace(dev_cluster: cluster.DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = create_namespace(dev_cluster, request.node.name)
    yield name
    try:
        dev_cluster.api().delete(f"/api/v1/namespaces/{name}")
    except ApiError:
        pass


@pytest.fixture
def dev_env(dev_cluster: cluster.DevCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in dev_cluster.env.items():
        monkeypatch.setenv(key, value)
    return dev_cluster.env
