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
    ("keepLast 0", _with("spec.checkpoint", {"keepLast": 0}), "spec.checkpoint.keepLast"),
    ("toleration effect", _with("spec.podTemplate", {"tolerations": [{"key": "a", "effect": "Sometimes"}]}),
     "spec.podTemplate.tolerations[0].effect"),
    ("beta-dpo with DRS", _with("spec.stages.dpo.loss", "beta-dpo"), "dynamicRewardScaling"),
]
