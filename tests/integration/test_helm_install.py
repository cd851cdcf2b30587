"""The Helm chart on the real local control plane: install, RBAC proven, upgrade, uninstall.

One story, in order, on the `dev_cluster` fixture (real kube-apiserver with RBAC, controller-manager,
process nodes that run each container's command with the pod's ServiceAccount token):

1. `helm install` -> the operator pod runs `mmalign operator ...` as the chart's ServiceAccount;
2. one rule removed from the chart's ClusterRole -> an AlignmentJob gets no pods and the operator
   logs 403 Forbidden: the operator really runs under the chart's RBAC, not as an admin;
3. `helm upgrade` with a changed value -> a new ReplicaSet rolls out, and Helm puts the rule back (and
   the AlignmentJob CRD's printer column that was removed by hand: the CRD is a chart template);
4. the job reaches Succeeded through reward -> score -> dpo (a stub trainer command, see below);
5. `helm uninstall` -> no object of the release is left; the AlignmentJob CRD stays (`crds.keep`
   defaults to true, charts/mmalign/README.md), and kopf's peering CRDs (crds/) too.

`test_two_replicas_one_acts` installs with `crds.keep=false` and checks that its uninstall deletes the
CRD. The CRD is cluster-wide and the `dev_cluster` fixture is one cluster for the whole session, so:
every install here passes `--take-ownership` (the CRD may exist from another test's `kubectl apply` or
from the e2e test's release, which a plain install refuses to adopt, see docs/install.md), the test
that deletes the CRD is the last of this module and waits until it is gone, and the other modules
that need the CRD apply it themselves.

The trainer pods run a stub (`MMALIGN_TRAINER_COMMAND`, the operator's test-only override) that prints
one progress line and exits 0: this test is about the chart, the trainer has its own tests.

    .venv/bin/pytest tests/integration/test_helm_install.py -s    # -s prints each step's seconds
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/mmalign"
RELEASE = "mmalign-it"  # contains "mmalign": object names are the release name
SYSTEM_NS = "mmalign-it-system"
JOBS_NS = "mmalign-it-jobs"
JOB = "helm-smoke"
CRD = "alignmentjobs.mmalign.io"
KEEP = "helm.sh/resource-policy"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
DROPPED = "services"  # the rule removed in step 2: the operator applies the job's Service first

STUB_TRAINER = shlex.join([
    sys.executable, "-c",
    "import json, sys; stage = sys.argv[sys.argv.index('--stage') + 1]; "
    "print('mmalign-progress ' + json.dumps({'stage': stage, 'step': 1, 'total': 1}), flush=True)",
])


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    # The process node runs pods on this machine, and other test runs may too: no fixed ports.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Steps:
    """Times each step; `-s` shows them (docs/install.md quotes these numbers)."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"[helm-it] {what}: {now - self.last:.1f}s (total {now - self.start:.1f}s)", flush=True)
        self.last = now


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5,
             explain: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{explain()}")
        time.sleep(every)


class Cluster:
    """kubectl and helm against the dev cluster, with its KUBECONFIG and PATH (cached helm first)."""

    def __init__(self, dev_cluster: Any) -> None:
        self.dev = dev_cluster
        self.env = {**os.environ, **dev_cluster.env}
        found = shutil.which("helm", path=self.env["PATH"])
        assert found, f"no helm on the dev cluster's PATH ({self.env['PATH']}): run `make binaries`"
        self.helm_path = found

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        proc = self.dev.kubectl(*args, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return str(proc.stdout)

    def get(self, *args: str) -> dict[str, Any]:
        out = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out) if out.strip() else {}

    def items(self, *args: str) -> list[dict[str, Any]]:
        return list(self.get(*args).get("items", []))

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.helm_path, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def install(self, values: Path, *extra: str) -> str:
        """`helm install` of RELEASE; it takes over an AlignmentJob CRD left by another test or release."""
        return self.helm("install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace",
                         "--take-ownership", "-f", str(values), *extra).stdout

    def operator_logs(self) -> str:
        pods = self.items("pods", "-n", SYSTEM_NS, "-l", INSTANCE)
        return "\n".join(self.kubectl("logs", "-n", SYSTEM_NS, p["metadata"]["name"], check=False) for p in pods)

    def describe(self) -> str:
        """What a human would look at when a step times out."""
        parts = []
        for args in (["get", "deploy,rs,pods", "-n", SYSTEM_NS, "-o", "wide"], ["get", "aj,pods,svc", "-n", JOBS_NS],
                     ["get", "events", "-n", JOBS_NS, "--sort-by=.lastTimestamp"]):
            parts.append(f"$ kubectl {' '.join(args)}\n{self.kubectl(*args, check=False)}")
        parts.append("operator logs (last 40 lines):\n" + "\n".join(self.operator_logs().splitlines()[-40:]))
        return "\n".join(parts)


