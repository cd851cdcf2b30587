"""The pure reconcile: scenarios driven through a small in-memory world (no cluster).

Each step: reconcile(observation, status) -> plan; the world applies the plan's actions to its pods the
way the API server would (create, delete), and the test moves pods through their phases.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from mmalign.api.progress import ProgressReport
from mmalign.api.spec import AlignmentJobSpec
from mmalign.api.status import AlignmentJobStatus
from mmalign.operator.builders import pod_name
from mmalign.operator.policy import SETTLE_SECONDS, PodView, classify_create_error
from mmalign.operator.status import Observation, Plan, create_failed, reconcile

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SPEC = {
    "model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
    "storage": {"uri": "s3://b/j/"}, "resources": {"nodes": 2},
    "stages": {"reward": {}, "score": {}, "dpo": {}},
    "runPolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60},
}


class World:
    def __init__(self, **run_policy: object) -> None:
        spec = copy.deepcopy(SPEC)
        spec["runPolicy"].update(run_policy)  # type: ignore[attr-defined]
        self.spec = AlignmentJobSpec.model_validate(spec)
        self.pods: dict[str, PodView] = {}
        self.status = AlignmentJobStatus()
        self.now = T0
        self.plans: list[Plan] = []
        self.job_deleted = False

    def step(self, seconds: float = 1.0, progress: ProgressReport | None = None,
             refused: tuple[str, ...] = (), refuse_create: tuple[int, str, str] | None = None) -> Plan:
        """One pass; `refuse_create` = (code, reason, message): the API server refuses the gang's pods."""
        self.now += timedelta(seconds=seconds)
        observation = Observation(3, self.spec, tuple(self.pods.values()), self.now, "j", progress, refused,
                                  created=T0)
        plan = reconcile(observation, self.status)
        gang = next((a for a in plan.actions if a.kind == "create_gang"), None)
        if refuse_create is not None and gang is not None:
            code, reason, message = refuse_create
            failure = classify_create_error(code, reason, message, "Pod", pod_name("j", gang.stage, gang.attempt, 0),
                                            gang.stage)
            plan = create_failed(observation, plan, failure)
            plan.actions = [a for a in plan.actions if a.kind != "create_gang"]
        for action in plan.actions:
            if action.kind == "create_gang":
                for node in range(self.spec.resources.nodes):
                    name = pod_name("j", action.stage, action.attempt, node)
                    self.pods.setdefault(name, PodView(name, action.stage, action.attempt, node))
            elif action.kind == "delete_pods":
                for name in action.pods:
                    self.pods.pop(name, None)
            elif action.kind == "delete_job":
                self.job_deleted = True
        self.status = plan.status
        self.plans.append(plan)
        return plan

    def gang(self, stage: str) -> list[PodView]:
        return sorted((p for p in self.pods.values() if p.stage == stage), key=lambda p: (p.attempt, p.node_rank))

    def set(self, stage: str, phase: str, code: int | None = None, node: int | None = None) -> None:
        for pod in self.gang(stage):
            if node is None or pod.node_rank == node:
                finished = self.now if phase in ("Succeeded", "Failed") else None
                self.pods[pod.name] = replace(pod, phase=phase, exit_code=code, finished_at=finished)

    def events(self) -> list[str]:
        return [e.reason for plan in self.plans for e in plan.events]

    def condition(self, type_: str) -> tuple[str, str, str] | None:
        found = [c for c in self.status.conditions if c.type == type_]
        return (found[0].status, found[0].reason, found[0].last_transition_time) if found else None

    def run_stage(self, stage: str) -> None:
        self.set(stage, "Running")
        self.step()
        self.set(stage, "Succeeded", 0)
        self.step()


