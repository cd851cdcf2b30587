"""The dev cluster's real parts and the process node, end to end (one shared session cluster).

    .venv/bin/pytest tests/integration/test_devcluster.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmalign.devcluster import cluster as devcluster
from mmalign.devcluster.testing import wait_for, wait_pod_phase

pytestmark = pytest.mark.integration


def apply(dev: Any, namespace: str, *objects: dict) -> None:
    text = yaml.safe_dump_all(objects)
    result = dev.kubectl("-n", namespace, "apply", "-f", "-", input=text)
    assert result.returncode == 0, result.stderr


def pod(name: str, script: str, restart: str = "Never", **spec: Any) -> dict:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": restart, "containers": [container], **spec}}


def logs(dev: Any, namespace: str, name: str) -> str:
    result = dev.kubectl("-n", namespace, "logs", name)
    assert result.returncode == 0, result.stderr
    return result.stdout


def get(dev: Any, namespace: str, kind: str, name: str) -> dict:
    return json.loads(dev.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=True).stdout)


def test_python_pod_succeeds_and_kubectl_logs_shows_output(dev_cluster: Any, namespace: str) -> None:
    apply(dev_cluster, namespace, pod("hello", "print('hello from a process node')"))
    assert wait_pod_phase(dev_cluster, namespace, "hello", ("Succeeded", "Failed")) == "Succeeded"
    assert logs(dev_cluster, namespace, "hello") == "hello from a process node\n"
    status = get(dev_cluster, namespace, "pod", "hello")["status"]
    assert status["podIP"].startswith("127.")
    assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_failure_reports_exit_code_and_on_failure_restarts(dev_cluster: Any, namespace: str) -> None:
    apply(dev_cluster, namespace, pod("fails", "import sys; print('bye'); sys.exit(3)"),
          pod("flaky", "import os, sys; p = 'marker'; ok = os.path.exists(p); open(p, 'w').close(); "
                       "sys.exit(0 if ok else 1)", restart="OnFailure",
              volumes=[{"name": "shared", "emptyDir": {}}],
              container={"workingDir": "/data", "volumeMounts": [{"name": "shared", "mountPath": "/data"}]}))
    assert wait_pod_phase(dev_cluster, namespace, "fails", ("Succeeded", "Failed")) == "Failed"
    term = get(dev_cluster, namespace, "pod", "fails")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert wait_pod_phase(dev_cluster, namespace, "flaky", ("Succeeded", "Failed")) == "Succeeded"
    assert get(dev_cluster, namespace, "pod", "flaky")["status"]["containerStatuses"][0]["restartCount"] == 1


def test_env_sources_volumes_and_path_rewriting(dev_cluster: Any, namespace: str) -> None:
    apply(dev_cluster, namespace,
          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "job"},
           "data": {"spec.yaml": "steps: 3\n", "mode": "fast"}},
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}})
    script = ("import os, sys; print(open(sys.argv[1].split('=', 1)[1]).read().strip()); "
              "print(*[os.environ[k] for k in ('POD', 'NS', 'SECRET', 'MODE', 'CONFIG', 'GREETING')]); "
              "print(open(os.environ['CONFIG']).read().strip()); print(os.getcwd())")
    apply(dev_cluster, namespace, pod("envs", script, volumes=[{"name": "cfg", "configMap": {"name": "job"}}], container={
        "args": ["--config=/etc/job/spec.yaml"], "workingDir": "/workspace",
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/job"}],
        "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "job", "key": "mode"}}},
                {"name": "CONFIG", "value": "/etc/job/spec.yaml"},
                {"name": "GREETING", "value": "hi-$(POD)"}]}))
    assert wait_pod_phase(dev_cluster, namespace, "envs", ("Succeeded", "Failed")) == "Succeeded", \
        logs(dev_cluster, namespace, "envs")
    out = logs(dev_cluster, namespace, "envs").splitlines()
    assert out[0] == "steps: 3"
    assert out[1] == f"envs {namespace} s3cr3t fast {out[1].split()[4]} hi-envs"
    assert out[1].split()[4].endswith("/volumes/cfg/spec.yaml")
    assert out[2] == "steps: 3"
    assert out[3].endswith("/rootfs/workspace")


def test_deployment_runs_and_deleting_it_collects_its_pods(dev_cluster: Any, namespace: str) -> None:
    result = dev_cluster.kubectl("-n", namespace, "create", "deployment", "web", "--image=nginx", "--replicas=2",
                                 "--", "python", "-c", "import time; print('serving', flush=True); time.sleep(600)")
    assert result.returncode == 0, result.stderr

    def running_pods() -> list[dict]:
        items = json.loads(dev_cluster.kubectl("-n", namespace, "get", "pods", "-l", "app=web", "-o", "json",
                                               check=True).stdout)["items"]
        return items if len(items) == 2 and all(p["status"].get("phase") == "Running" for p in items) else []

    pods = wait_for(running_pods, 60, what="2 running Deployment pods")
    assert {p["spec"]["nodeName"] for p in pods} == {"process-node-0", "process-node-1"}  # spread
    assert wait_for(lambda: "serving" in logs(dev_cluster, namespace, pods[0]["metadata"]["name"]), 20)
    assert dev_cluster.kubectl("-n", namespace, "delete", "deployment", "web", "--wait=false").returncode == 0
    wait_for(lambda: not json.loads(dev_cluster.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"],
             60, what="the garbage collector to delete the Deployment's pods")


def test_deletion_sends_sigterm_then_removes_the_pod(dev_cluster: Any, namespace: str, tmp_path: Path) -> None:
    script = ("import os, signal, sys, time; "
              f"open('{tmp_path}/pid', 'w').write(str(os.getpid())); "
              f"signal.signal(signal.SIGTERM, lambda *a: (open('{tmp_path}/term', 'w').close(), sys.exit(0))); "
              "time.sleep(600)")
    apply(dev_cluster, namespace, pod("sleeper", script))
    wait_for(lambda: (tmp_path / "pid").exists(), 30, what="the pod's process")
    started = time.monotonic()
    assert dev_cluster.kubectl("-n", namespace, "delete", "pod", "sleeper", "--timeout=60s").returncode == 0
    assert time.monotonic() - started < 20  # SIGTERM honoured: no wait for the 30 s grace period
    assert (tmp_path / "term").exists()
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_unschedulable_pod_stays_pending_with_event(dev_cluster: Any, namespace: str) -> None:
    apply(dev_cluster, namespace, pod("greedy", "print(1)", container={
        "resources": {"limits": {"nvidia.com/gpu": "64"}}}), pod("picky", "print(1)", nodeSelector={"zone": "mars"}))

    def failed_scheduling() -> set[str]:
        events = json.loads(dev_cluster.kubectl("-n", namespace, "get", "events", "-o", "json").stdout)["items"]
        return {e["involvedObject"]["name"] for e in events if e["reason"] == "FailedScheduling"}

    wait_for(lambda: failed_scheduling() >= {"greedy", "picky"}, 30, what="FailedScheduling events")
    for name in ("greedy", "picky"):
        status = get(dev_cluster, namespace, "pod", name)["status"]
        assert status["phase"] == "Pending"
        assert status["conditions"][0]["reason"] == "Unschedulable"


def test_service_account_identity_and_rbac_refusal(dev_cluster: Any, namespace: str) -> None:
    """A pod runs with its ServiceAccount's token: no rights -> Forbidden; a RoleBinding -> allowed."""
    script = ("import subprocess, sys; r = subprocess.run(['kubectl', 'get', 'pods'], capture_output=True, "
              "text=True); print(r.stdout, r.stderr); sys.exit(r.returncode)")
    apply(dev_cluster, namespace,
          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}},
          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-pods"},
           "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
           "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    apply(dev_cluster, namespace, pod("as-nobody", script, serviceAccountName="nobody"),
          pod("as-reader", script, serviceAccountName="reader"))
    assert wait_pod_phase(dev_cluster, namespace, "as-nobody", ("Succeeded", "Failed")) == "Failed"
    out = logs(dev_cluster, namespace, "as-nobody")
    assert "Forbidden" in out and f"system:serviceaccount:{namespace}:nobody" in out
    assert wait_pod_phase(dev_cluster, namespace, "as-reader", ("Succeeded", "Failed")) == "Succeeded", \
        logs(dev_cluster, namespace, "as-reader")


