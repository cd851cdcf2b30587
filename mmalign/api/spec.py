"""The AlignmentJob spec: ONE set of pydantic models for the CRD schema, the operator and the trainer.

This module holds the job (`AlignmentJobSpec`, its cross-field rules and the per-stage views the
operator reads), the manifest and tracking; its parts are in inputs.py (model, data, storage),
runtime.py (resources, pod templates, DeepSpeed, checkpoint, gang scheduling, run policy) and
stages.py (reward, score, dpo), all on base.py's `Model`. The operator imports this module (pydantic only, no torch) to validate jobs and to generate the CRD
(`mmalign crds`); the trainer reads the job document the operator wrote (`mmalign.api.jobfile`). Field names are camelCase in YAML
(Kubernetes convention) and snake_case in Python. Every field has a description: it becomes the text of
`kubectl explain aj.spec...`.

Cross-field rules are written twice on purpose, next to each other: as a Python check (for
`mmalign validate` and the trainer) and as a CEL rule (`x-kubernetes-validations`, enforced by the API
server). tests/bad_specs.py holds bad specs that tests/unit/test_api.py (Python) and
tests/integration/test_operator_api.py (the real API server) both run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from mmalign.api import layout, podtemplate
from mmalign.api.base import Model, rules
from mmalign.api.groupversion import API_VERSION_FULL, KIND
from mmalign.api.inputs import DataSource, ModelSource, StorageSpec
from mmalign.api.layout import StageName
from mmalign.api.runtime import CheckpointSpec, DeepSpeedSpec, PodOverlay, PodTemplate, Resources, RunPolicy
from mmalign.api.stages import (
    BETA_DPO_WITHOUT_DRS,
    DRS_NEEDS_MARGINS,
    SCORE_NEEDS_REWARD_MODEL,
    TOKEN_BUDGET_RULES,
    Stages,
)

# ---------------------------------------------------------------------------------------- tracking
# Experiment trackers (trainer/tracking.py; docs/observability.md): rank 0 sends the progress lines'
# scalars to each tracker named here, from a background thread, so a slow tracker never stalls a step.


class TensorBoardTracking(Model):
    uri: str | None = Field(
        default=None, pattern=r"^(s3|file)://.+", max_length=2048,
        description="Log folder: each stage writes its event files to <uri>/<stage>/ (run `tensorboard "
        "--logdir <uri>`). s3://bucket/prefix/ (the job's storage endpoint and credentials) or file:///path/. "
        "Default: <storage.uri>/tensorboard/. Written locally, uploaded every 30 s and at the stage's end.",
    )

    def stage_uri(self, storage_uri: str, stage: str) -> str:
        """Where `stage`'s event files go: `<uri or storage/tensorboard/>/<stage>/`."""
        return layout.join_uri(self.uri or layout.join_uri(storage_uri, "tensorboard/"), f"{stage}/")


class MlflowTracking(Model):
    tracking_uri: str = Field(
        min_length=1, max_length=2048, pattern=r"^(https?|file)://.+",
        description="The MLflow tracking server (http(s)://host:5000) or a file store (file:///path). "
        "Credentials: MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD in the trainer's env "
        "(podTemplate env valueFrom a Secret).",
    )
    experiment: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Experiment name (created when missing). Default: the job's name. Each stage is one "
        "run, <job>-<stage>; a restarted gang continues its stage's run.",
    )


class WandbTracking(Model):
    project: str = Field(min_length=1, max_length=128, description="Weights & Biases project.")
    entity: str | None = Field(default=None, max_length=128, description="W&B entity (team); default: yours.")
    mode: Literal["offline", "online"] = Field(
        default="offline",
        description="offline (default): the run is written locally and uploaded to <storage.uri>/<stage>/wandb/ "
        "at the stage's end, for `wandb sync`; online: streamed to W&B (WANDB_API_KEY from a Secret). "
        "Needs the `wandb` extra in the trainer image.",
    )


class TrackingSpec(Model):
    tensorboard: TensorBoardTracking | None = Field(
        default=None, description="TensorBoard event files (torch's SummaryWriter); {} = under storage.uri."
    )
    mlflow: MlflowTracking | None = Field(default=None, description="An MLflow run per stage (the mlflow client).")
    wandb: WandbTracking | None = Field(default=None, description="A Weights & Biases run per stage.")


# ---------------------------------------------------------------------------------------- the job