def job_manifest() -> str:
    job = yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())
    job["metadata"] = {"name": JOB, "namespace": JOBS_NS}
    return yaml.safe_dump(job)


def values_file(folder: Path) -> Path:
    values = {
        "operator": {
            "healthPort": free_port(),
            "logFormat": "plain",
            "extraEnv": [{"name": "MMALIGN_TRAINER_COMMAND", "value": STUB_TRAINER}],
        },
        "metrics": {"port": free_port()},
    }
    path = folder / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------- the story


def test_install_rbac_upgrade_uninstall(dev_cluster: Any, tmp_path: Path) -> None:
    cluster = Cluster(dev_cluster)
    values = values_file(tmp_path)
    steps = Steps()
    try:
        _story(cluster, values, steps)
    finally:
        _cleanup(cluster)


def _story(cluster: Cluster, values: Path, steps: Steps) -> None:
    # -- 1. install: the operator runs as the chart's ServiceAccount -------------------------------
    cluster.kubectl("create", "namespace", JOBS_NS)
    cluster.kubectl("-n", JOBS_NS, "create", "secret", "generic", "s3-credentials",
                    "--from-literal=AWS_ACCESS_KEY_ID=unused", "--from-literal=AWS_SECRET_ACCESS_KEY=unused")
    notes = cluster.install(values)
    # NOTES.txt tells the user the next commands; the first one is the one we run next.
    assert f"kubectl -n {SYSTEM_NS} rollout status deployment/{RELEASE}" in notes, notes
    assert "kubectl apply -f manifests/examples/tiny-cpu.yaml" in notes, notes
    cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=90s")
    steps.done("helm install + operator ready")

    pods = cluster.items("pods", "-n", SYSTEM_NS, "-l", INSTANCE)
    assert len(pods) == 1, cluster.describe()
    operator_pod = pods[0]
    assert operator_pod["spec"]["serviceAccountName"] == RELEASE
    assert operator_pod["spec"]["containers"][0]["command"] == ["mmalign", "operator"]
    assert operator_pod["status"]["phase"] == "Running"
    can = cluster.kubectl("auth", "can-i", "create", "pods", "-n", JOBS_NS,
                          f"--as=system:serviceaccount:{SYSTEM_NS}:{RELEASE}", check=False)
    cannot = cluster.kubectl("auth", "can-i", "get", "secrets", "-n", JOBS_NS,
                             f"--as=system:serviceaccount:{SYSTEM_NS}:{RELEASE}", check=False)
    assert (can.strip(), cannot.strip()) == ("yes", "no")
    # The CRD is the release's (a template, from files/crds/), labelled, and kept on uninstall.
    crd = cluster.get("crd", CRD)
    assert crd, "helm install creates the AlignmentJob CRD"
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    annotations = crd["metadata"]["annotations"]
    assert (annotations["meta.helm.sh/release-name"], annotations[KEEP]) == (RELEASE, "keep")

    # -- 2. one rule less: the job makes no progress and the operator logs Forbidden -------------
    role = cluster.get("clusterrole", RELEASE)
    index = next(i for i, rule in enumerate(role["rules"]) if DROPPED in rule["resources"])
    cluster.kubectl("patch", "clusterrole", RELEASE, "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": f"/rules/{index}"}]))
    cluster.kubectl("apply", "-f", "-", input=job_manifest())
    # ... and a printer column of the CRD removed by hand, for step 3.
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    cluster.kubectl("patch", "crd", CRD, "--type=json", "-p", json.dumps(
        [{"op": "remove", "path": f"/spec/versions/0/additionalPrinterColumns/{columns.index('Progress')}"}]))
    # The API server names the identity it refused: the chart's ServiceAccount, not an admin.
    refused = f'User "system:serviceaccount:{SYSTEM_NS}:{RELEASE}" cannot patch resource "{DROPPED}"'
    wait_for(f"the operator to log: {refused}", lambda: refused in cluster.operator_logs(),
             timeout=45, explain=cluster.describe)
    assert not cluster.items("pods", "-n", JOBS_NS, "-l", f"mmalign.io/job={JOB}"), "no pods without the rule"
    phase = cluster.get("aj", JOB, "-n", JOBS_NS).get("status", {}).get("phase")
    assert phase not in ("Running", "Succeeded"), phase
    steps.done(f"without the {DROPPED} rule: Forbidden, no pods")

    # -- 3. upgrade with a changed value: a new ReplicaSet, and the rule is back -----------------
    old_hashes = {rs["metadata"]["labels"]["pod-template-hash"]
                  for rs in cluster.items("rs", "-n", SYSTEM_NS, "-l", INSTANCE)}
    cluster.helm("upgrade", RELEASE, str(CHART), "-n", SYSTEM_NS, "-f", str(values),
                 "--set", "operator.logLevel=debug")
    cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=90s")
    replica_sets = cluster.items("rs", "-n", SYSTEM_NS, "-l", INSTANCE)
    new = [rs for rs in replica_sets if rs["metadata"]["labels"]["pod-template-hash"] not in old_hashes]
    assert len(new) == 1 and new[0]["status"].get("readyReplicas") == 1, cluster.describe()
    assert all(rs["spec"]["replicas"] == 0 for rs in replica_sets if rs not in new)
    new_hash = new[0]["metadata"]["labels"]["pod-template-hash"]
    pods = cluster.items("pods", "-n", SYSTEM_NS, "-l", f"{INSTANCE},pod-template-hash={new_hash}")
    assert len(pods) == 1 and "--verbose" in pods[0]["spec"]["containers"][0]["args"]
    rules = cluster.get("clusterrole", RELEASE)["rules"]
    assert any(DROPPED in rule["resources"] for rule in rules), "helm upgrade restores the chart's RBAC"
    restored = cluster.get("crd", CRD)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in restored] == columns, "helm upgrade upgrades the CRD (a template, not crds/)"
    steps.done("helm upgrade rolled a new ReplicaSet")

    # -- 4. the job runs through its three stages ------------------------------------------------
    def succeeded() -> bool:
        status = cluster.get("aj", JOB, "-n", JOBS_NS).get("status", {})
        assert status.get("phase") != "Failed", json.dumps(status, indent=2)
        return status.get("phase") == "Succeeded"

    wait_for(f"AlignmentJob {JOB} to succeed", succeeded, timeout=150, every=1, explain=cluster.describe)
    stages = cluster.get("aj", JOB, "-n", JOBS_NS)["status"]["stages"]
    assert {name: stages[name]["phase"] for name in ("reward", "score", "dpo")} == dict.fromkeys(
        ("reward", "score", "dpo"), "Succeeded")
    steps.done("AlignmentJob Succeeded")

    # -- 5. uninstall: nothing of the release is left, the CRDs stay (crds.keep) ----------------
    cluster.kubectl("delete", "aj", JOB, "-n", JOBS_NS, "--timeout=60s")  # the operator lifts its finalizer
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout=90s")
    kinds = "deployments,replicasets,pods,serviceaccounts,services,configmaps,roles,rolebindings"
    cluster_kinds = "clusterroles,clusterrolebindings,clusterkopfpeerings"

    def nothing_left() -> bool:
        left = cluster.items(kinds, "-n", SYSTEM_NS, "-l", INSTANCE) + cluster.items(cluster_kinds, "-l", INSTANCE)
        return not left

    wait_for("every object of the release to be gone", nothing_left, timeout=60,
             explain=lambda: cluster.kubectl("get", kinds, "-n", SYSTEM_NS, "-l", INSTANCE, check=False))
    kept = cluster.get("crd", CRD)
    assert kept, "crds.keep (the default): helm uninstall leaves the AlignmentJob CRD"
    assert "deletionTimestamp" not in kept["metadata"], kept["metadata"]
    assert cluster.get("crd", "clusterkopfpeerings.kopf.dev")
    steps.done("helm uninstall left nothing but the CRDs")


