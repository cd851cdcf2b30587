"""GPU sanity: the pods ask for procPerNode GPUs unless the user said otherwise, and the trainer refuses
to run a GPU-shaped job on a machine without CUDA unless told to (MMALIGN_ALLOW_CPU=1)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import JobRef, build_pod
from mmalign.trainer.engine import cpu_refusal


def spec(resources: dict[str, Any], bf16: bool = False) -> AlignmentJobSpec:
    return AlignmentJobSpec.model_validate({
        "model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://b/p/"}, "stages": {"reward": {}}, "resources": resources,
        "deepspeed": {"bf16": bf16},
    })


def container_resources(resources: dict[str, Any]) -> Any:
    pod = build_pod(JobRef("j", "ns", "uid-1", spec(resources)), "reward", 0, 0)
    return pod["spec"]["containers"][0].get("resources")


@pytest.mark.parametrize(("resources", "expected"), [
    # nothing said: one GPU per process, in requests and limits (an extended resource needs both)
    ({"procPerNode": 8, "requests": {"cpu": "64", "memory": "300Gi"}},
     {"requests": {"cpu": "64", "memory": "300Gi", "nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}),
    ({}, {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}),
    # a CPU job: `nvidia.com/gpu: 0` removes the GPU request altogether
    ({"procPerNode": 2, "requests": {"cpu": "1", "nvidia.com/gpu": 0}}, {"requests": {"cpu": "1"}}),
    ({"procPerNode": 2, "limits": {"nvidia.com/gpu": "0"}}, None),
    # the user's count wins over procPerNode, and is mirrored so requests == limits
    ({"procPerNode": 8, "limits": {"nvidia.com/gpu": 4, "memory": "1Ti"}},
     {"requests": {"nvidia.com/gpu": "4"}, "limits": {"memory": "1Ti", "nvidia.com/gpu": "4"}}),
    # another vendor's GPU resource: no nvidia.com/gpu is added
    ({"procPerNode": 2, "requests": {"amd.com/gpu": 2}},
     {"requests": {"amd.com/gpu": "2"}, "limits": {"amd.com/gpu": "2"}}),
])
def test_gpu_requests_follow_proc_per_node_unless_set(resources: dict[str, Any], expected: Any) -> None:
    assert container_resources(resources) == expected


def test_a_fractional_gpu_count_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"nvidia.com/gpu: '0.5' must be a whole number"):
        spec({"requests": {"nvidia.com/gpu": "0.5"}})


def test_the_trainer_refuses_a_gpu_shaped_job_without_cuda() -> None:
    gpu_job = spec({"procPerNode": 8})
    reason = cpu_refusal(gpu_job, cuda=False, allow_cpu=False)
    assert reason is not None and "8 nvidia.com/gpu per pod (= procPerNode)" in reason
    assert "resources.requests: {nvidia.com/gpu: 0}" in reason and "MMALIGN_ALLOW_CPU=1" in reason
    assert cpu_refusal(gpu_job, cuda=True, allow_cpu=False) is None
    assert cpu_refusal(gpu_job, cuda=False, allow_cpu=True) is None  # the explicit opt-in
    cpu_job = spec({"procPerNode": 2, "requests": {"nvidia.com/gpu": 0}})
    assert cpu_refusal(cpu_job, cuda=False, allow_cpu=False) is None
    bf16_on_cpu = cpu_refusal(spec({"requests": {"nvidia.com/gpu": 0}}, bf16=True), cuda=False, allow_cpu=False)
    assert bf16_on_cpu is not None and "(deepspeed.bf16)" in bf16_on_cpu
    written = cpu_refusal(spec({"limits": {"nvidia.com/gpu": 2}}), cuda=False, allow_cpu=False)
    assert written is not None and "(2 nvidia.com/gpu per pod)" in written


def test_a_stage_with_its_own_resources_is_checked_with_them() -> None:
    """stages.<s>.resources: a CPU score stage of a GPU job runs on CPU; the GPU stages still refuse."""
    job = AlignmentJobSpec.model_validate({
        "model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://b/p/"}, "resources": {"procPerNode": 2},
        "stages": {"reward": {}, "score": {"resources": {"requests": {"nvidia.com/gpu": 0}}}},
    })
    assert cpu_refusal(job, cuda=False, allow_cpu=False, stage="score") is None
    assert "2 nvidia.com/gpu per pod" in (cpu_refusal(job, cuda=False, allow_cpu=False, stage="reward") or "")