GLOO = """
import os, torch, torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"tcp://w0.grp:{os.environ['PORT']}", rank=rank, world_size=2)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print("sum", t.item(), flush=True)
dist.destroy_process_group()
"""


def test_gloo_all_reduce_between_two_pods_over_pod_dns(dev_cluster: Any, namespace: str) -> None:
    """The torchrun rendezvous the operator relies on: headless Service + hostname/subdomain names."""
    with socket.socket() as sock:  # pods share the host's ports: pick a free one for the TCPStore
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "grp"},
               "spec": {"clusterIP": "None", "selector": {"app": "gloo"}, "publishNotReadyAddresses": True,
                        "ports": [{"name": "c10d", "port": int(port)}]}}
    workers = [pod(f"w{rank}", GLOO, metadata={"labels": {"app": "gloo"}}, hostname=f"w{rank}", subdomain="grp",
                   container={"env": [{"name": "RANK", "value": str(rank)}, {"name": "PORT", "value": port}]})
               for rank in (0, 1)]
    apply(dev_cluster, namespace, service, *workers)
    for rank in (0, 1):
        phase = wait_pod_phase(dev_cluster, namespace, f"w{rank}", ("Succeeded", "Failed"), timeout=120)
        assert phase == "Succeeded", logs(dev_cluster, namespace, f"w{rank}")
        assert "sum 3.0" in logs(dev_cluster, namespace, f"w{rank}")