def _cleanup(cluster: Cluster) -> None:
    """Leave the shared dev cluster as we found it (the CRDs stay, as after any default uninstall)."""
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--timeout=60s", check=False)
    for job in cluster.items("aj", "-n", JOBS_NS):  # no operator left to lift the finalizers
        cluster.kubectl("patch", "aj", job["metadata"]["name"], "-n", JOBS_NS, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False)
    for namespace in (JOBS_NS, SYSTEM_NS):
        cluster.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--timeout=60s", check=False)
    # A `crds.keep=false` release's CRD may still be terminating: the next install needs it gone.
    if cluster.get("crd", CRD).get("metadata", {}).get("deletionTimestamp"):
        cluster.kubectl("wait", "--for=delete", f"crd/{CRD}", "--timeout=60s", check=False)


def test_watch_namespaces_mode_needs_nothing_cluster_wide(dev_cluster: Any, tmp_path: Path) -> None:
    """`operator.watchNamespaces`: Roles only (no ClusterRole), and the operator still finishes a job."""
    cluster = Cluster(dev_cluster)
    values = values_file(tmp_path)
    steps = Steps()
    try:
        cluster.kubectl("create", "namespace", JOBS_NS)
        cluster.kubectl("-n", JOBS_NS, "create", "secret", "generic", "s3-credentials",
                        "--from-literal=AWS_ACCESS_KEY_ID=unused", "--from-literal=AWS_SECRET_ACCESS_KEY=unused")
        cluster.install(values, "--set", f"operator.watchNamespaces={{{JOBS_NS}}}")
        assert not cluster.items("clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", INSTANCE)
        assert [r["metadata"]["namespace"] for r in cluster.items("roles", "-A", "-l", INSTANCE)] == [JOBS_NS]
        cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=90s")
        cluster.kubectl("apply", "-f", "-", input=job_manifest())
        wait_for(f"AlignmentJob {JOB} to succeed",
                 lambda: cluster.get("aj", JOB, "-n", JOBS_NS).get("status", {}).get("phase") == "Succeeded",
                 timeout=120, every=1, explain=cluster.describe)
        steps.done("watch-namespaces install + job Succeeded")
        cluster.kubectl("delete", "aj", JOB, "-n", JOBS_NS, "--timeout=60s")
    finally:
        _cleanup(cluster)


