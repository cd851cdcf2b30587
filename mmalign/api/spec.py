"""The AlignmentJob spec: ONE set of pydantic models for the CRD schema, the operator and the trainer.

The operator imports this module (pydantic only, no torch) to validate jobs and to generate the CRD
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

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from mmalign.api import layout
from mmalign.api.exit_codes import ExitCode
from mmalign.api.groupversion import API_VERSION_FULL, KIND
from mmalign.api.layout import StageName

STAGE_ORDER: tuple[StageName, ...] = ("reward", "score", "dpo")


def _rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the CRD: (rule, message) pairs -> the `x-kubernetes-validations` schema extra."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields are errors (nothing a user wrote is silently dropped)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=False
    )


# ---------------------------------------------------------------------------------------- inputs


class ModelSource(Model):
    uri: str = Field(
        min_length=1,
        description="Where the model is: a local Hugging Face folder, an s3:// prefix holding one, or a "
        "built-in tiny random-init model (builtin://tiny-qwen2-vl, builtin://tiny-qwen2.5-vl, "
        "builtin://tiny-llava-onevision, builtin://tiny-text).",
    )


class DataSource(Model):
    uri: str = Field(
        min_length=1,
        description="Preference data: a JSONL file (local path or s3:// URI) in the MM-RLHF `dpo_pairs` "
        "layout or the ranked multi-response layout, or a built-in set (builtin://synthetic-colors).",
    )
    media_uri: str | None = Field(
        default=None,
        description="Folder or s3:// prefix that the rows' relative image/video paths are resolved "
        "against. Default: the folder holding the data file.",
    )
    format: Literal["auto", "dpo_pairs", "ranked"] = Field(
        default="auto", description="Row layout. `auto` detects it per file from the first row."
    )
    on_bad_line: Literal["error", "skip"] = Field(
        default="error",
        description="A malformed line stops the job with its file:line (`error`), or is skipped and "
        "counted in the stage's metrics (`skip`). Never silent.",
    )
    missing_media: Literal["error", "placeholder"] = Field(
        default="error",
        description="A row whose image/video is missing stops the job naming the row and path "
        "(`error`), or gets a grey placeholder image (`placeholder`, counted in metrics).",
    )
    video_frames: int = Field(
        default=8, ge=1, le=256, description="Frames sampled uniformly from a video frame folder."
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of queries (not pairs: a query's pairs stay together) held out for "
        "evaluation (reward-model Acc/Acc+, DPO reward accuracy).",
    )
    max_length: int = Field(
        default=2048, ge=16, description="Token budget per sequence (prompt + response [+ critique])."
    )


class StorageSpec(Model):
    uri: str = Field(
        pattern=r"^(s3|file)://.+",
        description="Prefix for everything the job writes: checkpoints, the reward model, scored data, "
        "the final policy. s3://bucket/prefix/ or file:///path/ (local runs, shared filesystems).",
    )
    endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint URL (e.g. https://s3.example.com). Default: AWS."
    )
    region: str | None = Field(default=None, description="S3 region. Default: the SDK's default.")
    path_style: bool = Field(
        default=True,
        description="Address buckets as endpoint/bucket/key (most S3-compatible servers) instead of "
        "bucket.endpoint/key.",
    )
    credentials_secret: str | None = Field(
        default=None,
        description="Name of a Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY. Keys are never written in the AlignmentJob. Omit it to use the "
        "pod's cloud identity.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_keys(cls, data: Any) -> Any:
        # A clearer message than "extra field" for the mistake that leaks secrets.
        if isinstance(data, dict):
            for key in data:
                if "secret" in key.lower() and key != "credentialsSecret" or "accesskey" in key.lower():
                    raise ValueError(
                        f"inline credentials ({key}) are not allowed: put them in a Secret with keys "
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it in credentialsSecret"
                    )
        return data


# ---------------------------------------------------------------------------------------- runtime


class Resources(Model):
    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (nodes) per stage; one torchrun each.")
    proc_per_node: int = Field(
        default=1, ge=1, le=64, description="Processes per pod (torchrun --nproc-per-node); usually GPUs."
    )
    requests: dict[str, int | str] = Field(
        default_factory=dict, description="Container resource requests, e.g. {cpu: '8', nvidia.com/gpu: 8}."
    )
    limits: dict[str, int | str] = Field(
        default_factory=dict, description="Container resource limits. Default: none beyond requests."
    )
    shm_size: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Size limit of the in-memory /dev/shm (emptyDir, medium Memory), e.g. '16Gi'. NCCL and "
        "DataLoader workers need more than a container runtime's 64 MiB default. Default: no limit of its own "
        "(the pod's memory limit still counts it).",
    )


class DeepSpeedSpec(Model):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage (0 = plain data parallel).")
    bf16: bool = Field(default=False, description="bf16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload the optimizer state to CPU.")
    config: dict[str, Any] | None = Field(
        default=None,
        description="Raw DeepSpeed config merged over the generated one (expert use; free-form).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class CheckpointSpec(Model):
    every_steps: int = Field(default=200, ge=1, description="Save a checkpoint every N optimizer steps.")
    keep_last: int = Field(default=3, ge=1, description="Complete checkpoints kept per stage.")
    async_upload: bool = Field(
        default=True, description="Upload in the background so training does not wait for S3."
    )


class RunPolicy(Model):
    backoff_limit: int = Field(
        default=3, ge=0, description="Gang restarts allowed per stage before the job is Failed."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="The job fails when it has been active longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the AlignmentJob this long after it finished."
    )
    suspend: bool = Field(
        default=False, description="Suspended: pods are deleted; unsuspend resumes from the checkpoint."
    )
    retryable_exit_codes: list[int] = Field(
        default_factory=lambda: [int(ExitCode.STORAGE_ERROR), int(ExitCode.RENDEZVOUS_ERROR),
                                 int(ExitCode.COMMUNICATION_ERROR), int(ExitCode.RENDEZVOUS_TIMEOUT)],
        description="Exit codes in 1-127 that restart the gang. Codes >= 128 (signals) and evictions "
        "always restart it; other codes fail the job at once. Default: [5, 6, 9, 10] (storage "
        "unreachable, rendezvous DNS, NCCL/gloo communication, rendezvous timeout).",
    )
    clean_pods_after_finished: bool = Field(
        default=True,
        description="Delete finished pods and services when the job ends (logs then go with them); "
        "false keeps them until the TTL deletes the job.",
    )


class Toleration(Model):
    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect matched; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long to stay.")


class EnvVar(Model):
    name: str = Field(min_length=1, description="Variable name.")
    value: str = Field(default="", description="Literal value (use a Secret for anything sensitive).")


class PodTemplate(Model):
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    priority_class_name: str = Field(default="", description="Pod priorityClassName.")
    scheduler_name: str = Field(default="", description="Pod schedulerName (e.g. a gang scheduler).")
    service_account_name: str = Field(default="", description="Trainer pods' ServiceAccount.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment for the trainer.")


# ---------------------------------------------------------------------------------------- stages


class _Optimization(Model):
    learning_rate: float = Field(default=1.0e-6, gt=0, description="AdamW peak learning rate.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(default=1, ge=1, description="Pairs per process per forward pass.")
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Linear warm-up share of the steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")


class RewardStage(_Optimization):
    critique: bool = Field(
        default=True,
        description="Critique-based reward model (MM-RLHF): learn to write a critique, then score "
        "(prompt, response, critique). false = plain scalar Bradley-Terry reward model.",
    )
    critique_weight: float = Field(default=1.0, ge=0, description="Weight of the critique LM loss.")
    score_weight: float = Field(default=1.0, ge=0, description="Weight of the Bradley-Terry score loss.")
    margin: float = Field(default=0.0, ge=0, description="BT margin m: -log σ(r_w - r_l - m).")
    centering_weight: float = Field(
        default=0.0, ge=0, description="Centring term c·(r_w + r_l)² that keeps rewards near zero."
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate Acc/Acc+ on the held-out split every N steps."
    )


class ScoreStage(Model):
    reward_model: ModelSource | None = Field(
        default=None,
        description="Reward model to score with. Default: the one this job's reward stage trains.",
    )
    max_new_tokens: int = Field(default=1024, ge=1, description="Critique length limit.")
    batch_size: int = Field(default=16, ge=1, description="Responses per generation batch per process.")
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy decoding (the default).")
    shard_pairs: int = Field(
        default=256, ge=1,
        description="Pairs per output shard: the unit a restarted stage resumes from (finished shards are "
        "kept, whatever the world size). Smaller loses less work on a failure; larger makes fewer files.",
    )


# Cross-field rule messages: one text for the CEL rule (API server) and the Python check (validator).
SCORE_NEEDS_REWARD_MODEL = "stages.score needs a reward model: add stages.reward or set stages.score.rewardModel.uri"
DRS_NEEDS_MARGINS = (
    "stages.dpo.dynamicRewardScaling needs reward margins: add stages.score or set stages.dpo.scoredData"
)
BETA_DPO_WITHOUT_DRS = "dynamicRewardScaling applies to loss mm-dpo; beta-dpo scales β per batch instead"


class DynamicRewardScaling(Model):
    w: float = Field(default=0.5, ge=0, description="DRS weight w in β(δ) = β·(1 + w·(1 − e^(−kδ))).")
    k: float = Field(default=0.5, gt=0, description="DRS rate k in β(δ) = β·(1 + w·(1 − e^(−kδ))).")


class DpoStage(_Optimization):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("!has(self.loss) || self.loss != 'beta-dpo' || !has(self.dynamicRewardScaling)",
             BETA_DPO_WITHOUT_DRS),
        )
    )

    beta: float = Field(default=0.1, gt=0, description="β_ori, the DPO temperature.")
    loss: Literal["mm-dpo", "beta-dpo"] = Field(
        default="mm-dpo",
        description="mm-dpo: the paper's per-pair Dynamic Reward Scaling. beta-dpo: the batch-level "
        "β-DPO scheme of the public MM-RLHF code (reads no δ).",
    )
    dynamic_reward_scaling: DynamicRewardScaling | None = Field(
        default=None,
        description="Per-pair β from the reward margin δ of the score stage. Omit for a fixed β.",
    )
    sft_weight: float = Field(default=0.0, ge=0, description="γ: weight of the NLL(chosen) term.")
    reference: Literal["model", "precomputed"] = Field(
        default="precomputed",
        description="Reference log-probs from a frozen model during training (`model`), or computed "
        "once in a first pass and stored beside the data (`precomputed`: no reference model in "
        "memory while training).",
    )
    scored_data: str | None = Field(
        default=None,
        description="Scored pairs (with `delta`) to train on when this job has no score stage.",
    )


class Stages(Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("has(self.reward) || has(self.score) || has(self.dpo)", "at least one stage is required"),
        )
    )

    reward: RewardStage | None = Field(default=None, description="Train the critique-based reward model.")
    score: ScoreStage | None = Field(default=None, description="Critique and score every response.")
    dpo: DpoStage | None = Field(default=None, description="MM-DPO with Dynamic Reward Scaling.")

    def enabled(self) -> list[StageName]:
        """Stage names in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self, name) is not None]


# ---------------------------------------------------------------------------------------- the job

_JOB_RULES = _rules(
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
        return self

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

    def world_size(self) -> int:
        return self.resources.nodes * self.resources.proc_per_node


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