def test_happy_path_through_all_stages() -> None:
    world = World()
    plan = world.step()
    assert [a.kind for a in plan.actions] == ["create_gang"]
    assert world.status.phase == "Pending" and world.status.stage == "reward"
    assert world.status.stages.reward.pods_created and world.status.observed_generation == 3
    assert [p.name for p in world.gang("reward")] == ["j-reward-0-0", "j-reward-0-1"]
    assert world.step().actions == []  # idempotent: pods exist, nothing to do
    world.set("reward", "Running")
    world.step()
    assert world.status.phase == "Running" and world.status.stages.reward.phase == "Running"
    assert world.condition("Running")[:2] == ("True", "StageRunning")
    world.set("reward", "Succeeded", 0)
    plan = world.step()
    # the next stage starts in the same pass
    assert world.status.stages.reward.phase == "Succeeded" and world.status.stage == "score"
    assert [(a.kind, a.stage) for a in plan.actions] == [("create_gang", "score")]
    world.run_stage("score")
    world.run_stage("dpo")
    assert world.status.phase == "Succeeded"
    assert world.condition("Succeeded")[:2] == ("True", "AllStagesSucceeded")
    assert world.condition("Running")[:2] == ("False", "Succeeded")
    assert world.events() == ["Created", "StageStarted", "Running", "StageSucceeded", "StageStarted",
                              "StageSucceeded", "StageStarted", "StageSucceeded", "Succeeded"]
    assert world.pods == {}  # cleanPodsAfterFinished (default true)
    assert world.status.stages.dpo.artifact == "s3://b/j/dpo/model/"
    plan = world.step(30)
    assert not world.job_deleted and 29 <= plan.requeue_after <= 31  # the TTL wakes it
    world.step(31)
    assert world.job_deleted


def test_condition_time_is_kept_unless_the_status_flips() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    first = world.condition("Running")
    world.step(5, progress=ProgressReport("reward", 10, 40, loss=0.5))
    assert world.condition("Running") == first
    assert world.status.progress == "10/40 (25%)" and world.status.stages.reward.metrics == {"loss": 0.5}
    assert world.status.stages.reward.progress.step == 10
    created = world.condition("Created")
    world.step(5)
    assert world.condition("Created") == created


def test_retryable_failure_restarts_the_whole_gang_then_backoff_limit_fails() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    world.set("reward", "Failed", 137, node=1)
    plan = world.step()
    deleted = [n for a in plan.actions if a.kind == "delete_pods" for n in a.pods]
    assert sorted(deleted) == ["j-reward-0-0", "j-reward-0-1"]  # the whole gang, not the one pod
    # a dead peer means no agreed checkpoint: the survivors get 30 s, not the 300 s grace of a suspend
    assert {a.grace_seconds for a in plan.actions if a.kind == "delete_pods"} == {30}
    reward = world.status.stages.reward
    assert (reward.attempt, reward.restarts, reward.phase) == (1, 1, "Restarting")
    assert reward.last_checkpoint == "s3://b/j/reward/checkpoints/latest"
    assert world.status.phase == "Restarting"
    assert world.condition("Restarting")[:2] == ("True", "Signal9")
    assert world.condition("Running")[:2] == ("False", "Restarting")
    world.step()
    assert [p.name for p in world.gang("reward")] == ["j-reward-1-0", "j-reward-1-1"]
    world.set("reward", "Running")
    world.step()
    assert world.condition("Restarting")[:2] == ("False", "GangRunning")
    assert world.status.phase == "Running"
    for attempt in (2, 3):
        world.set("reward", "Failed", 143, node=0)
        world.step()
        if attempt == 2:
            world.step()
            world.set("reward", "Running")
    assert world.status.phase == "Failed"
    assert world.condition("Failed")[:2] == ("True", "BackoffLimitExceeded")
    assert "backoffLimit=2" in world.status.message
    assert world.events().count("GangRestarting") == 2


def test_permanent_exit_fails_at_once_with_the_reason() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    world.set("reward", "Failed", 4)
    world.step()
    assert world.status.phase == "Failed" and world.status.stages.reward.phase == "Failed"
    assert world.condition("Failed")[:2] == ("True", "NanLoss")
    assert "exited with code 4" in world.status.message and world.status.stages.reward.restarts == 0
    assert world.status.stages.score.phase == "Pending"


def test_permanent_exit_waits_for_peers_before_deciding() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    world.set("reward", "Failed", 1, node=0)
    plan = world.step(0.5)
    assert world.status.phase == "Running" and plan.requeue_after is not None
    # the real cause arrives late: node 1 was killed (finished) before node 0 reacted
    killed = world.pods["j-reward-0-1"]
    world.pods[killed.name] = replace(killed, phase="Failed", exit_code=137,
                                      finished_at=world.now - timedelta(seconds=1))
    world.step(0.5)
    assert world.status.phase == "Restarting"
    world2 = World()
    world2.step()
    world2.set("reward", "Running")
    world2.step()
    world2.set("reward", "Failed", 1, node=0)
    world2.step(0.5)
    world2.step(SETTLE_SECONDS + 1)
    assert world2.status.phase == "Failed" and world2.condition("Failed")[1] == "ExitCode1"


