"""The AlignmentJob status: what the operator writes to the status subresource.

`operator/crds.py` turns these models and the spec's (`mmalign.api.spec`) into the CRD.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from mmalign.api.conditions import CONDITION_TYPES, ConditionStatus, ConditionType

JobPhase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Skipped"]
# Phases nothing follows: a client waiting on a job or a stage stops at these.
JOB_OVER: tuple[JobPhase, ...] = ("Succeeded", "Failed")
STAGE_OVER: tuple[StagePhase, ...] = ("Succeeded", "Failed", "Skipped")


class StatusModel(BaseModel):
    # Status is read back from the API server, which may hold fields of a newer operator: ignore them.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    type: ConditionType = Field(
        description=", ".join(CONDITION_TYPES[:-1]) + " or " + CONDITION_TYPES[-1] + "."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="One CamelCase word for machines.")
    message: str = Field(default="", description="What happened, for humans.")
    last_transition_time: str = Field(
        default="", description="When status last flipped (RFC 3339); kept while it does not change."
    )


class StageProgress(StatusModel):
    step: int = Field(default=0, description="Optimizer steps (or scored pairs) done.")
    total: int = Field(default=0, description="Steps (or pairs) in the stage.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left.")
    updated: str = Field(default="", description="When the trainer last reported (RFC 3339).")


class PendingPod(StatusModel):
    name: str = Field(description="The pod.")
    reason: str = Field(
        default="", description="Why it waits: Unschedulable, ImagePullBackOff, ... (empty: starting)."
    )
    message: str = Field(default="", description="The scheduler's or the kubelet's message.")


class StageStatus(StatusModel):
    phase: StagePhase = Field(default="Pending", description="The stage's phase.")
    attempt: int = Field(default=0, description="Gang attempt (0 = first); each restart adds one.")
    restarts: int = Field(default=0, description="Gang restarts so far (bounded by runPolicy.backoffLimit).")
    disruptions: int = Field(
        default=0,
        description="Gang restarts caused by evictions, preemptions, drains or lost nodes (bounded by "
        "runPolicy.maxDisruptions, not counted in restarts).",
    )
    pending_pods: list[PendingPod] = Field(
        default_factory=list,
        description="Pods of the current attempt that do not run yet, and why; empty once the gang runs.",
    )
    pods_created: bool = Field(
        default=False,
        description="All pods of the current attempt were created; a pod missing afterwards is a failure "
        "(the gang restarts), never re-created alone.",
    )
    start_time: str | None = Field(default=None, description="When the stage first started.")
    completion_time: str | None = Field(default=None, description="When the stage finished.")
    last_checkpoint: str | None = Field(
        default=None,
        description="URI of the last complete checkpoint the trainer reported, or the `latest` marker a "
        "restarted attempt resumes from (never set for score: it has no checkpoints and keeps its finished "
        "shards).",
    )
    notices: list[str] = Field(
        default_factory=list,
        description="What the trainer said it did not reuse and why (an earlier output made from other "
        "inputs or parameters); each became an Event with reason Recomputing. The last 8.",
    )
    artifact: str | None = Field(default=None, description="URI of the stage's output.")
    progress: StageProgress | None = Field(default=None, description="Live progress from rank 0.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Latest metrics (loss, acc, ...); once the stage ends its final numbers: reward "
        "eval_acc, eval_data_acc, eval_data_acc_plus; dpo eval_reward_accuracy, win_rate (the policy's win "
        "rate over the reference, judged by the reward model). Per-category tables: <storage>/<stage>/metrics.json.",
    )
    message: str = Field(default="", description="Why the stage is in this phase.")


class StagesStatus(StatusModel):
    reward: StageStatus | None = Field(default=None, description="Reward-model training.")
    score: StageStatus | None = Field(default=None, description="Critique scoring.")
    dpo: StageStatus | None = Field(default=None, description="MM-DPO.")


class AlignmentJobStatus(StatusModel):
    phase: JobPhase = Field(default="Pending", description="The job's phase.")
    stage: str = Field(default="", description="The active (or last) stage.")
    progress: str = Field(default="", description="Active stage progress, e.g. `120/400 (30%)`.")
    message: str = Field(default="", description="Why the job is in this phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    stages: StagesStatus = Field(default_factory=StagesStatus, description="One entry per stage.")
    observed_generation: int = Field(default=0, description="The spec generation this status reflects.")
    start_time: str | None = Field(default=None, description="When the job started running.")
    completion_time: str | None = Field(default=None, description="When the job finished.")

    def to_k8s(self) -> dict[str, Any]:
        """The dict written to the status subresource (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
