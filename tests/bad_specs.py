"""Malformed AlignmentJobs, shared by the offline validator test and the API-server test.

Each case: (name, YAML text, a substring the error must contain — the field path the user must fix).
The base job is valid; each case changes one thing, so each error has one cause.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "apiVersion": "mmalign.io/v1alpha1",
    "kind": "AlignmentJob",
    "metadata": {"name": "bad"},
    "spec": {
        "model": {"uri": "builtin://tiny-qwen2-vl"},
        "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://bucket/run/", "credentialsSecret": "s3-credentials"},
        "resources": {"nodes": 2, "procPerNode": 1},
        "stages": {
            "reward": {"critique": True},
            "score": {"maxNewTokens": 16},
            "dpo": {"beta": 0.1, "dynamicRewardScaling": {"w": 0.5, "k": 0.5}},
        },
    },
}


def _with(path: str, value: Any) -> str:
    """BASE with the value at dotted `path` replaced (value DELETE removes the key)."""
    job = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = job
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return yaml.safe_dump(job, sort_keys=False)


DELETE = object()

# (name, yaml, expected substring of the error)
BAD_SPECS: list[tuple[str, str, str]] = [
    ("negative nodes", _with("spec.resources.nodes", -1), "spec.resources.nodes"),
    ("zero procPerNode", _with("spec.resources.procPerNode", 0), "spec.resources.procPerNode"),
    ("nodes as text", _with("spec.resources.nodes", "two"), "spec.resources.nodes"),
    ("shm size not a quantity", _with("spec.resources.shmSize", "lots"), "spec.resources.shmSize"),
    ("unknown stage", _with("spec.stages.sft", {"learningRate": 1e-5}), "spec.stages.sft"),
    ("DRS w < 0", _with("spec.stages.dpo.dynamicRewardScaling", {"w": -0.5, "k": 0.5}),
     "spec.stages.dpo.dynamicRewardScaling.w"),
    ("DRS k = 0", _with("spec.stages.dpo.dynamicRewardScaling", {"w": 0.5, "k": 0}),
     "spec.stages.dpo.dynamicRewardScaling.k"),
    ("beta = 0", _with("spec.stages.dpo.beta", 0), "spec.stages.dpo.beta"),
    ("negative sft weight", _with("spec.stages.dpo.sftWeight", -0.25), "spec.stages.dpo.sftWeight"),
    ("unknown dpo loss", _with("spec.stages.dpo.loss", "ipo"), "spec.stages.dpo.loss"),
    ("inline secret key", _with("spec.storage.secretAccessKey", "hunter2"), "spec.storage"),
    ("missing storage", _with("spec.storage", DELETE), "spec.storage"),
    ("storage not s3/file", _with("spec.storage.uri", "gs://bucket/run/"), "spec.storage"),
    ("missing model", _with("spec.model", DELETE), "spec.model"),
    ("empty model uri", _with("spec.model.uri", ""), "spec.model.uri"),
    ("unknown field in spec", _with("spec.gpus", 8), "spec.gpus"),
    ("misspelt field", _with("spec.stages.reward.learningrate", 1e-6), "spec.stages.reward.learningrate"),
    ("learning rate as text", _with("spec.stages.reward.learningRate", "fast"),
     "spec.stages.reward.learningRate"),
    ("zero learning rate", _with("spec.stages.reward.learningRate", 0), "spec.stages.reward.learningRate"),
    ("no stages", _with("spec.stages", {}), "stages"),
    ("score without reward model", _with("spec.stages.reward", DELETE), "stages.score"),
    ("DRS without margins", _with("spec.stages", {"dpo": {"dynamicRewardScaling": {"w": 0.5, "k": 0.5}}}),
     "dynamicRewardScaling"),
    ("zero stage 4", _with("spec.deepspeed", {"zeroStage": 4}), "spec.deepspeed.zeroStage"),
    ("negative backoff", _with("spec.runPolicy", {"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    ("eval fraction 1", _with("spec.data.evalFraction", 1.0), "spec.data.evalFraction"),
    ("bad onBadLine", _with("spec.data.onBadLine", "ignore"), "spec.data.onBadLine"),
    ("minPixels above maxPixels", _with("spec.data", {"uri": "builtin://synthetic-colors", "minPixels": 4096,
                                                      "maxPixels": 1024}), "minPixels"),
    ("maxPixels below one patch", _with("spec.data.maxPixels", 100), "spec.data.maxPixels"),
    ("keepLast 0", _with("spec.checkpoint", {"keepLast": 0}), "spec.checkpoint.keepLast"),
    ("toleration effect", _with("spec.podTemplate", {"tolerations": [{"key": "a", "effect": "Sometimes"}]}),
     "spec.podTemplate.tolerations[0].effect"),
    ("beta-dpo with DRS", _with("spec.stages.dpo.loss", "beta-dpo"), "dynamicRewardScaling"),
    # values the API server would only refuse at pod creation, or the trainer at run time (issue 14)
    ("cpu not a quantity", _with("spec.resources.requests", {"cpu": "lots"}), "spec.resources.requests"),
    ("memory limit not a quantity", _with("spec.resources.limits", {"memory": "16 GB"}), "spec.resources.limits"),
    ("fractional GPU", _with("spec.resources.limits", {"nvidia.com/gpu": "0.5"}), "spec.resources.limits"),
    ("negative memory", _with("spec.resources.requests", {"memory": "-1Gi"}), "spec.resources.requests"),
    ("limit below request", _with("spec.resources", {"nodes": 2, "requests": {"memory": "2Gi"},
                                                      "limits": {"memory": "1Gi"}}), "spec.resources"),
    ("label value", _with("spec.podTemplate", {"labels": {"team": "vision models"}}), "spec.podTemplate.labels"),
    ("label key", _with("spec.podTemplate", {"labels": {"-team": "a"}}), "spec.podTemplate.labels"),
    ("node selector value too long", _with("spec.podTemplate", {"nodeSelector": {"pool": "a" * 64}}),
     "spec.podTemplate.nodeSelector"),
    ("annotation key", _with("spec.podTemplate", {"annotations": {"a b": "x"}}), "spec.podTemplate.annotations"),
    ("env name not an identifier", _with("spec.podTemplate", {"env": [{"name": "NCCL-DEBUG", "value": "WARN"}]}),
     "spec.podTemplate.env[0].name"),
    ("env overrides PET_NODE_RANK", _with("spec.podTemplate", {"env": [{"name": "PET_NODE_RANK", "value": "0"}]}),
     "spec.podTemplate.env[0]"),
    ("env overrides MASTER_ADDR", _with("spec.podTemplate", {"env": [{"name": "MASTER_ADDR", "value": "x"}]}),
     "spec.podTemplate.env[0]"),
    ("env overrides MMALIGN_ATTEMPT", _with("spec.podTemplate", {"env": [{"name": "MMALIGN_ATTEMPT", "value": "1"}]}),
     "spec.podTemplate.env[0]"),
    ("inline credentials in env", _with("spec.podTemplate", {"env": [{"name": "AWS_SECRET_ACCESS_KEY",
                                                                        "value": "hunter2"}]}),
     "spec.podTemplate.env[0]"),
    ("inline token in env", _with("spec.podTemplate", {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}),
     "spec.podTemplate.env[0]"),
    ("secret name not a DNS name", _with("spec.storage.credentialsSecret", "S3_Credentials"),
     "spec.storage.credentialsSecret"),
    ("priority class not a DNS name", _with("spec.podTemplate", {"priorityClassName": "High Priority"}),
     "spec.podTemplate.priorityClassName"),
    ("service account not a DNS name", _with("spec.podTemplate", {"serviceAccountName": "trainer/sa"}),
     "spec.podTemplate.serviceAccountName"),
    ("exit code 256", _with("spec.runPolicy", {"retryableExitCodes": [5, 256]}), "spec.runPolicy.retryableExitCodes"),
    ("exit code 0", _with("spec.runPolicy", {"retryableExitCodes": [0]}), "spec.runPolicy.retryableExitCodes"),
    ("endpoint not a URL", _with("spec.storage.endpoint", "s3.example.com"), "spec.storage.endpoint"),
    ("endpoint with spaces", _with("spec.storage.endpoint", "http://my s3:9000"), "spec.storage.endpoint"),
    ("startup timeout 0", _with("spec.runPolicy", {"startupTimeoutSeconds": 0}),
     "spec.runPolicy.startupTimeoutSeconds"),
    ("negative maxDisruptions", _with("spec.runPolicy", {"maxDisruptions": -1}), "spec.runPolicy.maxDisruptions"),
    # evaluation as part of a job (issue 17)
    ("empty evalData", _with("spec.stages.reward.evalData", ""), "spec.stages.reward.evalData"),
    ("evalMaxPairs 0", _with("spec.stages.reward.evalMaxPairs", 0), "spec.stages.reward.evalMaxPairs"),
    ("win rate maxNewTokens 0", _with("spec.stages.dpo.winRate", {"maxNewTokens": 0}),
     "spec.stages.dpo.winRate.maxNewTokens"),
    ("win rate misspelt field", _with("spec.stages.dpo.winRate", {"prompts": 8}), "spec.stages.dpo.winRate.prompts"),
    # the pod template overlay (issue 18): the real PodSpec schema, and the operator's parts refused by CEL
    ("pod spec unknown field", _with("spec.podTemplate", {"spec": {"afinity": {}}}), "spec.podTemplate.spec.afinity"),
    ("pod spec wrong type", _with("spec.podTemplate", {"spec": {"securityContext": {"runAsUser": "root"}}}),
     "spec.podTemplate.spec.securityContext.runAsUser"),
    ("secretKeyRef without key", _with("spec.podTemplate", {"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "HF_HOME", "valueFrom": {"secretKeyRef": {"name": "hf"}}}]}]}}),
     "spec.podTemplate.spec.containers[0].env[0].valueFrom.secretKeyRef.key"),
    ("duplicate env name", _with("spec.podTemplate", {"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}]}}), "spec.podTemplate.spec.containers[0].env[1]"),
    ("trainer command overlaid", _with("spec.podTemplate", {"spec": {"containers": [
        {"name": "trainer", "command": ["bash"]}]}}), "spec.podTemplate.spec.containers[0]"),
    ("sidecar without image", _with("spec.stages.dpo.podTemplate", {"spec": {"containers": [{"name": "proxy"}]}}),
     "spec.stages.dpo.podTemplate.spec.containers[0]"),
    ("restartPolicy overlaid", _with("spec.podTemplate", {"spec": {"restartPolicy": "Always"}}),
     "spec.podTemplate.spec"),
    ("the dshm volume overlaid", _with("spec.podTemplate", {"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}),
     "spec.podTemplate.spec.volumes[0]"),
    ("stage nodes 0", _with("spec.stages.reward.resources", {"nodes": 0}), "spec.stages.reward.resources.nodes"),
]

# Rejected by `mmalign validate` (and by the operator at once, InvalidSpec) but not by the API server:
# CEL cannot read the free-form deepspeed.config.
VALIDATE_ONLY_SPECS: list[tuple[str, str, str]] = [
    ("deepspeed.config contradicts zeroStage", _with("spec.deepspeed", {
        "zeroStage": 2, "config": {"zero_optimization": {"stage": 3}}}), "deepspeed.config.zero_optimization.stage"),
    ("deepspeed.config contradicts bf16", _with("spec.deepspeed", {"bf16": False, "config": {"bf16": {"enabled": True}}}),
     "deepspeed.config.bf16.enabled"),
    ("deepspeed.config contradicts microBatchSize", _with("spec.deepspeed", {
        "config": {"train_micro_batch_size_per_gpu": 4}}), "deepspeed.config.train_micro_batch_size_per_gpu"),
    ("deepspeed.config contradicts the batch size", _with("spec.deepspeed", {"config": {"train_batch_size": 64}}),
     "deepspeed.config.train_batch_size"),
    # the pod template overlay: CEL rules over the unbounded upstream env/volumeMounts/ports lists would exceed
    # the API server's cost budget, and a resource overlay conflicts with spec.resources, which CEL cannot see
    ("torchrun env overlaid", _with("spec.podTemplate", {"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "PET_NODE_RANK", "value": "3"}]}]}}), "spec.podTemplate.spec.containers[0].env[0]: PET_NODE_RANK"),
    ("/dev/shm mount overlaid", _with("spec.podTemplate", {"spec": {"containers": [{"name": "trainer", "volumeMounts": [
        {"name": "big", "mountPath": "/dev/shm"}]}]}}), "spec.podTemplate.spec.containers[0].volumeMounts[0]"),
    ("GPUs overlaid beside resources", _with("spec.podTemplate", {"spec": {"containers": [{"name": "trainer",
        "resources": {"limits": {"nvidia.com/gpu": 2}}}]}}),
     "spec.podTemplate.spec.containers[0].resources.limits.nvidia.com/gpu: the operator sets it"),
]