_JOB_RULES = rules(
    (
        "!has(self.stages.score) || has(self.stages.reward) || has(self.stages.score.rewardModel)",
        SCORE_NEEDS_REWARD_MODEL,
    ),
    (
        "!has(self.stages.dpo) || !has(self.stages.dpo.dynamicRewardScaling) || has(self.stages.score)"
        " || has(self.stages.dpo.scoredData)",
        DRS_NEEDS_MARGINS,
    ),
)


class AlignmentJobSpec(Model):
    """What the user writes under `spec:`."""

    model_config = ConfigDict(json_schema_extra=_JOB_RULES)

    image: str = Field(
        default="ghcr.io/mmalign/mmalign:0.1.0",
        min_length=1,
        description="Trainer image. Default: the chart's trainer image.",
    )
    model: ModelSource = Field(description="The base (policy) model the stages start from.")
    data: DataSource = Field(description="Preference data for the reward and DPO stages.")
    storage: StorageSpec = Field(description="Where checkpoints and artifacts go.")
    resources: Resources = Field(default_factory=Resources, description="Pods per stage and their size.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine.")
    stages: Stages = Field(description="The stages to run, in order reward → score → dpo.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, TTL.")
    pod_template: PodTemplate = Field(default_factory=PodTemplate, description="Pod placement and extras.")
    seed: int = Field(default=0, ge=0, description="Seed for data order and initialisation.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment tracking: TensorBoard, MLflow, Weights & Biases (rank 0, in the background).",
    )

    @model_validator(mode="after")
    def _stage_inputs(self) -> AlignmentJobSpec:
        # The same rules as _JOB_RULES (CEL), for offline validation and the trainer.
        stages = self.stages
        if not stages.enabled():
            raise ValueError("stages: at least one stage is required (reward, score or dpo)")
        if stages.score and not stages.reward and not stages.score.reward_model:
            raise ValueError(SCORE_NEEDS_REWARD_MODEL)
        if (
            stages.dpo
            and stages.dpo.dynamic_reward_scaling
            and not stages.score
            and not stages.dpo.scored_data
        ):
            raise ValueError(DRS_NEEDS_MARGINS)
        if stages.dpo and stages.dpo.loss == "beta-dpo" and stages.dpo.dynamic_reward_scaling:
            raise ValueError("stages.dpo: " + BETA_DPO_WITHOUT_DRS)
        dpo = stages.dpo
        if dpo and dpo.max_tokens_per_batch and (dpo.micro_batch_size != 1 or not dpo.prefix_sharing
                                                 or not dpo.packing):
            raise ValueError(TOKEN_BUDGET_RULES)
        return self

    @model_validator(mode="after")
    def _deepspeed_config_agrees(self) -> AlignmentJobSpec:
        # Python only (`mmalign validate`, and the operator fails such a job at once with InvalidSpec):
        # CEL cannot read the free-form deepspeed.config.
        problems = self.deepspeed_contradictions()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _stage_pods(self) -> AlignmentJobSpec:
        # Python only: the stage's effective resources need spec.resources, which CEL on the stage cannot see.
        problems = []
        for stage in self.stages.enabled():
            try:
                resources = self.stage_resources(stage)
            except ValueError as error:
                problems.append(f"stages.{stage}.resources: {error}")
                continue
            problems += self._owned_resources(stage, resources)
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))  # spec.podTemplate's: once, not per stage
        return self

    def _owned_resources(self, stage: StageName, resources: Resources) -> list[str]:
        """A trainer-container resource in an overlay that spec.resources (or the stage's) already sets."""
        gpu = resources.gpu_resource()[0]
        problems = []
        for path, layer in self.stage_pod_templates(stage):
            index, given = podtemplate.trainer_resources(layer.spec)
            for kind in ("requests", "limits"):
                owned = set(getattr(resources, kind)) | {gpu}
                for name in sorted(set(given.get(kind) or {}) & owned):
                    problems.append(f"{path}.spec.containers[{index}].resources.{kind}.{name}: the operator sets it "
                                    f"from resources.{kind} (spec.resources, stages.{stage}.resources): set it there")
        return problems

    def deepspeed_contradictions(self) -> list[str]:
        """Values of deepspeed.config that contradict the fields the engine generates them from (the raw
        config is merged over the generated one, so it would silently win over the spec's own)."""
        raw = self.deepspeed.config or {}
        problems = []
        for section, key, value, field in (("zero_optimization", "stage", self.deepspeed.zero_stage,
                                            "deepspeed.zeroStage"),
                                           ("bf16", "enabled", self.deepspeed.bf16, "deepspeed.bf16")):
            given = raw.get(section)
            if isinstance(given, dict) and key in given and given[key] != value:
                problems.append(f"deepspeed.config.{section}.{key}: {given[key]!r} contradicts {field} = {value!r}: "
                                f"set {field} and remove it from deepspeed.config")
        for name in ("reward", "dpo"):  # the stages that train; each runs the engine with its own sizes
            stage = getattr(self.stages, name)
            if stage is None:
                continue
            for key, value, field in (
                ("train_micro_batch_size_per_gpu", stage.micro_batch_size, "microBatchSize"),
                ("gradient_accumulation_steps", stage.gradient_accumulation, "gradientAccumulation"),
                ("train_batch_size", stage.micro_batch_size * stage.gradient_accumulation * self.world_size(name),
                 "microBatchSize x gradientAccumulation x nodes x procPerNode"),
            ):
                if key in raw and raw[key] != value:
                    problems.append(f"deepspeed.config.{key}: {raw[key]!r} contradicts stages.{name}.{field} = "
                                    f"{value}: remove it from deepspeed.config (the engine derives it from the stage)")
        return problems

    # -- where each stage's artifacts live: the operator reports these, the next stage reads them.

    def artifact_uri(self, stage: StageName) -> str:
        """The stage's final output: reward model folder, scored-pairs folder, or final policy folder."""
        return layout.artifact_uri(self.storage.uri, stage)

    def checkpoint_uri(self, stage: StageName) -> str:
        """Prefix of the stage's checkpoints; `<prefix>latest` is the marker of the last complete one."""
        return layout.checkpoint_uri(self.storage.uri, stage)

    def reward_model_uri(self) -> str:
        """The reward model the score stage reads."""
        if self.stages.score and self.stages.score.reward_model:
            return self.stages.score.reward_model.uri
        return self.artifact_uri("reward")

    def dpo_data_uri(self) -> str:
        """The pairs the DPO stage trains on: scored by this job, given scored data, or the raw data."""
        if self.stages.score:
            return self.artifact_uri("score")
        if self.stages.dpo and self.stages.dpo.scored_data:
            return self.stages.dpo.scored_data
        return self.data.uri

    def world_size(self, stage: str | None = None) -> int:
        """Processes of a stage (spec.resources when no stage is named or it overrides none)."""
        resources = self.stage_resources(stage) if stage else self.resources
        return resources.nodes * resources.proc_per_node

    # -- per-stage pods: stages.<s>.resources and stages.<s>.podTemplate over the job's.

    def stage_resources(self, stage: str) -> Resources:
        override = getattr(self.stages, stage).resources if getattr(self.stages, stage, None) else None
        return override.over(self.resources) if override else self.resources

    def stage_pod_templates(self, stage: str) -> list[tuple[str, PodOverlay]]:
        """(field path, overlay) layers of a stage's pods, applied in order: the job's, then the stage's."""
        layers: list[tuple[str, PodOverlay]] = [("podTemplate", self.pod_template)]
        own = getattr(self.stages, stage).pod_template if getattr(self.stages, stage, None) else None
        return layers + ([(f"stages.{stage}.podTemplate", own)] if own else [])

    def stage_pod_fragment(self, stage: str) -> dict[str, Any]:
        """The stage's pod template fragment {metadata, spec}: every layer merged in order."""
        merged: dict[str, Any] = {"metadata": {}, "spec": {}}
        for _, layer in self.stage_pod_templates(stage):
            merged = podtemplate.strategic_merge(merged, layer.fragment(), podtemplate.pod_template_schema())
        return merged


class AlignmentJobManifest(Model):
    """The whole YAML document as a user writes it (status is the operator's)."""

    model_config = ConfigDict(extra="ignore")  # `status` and server-side metadata fields

    api_version: Literal["mmalign.io/v1alpha1"] = Field(description=API_VERSION_FULL)
    kind: Literal["AlignmentJob"] = Field(description=KIND)
    metadata: dict[str, Any] = Field(description="Kubernetes object metadata; `name` is required.")
    spec: AlignmentJobSpec

    @model_validator(mode="after")
    def _named(self) -> AlignmentJobManifest:
        name = self.metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("metadata.name is required")
        return self


