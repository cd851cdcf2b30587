"""Builders: golden YAML of every object one stage attempt needs, and the rules behind the names.

Regenerate the goldens after an intended change:  MMALIGN_UPDATE_GOLDEN=1 pytest tests/unit/test_operator_builders.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mmalign.api.jobfile import load_job
from mmalign.api.keys import (
    KUEUE_POD_GROUP,
    KUEUE_POD_GROUP_COUNT,
    KUEUE_QUEUE,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NODE_RANK,
    LABEL_STAGE,
)
from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import (
    BuildOptions,
    JobRef,
    build_attempt,
    build_pod,
    master_address,
    object_name,
    pod_name,
    service_name,
)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
UID = "00000000-0000-4000-8000-000000000001"


def _job(example: str, namespace: str = "ml", labels: dict[str, str] | None = None) -> JobRef:
    manifest = load_job(REPO / "manifests/examples" / f"{example}.yaml")
    return JobRef(manifest.metadata["name"], namespace, UID, manifest.spec, labels or {})


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's job.yaml) as readable `|` blocks."""


_LiteralDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)
)


@pytest.mark.parametrize(("example", "stage"), [("tiny-cpu", "reward"), ("llava-ov-7b", "dpo")])
def test_golden(example: str, stage: str) -> None:
    objects = build_attempt(_job(example), stage, 0)  # type: ignore[arg-type]
    text = yaml.dump_all(objects, Dumper=_LiteralDumper, sort_keys=False)
    path = GOLDEN / f"operator-{example}-{stage}.yaml"
    if os.environ.get("MMALIGN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with MMALIGN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} changed; rerun with MMALIGN_UPDATE_GOLDEN=1 if intended"


def test_gang_env_and_dns_agree() -> None:
    job = _job("llava-ov-7b")
    pods = build_attempt(job, "reward", 2)[2:]
    assert [p["metadata"]["name"] for p in pods] == [f"llava-ov-7b-mmrlhf-reward-2-{n}" for n in range(4)]
    master = master_address(job, "reward", 2)
    node0 = pods[0]["spec"]
    # MASTER_ADDR is exactly node 0's DNS name through the headless Service.
    assert master == f"{node0['hostname']}.{node0['subdomain']}.ml.svc"
    for rank, pod in enumerate(pods):
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env["PET_NODE_RANK"] == str(rank)
        assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == master
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
        assert env["MMALIGN_ATTEMPT"] == "2"
        labels = pod["metadata"]["labels"]
        assert labels[LABEL_JOB] == "llava-ov-7b-mmrlhf" and labels[LABEL_STAGE] == "reward"
        assert labels[LABEL_ATTEMPT] == "2" and labels[LABEL_NODE_RANK] == str(rank)
        assert pod["spec"]["restartPolicy"] == "Never"
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["uid"] == UID and owner["controller"] is True


def test_long_names_are_cut_with_a_hash_and_stay_unique() -> None:
    long_a, long_b = "a" * 70 + "-one", "a" * 70 + "-two"
    names = {pod_name(j, "reward", 10, n) for j in (long_a, long_b) for n in range(3)}
    assert len(names) == 6
    for name in names:
        assert len(name) <= 63 and name.endswith(("-reward-10-0", "-reward-10-1", "-reward-10-2"))
        assert name[0].isalnum() and name[-1].isalnum()
    assert pod_name(long_a, "dpo", 0, 0) == pod_name(long_a, "dpo", 0, 0)  # deterministic
    assert object_name("Short_Name") == "short-name"
    assert service_name("7b-run") == "j-7b-run"  # Service names must start with a letter


def test_pod_template_fields_kueue_and_startup_timeout() -> None:
    spec = AlignmentJobSpec.model_validate({
        "model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://b/p/", "endpoint": "http://s3:8333", "region": "eu-1"},
        "stages": {"reward": {}},
        "resources": {"nodes": 2, "shmSize": "8Gi"},
        "podTemplate": {
            "nodeSelector": {"pool": "gpu"}, "priorityClassName": "high", "schedulerName": "volcano",
            "serviceAccountName": "trainer", "labels": {"team": "a"}, "annotations": {"note": "x"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MMALIGN_CACHE", "value": "/nvme/cache"}],
        },
        "runPolicy": {"startupTimeoutSeconds": 900},
    })
    job = JobRef("j", "ns", UID, spec, {KUEUE_QUEUE: "team-a"})
    pod = build_pod(job, "reward", 0, 1, BuildOptions.from_command_line("python stub.py --fast"))
    meta, pod_spec = pod["metadata"], pod["spec"]
    container = pod_spec["containers"][0]
    assert container["command"] == ["python", "stub.py", "--fast", "--job", "/etc/mmalign/job.yaml",
                                    "--stage", "reward"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["MASTER_PORT"] == "29500"
    # the gang's start deadline reaches torchrun's rendezvous (mmalign launch reads it)
    assert env["MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS"] == "900"
    # downloads and shards go to the scratch emptyDir unless the user says otherwise
    assert env["MMALIGN_CACHE"] == "/nvme/cache" and env["MMALIGN_LOCAL_DIR"] == "/var/lib/mmalign/local"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"} and mounts["dshm"] == "/dev/shm"
    assert "emptyDir" in volumes["scratch"] and mounts["scratch"] == "/var/lib/mmalign"
    # the trainer's one-line failure reason (or, when it wrote none, the log's tail) reaches the status
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "terminationMessagePath" not in container  # the default, /dev/termination-log
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333" and env["AWS_DEFAULT_REGION"] == "eu-1"
    assert "envFrom" not in container  # no credentialsSecret: the pod's cloud identity
    assert pod_spec["nodeSelector"] == {"pool": "gpu"} and pod_spec["schedulerName"] == "volcano"
    assert pod_spec["priorityClassName"] == "high" and pod_spec["serviceAccountName"] == "trainer"
    assert pod_spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert meta["labels"]["team"] == "a" and meta["annotations"]["note"] == "x"
    assert meta["labels"][KUEUE_QUEUE] == "team-a" and meta["labels"][KUEUE_POD_GROUP] == "j-reward-0"
    assert meta["annotations"][KUEUE_POD_GROUP_COUNT] == "2"