def test_two_replicas_one_acts(dev_cluster: Any, tmp_path: Path) -> None:
    """`operator.replicas: 2` with peering: one replica acts, the other stands by, the job finishes.

    kopf pauses ALL peers of equal priority, so this needs `mmalign operator` to give replicas distinct
    priorities (it orders them by start time); the chart passes no --priority.

    Also `crds.keep=false`: this release's uninstall deletes the AlignmentJob CRD. Last in the module
    (see the module docstring); it waits until the CRD is gone, so no later install meets a terminating one.
    """
    cluster = Cluster(dev_cluster)
    values = values_file(tmp_path)
    try:
        cluster.kubectl("create", "namespace", JOBS_NS)
        cluster.kubectl("-n", JOBS_NS, "create", "secret", "generic", "s3-credentials",
                        "--from-literal=AWS_ACCESS_KEY_ID=unused", "--from-literal=AWS_SECRET_ACCESS_KEY=unused")
        cluster.install(values, "--set", "operator.replicas=2", "--set", "crds.keep=false")
        # Helm's uninstall reads the policy from the release's manifest. (A CRD kept by an earlier test
        # and adopted here keeps its old `keep` annotation on the live object: adoption adds, never removes.)
        manifest = cluster.helm("get", "manifest", RELEASE, "-n", SYSTEM_NS).stdout
        [released] = [doc for doc in yaml.safe_load_all(manifest) if doc and doc["kind"] == "CustomResourceDefinition"]
        assert KEEP not in released["metadata"].get("annotations", {}), released["metadata"]
        cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=90s")
        cluster.kubectl("apply", "-f", "-", input=job_manifest())

        def finished_or_all_paused() -> str | None:
            if cluster.get("aj", JOB, "-n", JOBS_NS).get("status", {}).get("phase") == "Succeeded":
                return "Succeeded"
            return "all paused" if "Pausing all operators" in cluster.operator_logs() else None

        outcome = wait_for("the job to succeed (or every replica to pause)", finished_or_all_paused,
                           timeout=120, every=1, explain=cluster.describe)
        assert outcome == "Succeeded", cluster.describe()
        logs = [cluster.kubectl("logs", "-n", SYSTEM_NS, pod["metadata"]["name"], check=False)
                for pod in cluster.items("pods", "-n", SYSTEM_NS, "-l", INSTANCE)]
        # The acting replica logs the stage transitions; the standby (paused from its start, as kopf's
        # mandatory peering begins paused) logs none of them.
        acted = sorted("stages reward, score, dpo succeeded" in log for log in logs)
        assert acted == [False, True], "\n=====\n".join(logs)
        cluster.kubectl("delete", "aj", JOB, "-n", JOBS_NS, "--timeout=60s")

        # crds.keep=false: uninstall deletes the CRD (no AlignmentJob is left to hold it up).
        cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout=90s")
        wait_for(f"crd/{CRD} to be deleted", lambda: not cluster.get("crd", CRD), timeout=60,
                 explain=lambda: cluster.kubectl("get", "crd", CRD, "-o", "yaml", check=False))
        assert cluster.get("crd", "clusterkopfpeerings.kopf.dev"), "Helm never deletes crds/ (kopf's peering)"
    finally:
        _cleanup(cluster)