def test_deleted_pod_restarts_the_gang() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    del world.pods["j-reward-0-1"]  # kubectl delete pod, already gone
    world.step()
    assert world.condition("Restarting")[:2] == ("True", "PodDeleted")
    assert world.status.stages.reward.attempt == 1


def test_suspend_and_resume() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    world.spec = world.spec.model_copy(update={"run_policy": world.spec.run_policy.model_copy(update={"suspend": True})})
    world.step()
    assert world.pods == {} and world.status.phase == "Suspended"
    assert world.condition("Suspended")[:2] == ("True", "JobSuspended")
    assert world.condition("Running")[:2] == ("False", "Suspended")
    reward = world.status.stages.reward
    assert (reward.phase, reward.attempt, reward.restarts) == ("Suspended", 1, 0)  # not a restart
    assert world.status.start_time is None
    world.step(600)  # suspended time does not count towards activeDeadlineSeconds
    world.spec = world.spec.model_copy(update={"run_policy": world.spec.run_policy.model_copy(update={"suspend": False})})
    world.step()
    assert world.condition("Suspended")[:2] == ("False", "Resumed")
    assert [p.name for p in world.gang("reward")] == ["j-reward-1-0", "j-reward-1-1"]
    assert "Suspended" in world.events() and "Resumed" in world.events()


def test_created_suspended_never_creates_pods() -> None:
    world = World(suspend=True)
    plan = world.step()
    assert plan.actions == [] and world.status.phase == "Suspended"
    assert world.status.stages.reward.attempt == 0


def test_active_deadline() -> None:
    world = World(activeDeadlineSeconds=10)
    world.step()
    world.set("reward", "Running")
    world.step(5)
    world.step(6)
    assert world.status.phase == "Failed" and world.condition("Failed")[1] == "DeadlineExceeded"
    assert world.pods == {}


def test_finished_pods_kept_when_clean_pods_is_false() -> None:
    world = World(cleanPodsAfterFinished=False)
    world.step()
    for stage in ("reward", "score", "dpo"):
        world.run_stage(stage)
    assert world.status.phase == "Succeeded" and len(world.pods) == 6


def test_spec_change_refused_condition() -> None:
    world = World()
    world.step()
    world.step(refused=("resources.nodes",))
    assert world.condition("SpecChangeRefused")[:2] == ("True", "UnsafeSpecChange")
    assert "resources.nodes" in [c.message for c in world.status.conditions if c.type == "SpecChangeRefused"][0]
    world.step()
    assert world.condition("SpecChangeRefused")[:2] == ("False", "SpecMatches")
    assert world.events().count("SpecChangeRefused") == 1


def test_single_stage_job_marks_the_others_skipped() -> None:
    world = World()
    world.spec = AlignmentJobSpec.model_validate({**SPEC, "stages": {"reward": {}}})
    world.step()
    assert world.status.stages.score.phase == "Skipped" and world.status.stages.dpo.phase == "Skipped"
    world.run_stage("reward")
    assert world.status.phase == "Succeeded"


def test_a_pod_that_cannot_start_says_why() -> None:
    world = World()
    world.step()
    pod = world.pods["j-reward-0-1"]
    world.pods[pod.name] = replace(pod, waiting='CreateContainerConfigError: secret "s3-credentials" not found')
    world.step()
    assert world.status.phase == "Pending"
    assert 'j-reward-0-1: CreateContainerConfigError: secret "s3-credentials" not found' in world.status.message


def test_a_1024_node_gang_is_built_and_reconciled_quickly() -> None:
    import time

    from mmalign.operator.builders import JobRef, build_gang

    spec = AlignmentJobSpec.model_validate({**SPEC, "resources": {"nodes": 1024}})
    started = time.perf_counter()
    pods = build_gang(JobRef("j", "ns", "u", spec), "reward", 0)
    built = time.perf_counter() - started
    assert len({p["metadata"]["name"] for p in pods}) == 1024
    world = World()
    world.spec = spec
    world.step()
    world.set("reward", "Running")
    started = time.perf_counter()
    world.step()
    reconciled = time.perf_counter() - started
    assert world.status.stages.reward.message == "attempt 0: 1024/1024 pods running"
    assert built < 2.0 and reconciled < 0.5, (built, reconciled)


