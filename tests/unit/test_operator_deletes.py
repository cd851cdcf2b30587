"""controller.whole_gangs: a gang restart deletes its pods with one collection call, never a pod of
another gang."""

from __future__ import annotations

from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import JobRef
from mmalign.operator.controller import whole_gangs
from mmalign.operator.policy import PodView

SPEC = AlignmentJobSpec.model_validate(
    {
        "model": {"uri": "builtin://tiny-qwen2-vl"},
        "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://b/p/"},
        "stages": {"reward": {}},
    }
)
JOB = JobRef("big", "ml", "uid-1", SPEC, {})


def pods(attempt: int, count: int, deleting: bool = False) -> list[PodView]:
    return [
        PodView(f"big-reward-{attempt}-{n}", "reward", attempt, n, deleting=deleting) for n in range(count)
    ]


def test_a_whole_gang_is_one_selector() -> None:
    gang = pods(0, 256)
    selectors, single = whole_gangs(JOB, [p.name for p in gang], gang + pods(1, 2, deleting=True))
    assert selectors == ["mmalign.io/job=big,mmalign.io/stage=reward,mmalign.io/attempt=0"]
    assert single == []


def test_a_restarted_gang_with_its_failed_pod_is_one_selector() -> None:
    gang = pods(0, 8)
    gang[3] = PodView("big-reward-0-3", "reward", 0, 3, phase="Failed", exit_code=137)
    selectors, single = whole_gangs(JOB, [p.name for p in gang if p.phase != "Failed"], gang)
    assert selectors == ["mmalign.io/job=big,mmalign.io/stage=reward,mmalign.io/attempt=0"] and single == []


def test_part_of_a_gang_goes_by_name() -> None:
    gang = pods(0, 4)
    selectors, single = whole_gangs(JOB, ["big-reward-0-1", "big-reward-0-3"], gang)
    assert selectors == [] and single == ["big-reward-0-1", "big-reward-0-3"]


def test_already_deleting_pods_do_not_stop_a_selector_and_one_pod_goes_by_name() -> None:
    old = pods(0, 3)
    old[2] = PodView("big-reward-0-2", "reward", 0, 2, deleting=True)
    one = pods(1, 1)
    selectors, single = whole_gangs(JOB, ["big-reward-0-0", "big-reward-0-1", "big-reward-1-0"], old + one)
    assert selectors == ["mmalign.io/job=big,mmalign.io/stage=reward,mmalign.io/attempt=0"]
    assert single == ["big-reward-1-0"]
