"""spec.podTemplate as a pod template overlay: the merge into trainer pods, the operator's protected
fields, per-stage overrides, and the generated Kubernetes schema (docs/api.md, "Pod template").

The same overlays go through the real API server in tests/integration/test_operator_api.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from mmalign.api import podtemplate
from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import JobRef, build_gang, build_pod, with_operator_defaults
from mmalign.operator.validate import validate_text

UID = "00000000-0000-4000-8000-000000000001"
BASE: dict[str, Any] = {
    "model": {"uri": "builtin://tiny-text"},
    "data": {"uri": "builtin://synthetic-colors"},
    "storage": {"uri": "s3://b/p/", "credentialsSecret": "s3-keys"},
    "resources": {"nodes": 2, "requests": {"cpu": "4", "memory": "8Gi"}},
    "stages": {"reward": {}, "dpo": {}},
}
# One overlay with every kind of plumbing a platform asks for.
OVERLAY: dict[str, Any] = {
    "metadata": {"labels": {"team": "vision"}, "annotations": {"example.com/cost-center": "42"}},
    "spec": {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["h100"]}]}
                    ]
                }
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
        "imagePullSecrets": [{"name": "registry"}],
        "securityContext": {"runAsNonRoot": True, "fsGroup": 1000},
        "volumes": [
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "mm-rlhf", "readOnly": True}},
            {"name": "scratch", "hostPath": {"path": "/mnt/nvme", "type": "DirectoryOrCreate"}},
        ],
        "initContainers": [{"name": "warm-cache", "image": "busybox:1.36", "command": ["true"]}],
        "containers": [
            {
                "name": "trainer",
                "env": [
                    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                    {"name": "NCCL_DEBUG", "value": "WARN"},
                ],
                "envFrom": [{"configMapRef": {"name": "nccl-tuning"}}],
                "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
                "securityContext": {"allowPrivilegeEscalation": False},
                "resources": {"requests": {"rdma/ib": 1}, "limits": {"rdma/ib": 1}},
            },
            {"name": "log-shipper", "image": "fluent/fluent-bit:3.0"},
        ],
    },
}


def _spec(**changes: Any) -> AlignmentJobSpec:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return AlignmentJobSpec.model_validate(raw)


def _pod(spec: AlignmentJobSpec, stage: str = "reward", node: int = 0) -> dict[str, Any]:
    return build_pod(JobRef("j", "ns", UID, spec), stage, 0, node)  # type: ignore[arg-type]


def _by_name(items: list[dict[str, Any]], key: str = "name") -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


def test_the_overlay_reaches_the_pod_and_the_operators_parts_stay() -> None:
    pod = _pod(_spec(podTemplate=OVERLAY))
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"]["team"] == "vision" and meta["labels"]["mmalign.io/stage"] == "reward"
    assert meta["annotations"] == {"example.com/cost-center": "42"}
    assert spec["affinity"] == OVERLAY["spec"]["affinity"]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["securityContext"] == {"runAsNonRoot": True, "fsGroup": 1000}
    assert spec["restartPolicy"] == "Never" and spec["subdomain"] == "j"
    # containers merge by name: the trainer keeps its command and gets the overlay's parts; the sidecar is added
    trainer, sidecar = spec["containers"]
    assert trainer["name"] == "trainer" and trainer["command"][:2] == ["mmalign", "launch"]
    assert sidecar == {"name": "log-shipper", "image": "fluent/fluent-bit:3.0"}
    assert [c["name"] for c in spec["initContainers"]] == ["warm-cache"]
    env = _by_name(trainer["env"])
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    assert env["NCCL_DEBUG"]["value"] == "WARN" and env["PET_NODE_RANK"]["value"] == "0"
    # envFrom is appended after the credentials Secret, never replacing it
    assert trainer["envFrom"] == [
        {"secretRef": {"name": "s3-keys"}},
        {"configMapRef": {"name": "nccl-tuning"}},
    ]
    # volumeMounts merge by mountPath; the PVC is mounted in the trainer beside the operator's mounts
    mounts = _by_name(trainer["volumeMounts"], "mountPath")
    assert mounts["/data"] == {"name": "datasets", "mountPath": "/data", "readOnly": True}
    assert {"/etc/mmalign", "/dev/shm", "/var/lib/mmalign"} <= set(mounts)
    # volumes merge by name; a volume named scratch replaces the operator's emptyDir (retainKeys)
    volumes = _by_name(spec["volumes"])
    assert volumes["datasets"]["persistentVolumeClaim"] == {"claimName": "mm-rlhf", "readOnly": True}
    assert volumes["scratch"] == {
        "name": "scratch",
        "hostPath": {"path": "/mnt/nvme", "type": "DirectoryOrCreate"},
    }
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and volumes["job"]["configMap"] == {
        "name": "j-config"
    }
    # extra device resources are added to the operator's requests/limits
    assert trainer["securityContext"] == {"allowPrivilegeEscalation": False}
    assert trainer["resources"]["requests"] == {
        "cpu": "4",
        "memory": "8Gi",
        "nvidia.com/gpu": "1",
        "rdma/ib": 1,
    }
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "1", "rdma/ib": 1}


def test_the_shorthand_fields_keep_their_meaning_and_the_fragment_merges_over_them() -> None:
    pod = _pod(
        _spec(
            podTemplate={
                "nodeSelector": {"pool": "gpu"},
                "serviceAccountName": "trainer",
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "labels": {"team": "a"},
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                "spec": {
                    "nodeSelector": {"zone": "b"},
                    "tolerations": [{"key": "spot", "operator": "Exists"}],
                    "containers": [{"name": "trainer", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}],
                },
            }
        )
    )
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "gpu", "zone": "b"}  # maps merge key by key
    assert spec["tolerations"] == [
        {"key": "gpu", "operator": "Exists"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert spec["serviceAccountName"] == "trainer" and "automountServiceAccountToken" not in spec
    assert _by_name(spec["containers"][0]["env"])["NCCL_DEBUG"]["value"] == "WARN"  # env by name, later wins
    assert pod["metadata"]["labels"]["team"] == "a"


def test_a_stage_overrides_the_jobs_pod_template_and_resources() -> None:
    spec = _spec(
        podTemplate={"nodeSelector": {"pool": "a"}, "spec": {"imagePullSecrets": [{"name": "r"}]}},
        stages={
            "reward": {
                "resources": {"nodes": 1, "requests": {"memory": "64Gi"}},
                "podTemplate": {"nodeSelector": {"pool": "cpu-big"}},
            },
            "dpo": {"podTemplate": {"spec": {"affinity": {"podAntiAffinity": {}}}}},
        },
    )
    reward, dpo = _pod(spec, "reward"), _pod(spec, "dpo")
    assert reward["spec"]["nodeSelector"] == {"pool": "cpu-big"} and dpo["spec"]["nodeSelector"] == {
        "pool": "a"
    }
    assert reward["spec"]["imagePullSecrets"] == dpo["spec"]["imagePullSecrets"] == [{"name": "r"}]
    assert "affinity" not in reward["spec"] and dpo["spec"]["affinity"] == {"podAntiAffinity": {}}
    # requests merge by resource name; nodes is the stage's: gang size and PET_NNODES follow it
    job = JobRef("j", "ns", UID, spec)
    assert len(build_gang(job, "reward", 0)) == 1 and len(build_gang(job, "dpo", 0)) == 2
    env = _by_name(reward["spec"]["containers"][0]["env"])
    assert env["PET_NNODES"]["value"] == "1"
    assert reward["spec"]["containers"][0]["resources"]["requests"]["memory"] == "64Gi"
    assert reward["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "4"
    assert spec.world_size("reward") == 1 and spec.world_size("dpo") == 2


def test_the_charts_pod_defaults_merge_strategically_under_the_jobs_template() -> None:
    defaults = {
        "spec": {
            "imagePullSecrets": [{"name": "cluster-registry"}],
            "containers": [{"name": "trainer", "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]}],
        }
    }
    raw = with_operator_defaults(
        {**BASE, "podTemplate": {"spec": {"imagePullSecrets": [{"name": "team"}]}}}, None, defaults
    )
    pod = _pod(AlignmentJobSpec.model_validate(raw))
    assert pod["spec"]["imagePullSecrets"] == [{"name": "cluster-registry"}, {"name": "team"}]
    assert _by_name(pod["spec"]["containers"][0]["env"])["NCCL_IB_HCA"]["value"] == "mlx5"


TRAINER = "spec.podTemplate.spec.containers[0]"
CONFLICTS = [
    ("trainer command", {"containers": [{"name": "trainer", "command": ["bash"]}]}, f"{TRAINER}.command"),
    (
        "trainer image",
        {"containers": [{"name": "trainer", "image": "mine"}]},
        f"{TRAINER}.image: set spec.image",
    ),
    (
        "torchrun env",
        {"containers": [{"name": "trainer", "env": [{"name": "PET_NODE_RANK", "value": "1"}]}]},
        f"{TRAINER}.env[0]: PET_NODE_RANK",
    ),
    (
        "MASTER_ADDR from a secret",
        {
            "containers": [
                {
                    "name": "trainer",
                    "env": [
                        {"name": "MASTER_ADDR", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
                    ],
                }
            ]
        },
        f"{TRAINER}.env[0]",
    ),
    (
        "literal token",
        {"containers": [{"name": "trainer", "env": [{"name": "HF_TOKEN", "value": "hf_x"}]}]},
        f"{TRAINER}.env[0]: HF_TOKEN looks like a credential",
    ),
    (
        "/dev/shm mount",
        {"containers": [{"name": "trainer", "volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}]},
        f"{TRAINER}.volumeMounts[0]: /dev/shm",
    ),
    ("the job volume", {"volumes": [{"name": "job", "emptyDir": {}}]}, "spec.podTemplate.spec.volumes[0]"),
    (
        "rendezvous port",
        {"containers": [{"name": "trainer", "ports": [{"containerPort": 29500}]}]},
        f"{TRAINER}.ports[0]",
    ),
    (
        "termination path",
        {"containers": [{"name": "trainer", "terminationMessagePath": "/tmp/x"}]},
        f"{TRAINER}.terminationMessagePath",
    ),
    ("restartPolicy", {"restartPolicy": "OnFailure"}, "spec.podTemplate.spec.restartPolicy"),
    ("grace period", {"terminationGracePeriodSeconds": 5}, "set podTemplate.terminationGracePeriodSeconds"),
    ("sidecar without image", {"containers": [{"name": "sidecar"}]}, f"{TRAINER}.image: required"),
    (
        "init container named trainer",
        {"initContainers": [{"name": "trainer", "image": "x"}]},
        "spec.podTemplate.spec.initContainers[0].name",
    ),
    (
        "cpu owned by resources",
        {"containers": [{"name": "trainer", "resources": {"requests": {"cpu": "2"}}}]},
        f"{TRAINER}.resources.requests.cpu: the operator sets it from resources.requests",
    ),
    (
        "gpu owned by resources",
        {"containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": 2}}}]},
        f"{TRAINER}.resources.limits.nvidia.com/gpu",
    ),
    # the real schema, offline: unknown fields, types, required fields, duplicate list-map keys
    ("unknown field", {"afinity": {}}, "spec.podTemplate.spec.afinity: unknown field"),
    (
        "wrong type",
        {"securityContext": {"runAsUser": "root"}},
        "spec.podTemplate.spec.securityContext.runAsUser: must be an integer",
    ),
    (
        "required field",
        {
            "containers": [
                {"name": "trainer", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}
            ]
        },
        f"{TRAINER}.env[0].valueFrom.secretKeyRef.key: required",
    ),
    (
        "duplicate volume",
        {"volumes": [{"name": "d", "emptyDir": {}}, {"name": "d", "emptyDir": {}}]},
        "spec.podTemplate.spec.volumes[1]: duplicate entry",
    ),
]


@pytest.mark.parametrize(("name", "fragment", "expected"), CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_a_conflicting_or_malformed_overlay_is_refused_naming_the_field(
    name: str, fragment: dict[str, Any], expected: str
) -> None:
    document = {
        "apiVersion": "mmalign.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": "j"},
        "spec": {**BASE, "podTemplate": {"spec": fragment}},
    }
    problems = [str(p) for p in validate_text("job.yaml", json.dumps(document, indent=1))]
    assert any(expected in p for p in problems), problems
    # the operator refuses the same spec (its InvalidSpec failure): the builders never see it
    with pytest.raises(ValidationError):
        AlignmentJobSpec.model_validate(document["spec"])


def test_validate_points_at_the_line_of_the_conflict() -> None:
    text = """apiVersion: mmalign.io/v1alpha1
