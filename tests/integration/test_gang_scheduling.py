"""runPolicy.gangScheduling against the real API server: the schedulers' own PodGroup CRDs installed, the
operator's PodGroups accepted by them, created with each gang and deleted with it.

The CRDs come from the schedulers' Go modules (the Go module proxy, as the cluster's other parts do):
sigs.k8s.io/scheduler-plugins ships its PodGroup CRD in the module (config/crd/bases). No gang scheduler
runs in the dev cluster, so a gang that names one stays Pending (what a user sees until the scheduler
places it); a job whose podTemplate names the default scheduler runs through, its PodGroup beside it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _pytest.fixtures import FixtureFunctionDefinition

from tests.integration import test_operator_lifecycle as lifecycle
from tests.integration.test_operator_lifecycle import REPO, Env, job_document, wait_for

pytestmark = pytest.mark.integration
# The lifecycle tests' fixtures (`env`: a namespace with its own operator, and what it needs).
globals().update(
    {name: value for name, value in vars(lifecycle).items() if isinstance(value, FixtureFunctionDefinition)}
)

# (module, version, the CRD's path in the module): sigs.k8s.io/scheduler-plugins' tag v0.31.8.
SCHEDULER_PLUGINS = (
    "sigs.k8s.io/scheduler-plugins",
    "v0.31.8",
    "config/crd/bases/scheduling.x-k8s.io_podgroups.yaml",
)
COSCHEDULING = ("scheduling.x-k8s.io", "v1alpha1", "podgroups")


def module_file(module: str, version: str, path: str) -> Path:
    """A file of a Go module, downloaded once into the Go module cache (`go mod download`)."""
    found = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"], capture_output=True, text=True, timeout=600
    )
    assert found.returncode == 0, f"go mod download {module}@{version}: {found.stdout}{found.stderr}"
    return Path(json.loads(found.stdout)["Dir"]) / path


@pytest.fixture(scope="module")
def pod_group_crds(dev_cluster: Any) -> None:
    crd = module_file(*SCHEDULER_PLUGINS)
    applied = dev_cluster.kubectl("apply", "--server-side", "-f", str(crd))
    assert applied.returncode == 0, applied.stderr
    wait_for(
        "the PodGroup CRD",
        lambda: (
            dev_cluster.kubectl(
                "wait", "--for=condition=Established", "crd/podgroups.scheduling.x-k8s.io", "--timeout=10s"
            ).returncode
            == 0
        ),
    )


def pod_groups(env: Env, job: str) -> dict[str, dict[str, Any]]:
    found = env.custom.list_namespaced_custom_object(
        *COSCHEDULING[:2], env.namespace, COSCHEDULING[2], label_selector=f"mmalign.io/job={job}"
    )
    return {item["metadata"]["name"]: item for item in found["items"]}


def test_a_coscheduled_gang_gets_its_podgroup_which_goes_with_the_gang(
    env: Env, pod_group_crds: None
) -> None:
    document = job_document(
        "cosched",
        stages=("reward",),
        env={"STUB_STEPS": "400"},
        run_policy={"gangScheduling": {"scheduler": "coscheduling", "scheduleTimeoutSeconds": 30}},
    )
    env.apply(document)
    groups = wait_for("the PodGroup of attempt 0", lambda: pod_groups(env, "cosched"))
    assert list(groups) == ["cosched-reward-0"]
    group = groups["cosched-reward-0"]
    assert group["spec"]["minMember"] == 2 and group["spec"]["scheduleTimeoutSeconds"] == 30
    assert group["spec"]["minResources"] == {"cpu": "200m", "memory": "256Mi"}  # the gang's requests, summed
    assert group["metadata"]["ownerReferences"][0]["name"] == "cosched"
    pods = wait_for("the gang", lambda: (lambda p: p if len(p) == 2 else None)(env.live_pods("cosched")))
    for pod in pods:
        assert pod.metadata.labels["scheduling.x-k8s.io/pod-group"] == "cosched-reward-0"
        assert pod.spec.scheduler_name == "scheduler-plugins-scheduler"
        assert pod.status.phase == "Pending"  # no coscheduler here: nobody places them
    # a gang restart: the old gang's PodGroup goes with its pods, the next attempt gets its own
    env.core.delete_namespaced_pod(pods[0].metadata.name, env.namespace)
    wait_for(
        "attempt 1's PodGroup alone", lambda: list(pod_groups(env, "cosched")) == ["cosched-reward-1"], 30
    )
    env.kubectl("delete", "aj", "cosched", "--wait=true", "--timeout=30s")
    wait_for("no PodGroup left", lambda: not pod_groups(env, "cosched"), 30)


def test_a_gang_that_runs_keeps_its_podgroup_until_its_pods_are_cleaned_up(
    env: Env, pod_group_crds: None
) -> None:
    # The coscheduler as the default scheduler's profile (how scheduler-plugins' own manifests install it):
    # the pod template names default-scheduler, which the dev cluster's node places.
    document = job_document(
        "runs",
        stages=("reward", "score"),
        env={"STUB_STEPS": "3"},
        run_policy={"gangScheduling": {"scheduler": "coscheduling"}},
    )
    document["spec"]["podTemplate"]["schedulerName"] = "default-scheduler"
    env.apply(document)
    wait_for("the reward PodGroup", lambda: "runs-reward-0" in pod_groups(env, "runs"))
    status = env.phase("runs", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded", status
    wait_for("pods cleaned up", lambda: not env.live_pods("runs"), 30)
    wait_for("their PodGroups with them", lambda: not pod_groups(env, "runs"), 30)


def test_a_scheduler_whose_crd_is_missing_is_named_in_the_status(env: Env) -> None:
    # No Volcano in the dev cluster: the API server has no scheduling.volcano.sh PodGroup to accept.
    env.apply(
        job_document("novolcano", stages=("reward",), run_policy={"gangScheduling": {"scheduler": "volcano"}})
    )
    failed = wait_for(
        "CreateFailed",
        lambda: (lambda c: c if c.get("status") == "True" else None)(
            env.condition("novolcano", "CreateFailed")
        ),
        30,
    )
    assert "creating PodGroup novolcano-reward-0 failed: HTTP 404" in failed["message"], failed
    assert "no podgroups.scheduling.volcano.sh CRD in the cluster: install volcano" in failed["message"], (
        failed
    )
    assert not env.pods("novolcano")  # no pod is placed alone while its PodGroup is missing


def test_volcano_accepts_the_gangs_podgroup_with_its_queue(env: Env) -> None:
    # Volcano's CRD (generated from volcano.sh/apis: tests/data/crds/), installed for this test only, so
    # that the missing-CRD test above holds in any order. The pods name the default scheduler to run here.
    crd = REPO / "tests/data/crds/scheduling.volcano.sh_podgroups.yaml"
    applied = env.cluster.kubectl("apply", "--server-side", "-f", str(crd))
    assert applied.returncode == 0, applied.stderr
    try:
        wait_for(
            "the Volcano PodGroup CRD",
            lambda: (
                env.cluster.kubectl(
                    "wait",
                    "--for=condition=Established",
                    "crd/podgroups.scheduling.volcano.sh",
                    "--timeout=10s",
                ).returncode
                == 0
            ),
        )
        document = job_document(
            "vc",
            stages=("reward",),
            env={"STUB_STEPS": "3"},
            run_policy={"gangScheduling": {"scheduler": "volcano", "queue": "default"}},
        )
        document["spec"]["podTemplate"]["schedulerName"] = "default-scheduler"
        env.apply(document)

        def groups() -> dict[str, dict[str, Any]]:
            found = env.custom.list_namespaced_custom_object(
                "scheduling.volcano.sh",
                "v1beta1",
                env.namespace,
                "podgroups",
                label_selector="mmalign.io/job=vc",
            )
            return {item["metadata"]["name"]: item for item in found["items"]}

        group = wait_for("the Volcano PodGroup", lambda: groups().get("vc-reward-0"))
        assert group["spec"]["minMember"] == 2 and group["spec"]["queue"] == "default"
        pods = wait_for("the gang", lambda: (lambda p: p if len(p) == 2 else None)(env.live_pods("vc")))
        assert {p.metadata.annotations["scheduling.k8s.io/group-name"] for p in pods} == {"vc-reward-0"}
        assert env.phase("vc", "Succeeded", "Failed", timeout=60)["phase"] == "Succeeded"
        wait_for("the PodGroup cleaned up with the pods", lambda: not groups(), 30)
    finally:
        env.cluster.kubectl(
            "delete", "crd", "podgroups.scheduling.volcano.sh", "--wait=true", "--timeout=60s"
        )