def _disrupt(world: World, node: int, reason: str = "EvictionByEvictionAPI") -> None:
    pod = next(p for p in world.gang("reward") if p.node_rank == node and p.attempt == world.status.stages.reward.attempt)
    world.pods[pod.name] = replace(pod, phase="Failed", exit_code=143, finished_at=world.now, disrupted=True,
                                   reason=reason, message="Eviction API: evicting pod")


def test_disruptions_restart_the_gang_without_using_backoff_then_their_own_limit_fails() -> None:
    world = World(backoffLimit=0, maxDisruptions=2)
    world.step()
    for expected in (1, 2):
        world.set("reward", "Running")
        world.step()
        _disrupt(world, node=1)
        world.step()
        reward = world.status.stages.reward
        assert (reward.restarts, reward.disruptions, reward.attempt) == (0, expected, expected)
        assert world.condition("Restarting")[:2] == ("True", "EvictionByEvictionAPI")
        assert f"disruption {expected}/2, not counted in runPolicy.backoffLimit" in world.status.message
        world.step()  # the old gang is gone: the next attempt's pods are created
    world.set("reward", "Running")
    world.step()
    _disrupt(world, node=0, reason="PreemptionByScheduler")
    world.step()
    assert world.status.phase == "Failed" and world.condition("Failed")[1] == "DisruptionLimitExceeded"
    assert "runPolicy.maxDisruptions=2" in world.status.message and "PreemptionByScheduler" in world.status.message


def test_pending_pods_are_named_with_the_schedulers_message_until_the_gang_runs() -> None:
    world = World()
    world.step()
    world.set("reward", "Running", node=0)
    world.step()
    assert world.condition("PodsPending") is None  # merely starting: no condition
    assert [p.name for p in world.status.stages.reward.pending_pods] == ["j-reward-0-1"]
    why = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available"
    pod = world.pods["j-reward-0-1"]
    world.pods[pod.name] = replace(pod, waiting=f"Unschedulable: {why}")
    world.step()
    world.step()
    assert world.condition("PodsPending")[:2] == ("True", "Unschedulable")
    message = next(c.message for c in world.status.conditions if c.type == "PodsPending")
    assert message == f"stage reward attempt 0: 1/2 pods pending; pod j-reward-0-1: Unschedulable: {why}"
    pending = world.status.stages.reward.pending_pods[0]
    assert (pending.name, pending.reason, pending.message) == ("j-reward-0-1", "Unschedulable", why)
    assert world.events().count("PodsPending") == 1  # said once, not on every pass
    world.set("reward", "Running")
    world.step()
    assert world.condition("PodsPending")[:2] == ("False", "GangComplete")
    assert world.status.stages.reward.pending_pods == []


def test_a_refused_pod_is_reported_at_once_and_a_permanent_refusal_fails_the_job() -> None:
    world = World()
    quota = (403, "Forbidden", 'pods "j-reward-0-0" is forbidden: exceeded quota: gpu, requested: cpu=2')
    plan = world.step(refuse_create=quota)
    assert world.condition("CreateFailed")[:2] == ("True", "ExceededQuota")
    assert "exceeded quota" in world.status.message and world.status.phase == "Pending"
    assert [e.reason for e in plan.events] == ["Created", "StageStarted", "FailedCreate"]
    assert not world.status.stages.reward.pods_created and world.pods == {}
    plan = world.step(refuse_create=quota)  # retried; the same message is not sent again
    assert [e.reason for e in plan.events] == []
    world.step()  # the quota has room now
    assert world.status.stages.reward.pods_created and len(world.pods) == 2
    world.step()
    assert world.condition("CreateFailed")[:2] == ("False", "Created")
    world.set("reward", "Succeeded", 0)
    invalid = (422, "Invalid", 'Pod "j-score-0-0" is invalid: metadata.annotations: Too long: must have at most '
                               "262144 bytes")
    world.step(refuse_create=invalid)
    assert world.status.phase == "Failed" and world.condition("Failed")[1] == "CreateRejected"
    assert "HTTP 422 Invalid" in world.status.message and "metadata.annotations: Too long" in world.status.message
    assert world.status.stages.score.phase == "Failed"


def test_active_deadline_counts_when_no_pod_was_ever_created() -> None:
    world = World(activeDeadlineSeconds=10)
    quota = (403, "Forbidden", "exceeded quota: gpu")
    world.step(refuse_create=quota)
    world.step(5, refuse_create=quota)
    assert world.status.phase == "Pending" and world.pods == {}
    world.step(5, refuse_create=quota)
    assert world.status.phase == "Failed" and world.condition("Failed")[1] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=10" in world.status.message