kind: AlignmentJob
metadata: {name: j}
spec:
  model: {uri: builtin://tiny-text}
  data: {uri: builtin://synthetic-colors}
  storage: {uri: s3://b/p/}
  stages:
    dpo:
      podTemplate:
        spec:
          containers:
          - name: trainer
            command: [bash]
"""
    [problem] = validate_text("job.yaml", text)
    assert problem.line == 14 and problem.path == "spec.stages.dpo.podTemplate.spec.containers[0].command"
    assert "the operator runs the trainer" in problem.message


def test_labels_of_the_operator_are_refused() -> None:
    with pytest.raises(ValidationError, match="mmalign.io/stage: the operator sets the mmalign.io/ labels"):
        _spec(podTemplate={"metadata": {"labels": {"mmalign.io/stage": "x"}}})


def test_the_protected_table_names_what_the_builders_really_set() -> None:
    """Keep podtemplate's table honest: each protected part is in the operator's pod."""
    pod = _pod(_spec())
    trainer = pod["spec"]["containers"][0]
    assert trainer["name"] == podtemplate.TRAINER and {"image", "command", "terminationMessagePolicy"} <= set(
        trainer
    )
    assert {m["mountPath"] for m in trainer["volumeMounts"]} == {
        podtemplate.JOB_FILE_DIR,
        podtemplate.SHM_DIR,
        podtemplate.SCRATCH_DIR,
    }
    assert {v["name"] for v in pod["spec"]["volumes"]} == {
        podtemplate.VOLUME_JOB,
        podtemplate.VOLUME_SHM,
        podtemplate.VOLUME_SCRATCH,
    }
    assert trainer["ports"][0]["containerPort"] == podtemplate.MASTER_PORT


def test_the_committed_pod_schema_is_generated_from_the_pinned_kubernetes_release() -> None:
    """Drift test: `mmalign crds --pod-schema` rewrites mmalign/api/podspec.schema.json."""
    from mmalign.devcluster.binaries import KUBERNETES_VERSION
    from mmalign.operator import podschema

    source = podschema.find_openapi(KUBERNETES_VERSION)
    committed = podtemplate.SCHEMA_FILE.read_text()
    assert json.loads(committed)["x-mmalign-source"].startswith(f"k8s.io/kubernetes@{KUBERNETES_VERSION} ")
    if source is None:
        pytest.skip(f"k8s.io/kubernetes@{KUBERNETES_VERSION} is not in the Go module cache (`make binaries`)")
    assert (
        podschema.render(podschema.convert(json.loads(source.read_text()), KUBERNETES_VERSION)) == committed
    )