def test_s3_multipart_list_and_conditional_put(dev_cluster: Any) -> None:
    boto3 = pytest.importorskip("boto3", reason="boto3 comes with the trainer extra")
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=dev_cluster.s3_endpoint, **dev_cluster.s3_credentials)
    s3.create_bucket(Bucket="devcluster-test")
    part = os.urandom(5 * 1024 * 1024)
    upload = s3.create_multipart_upload(Bucket="devcluster-test", Key="big/object")
    etags = [s3.upload_part(Bucket="devcluster-test", Key="big/object", UploadId=upload["UploadId"], PartNumber=n,
                            Body=part if n == 1 else b"tail")["ETag"] for n in (1, 2)]
    s3.complete_multipart_upload(Bucket="devcluster-test", Key="big/object", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n}
                                                            for n, e in enumerate(etags, 1)]})
    assert s3.head_object(Bucket="devcluster-test", Key="big/object")["ContentLength"] == len(part) + 4
    s3.put_object(Bucket="devcluster-test", Key="big/latest", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket="devcluster-test", Key="big/latest", Body=b"2", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    listed = s3.list_objects_v2(Bucket="devcluster-test", Prefix="big/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["big/latest", "big/object"]


def test_cli_up_env_down_leaves_nothing(tmp_path: Path) -> None:
    """A second cluster through the CLI: `dev env` works, `dev down` leaves no process, port or folder."""
    state = tmp_path / "st"
    mmalign = [sys.executable, "-m", "mmalign", "dev", "--state-dir", str(state)]
    started = time.monotonic()
    subprocess.run([*mmalign, "up", "--nodes", "1"], check=True, timeout=180)
    up_seconds = time.monotonic() - started
    env_lines = subprocess.run([*mmalign, "env"], check=True, capture_output=True, text=True).stdout
    assert "export KUBECONFIG=" in env_lines and "export AWS_ENDPOINT_URL=" in env_lines
    dev = devcluster.load(state)
    assert dev.kubectl("run", "sleeper", "--image=x", "--restart=Never", "--command", "--",
                       "python", "-c", "import time; print('zzz', flush=True); time.sleep(600)").returncode == 0
    wait_for(lambda: list(state.glob("pods/*/pgid")), 30, what="the pod's process")
    dev_logs = [*mmalign, "logs", "sleeper"]
    wait_for(lambda: subprocess.run(dev_logs, capture_output=True, text=True).stdout == "zzz\n", 20,
             what="`mmalign dev logs` to show the pod's output")
    pgid = int(next(state.glob("pods/*/pgid")).read_text())
    pids = [p["pid"] for p in dev.processes.values()] + [pgid]
    ports = list(dev.ports.values())
    subprocess.run([*mmalign, "down"], check=True, timeout=120)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    assert [port for port in ports if devcluster.port_open(port)] == []
    assert not state.exists()
    assert [p for p in Path("/tmp").glob("seaweedfs-*.sock") if int(p.stem.rsplit("-", 1)[1]) in ports] == []
    print(f"cold-process CLI dev up (1 node): {up_seconds:.1f}s")
