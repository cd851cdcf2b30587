"""The AlignmentJob's inputs: the base model, the preference data and the storage (S3 or a local folder)
that checkpoints and artifacts go to. Part of the one set of models in mmalign/api/spec.py (see its
docstring)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from mmalign.api import formats
from mmalign.api.base import Model, rules


class ModelSource(Model):
    uri: str = Field(
        min_length=1,
        description="Where the model is: a local Hugging Face folder, an s3:// prefix holding one, or a "
        "built-in tiny random-init model (builtin://tiny-qwen2-vl, builtin://tiny-qwen2.5-vl, "
        "builtin://tiny-llava-onevision, builtin://tiny-text).",
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template that formats prompts and responses, instead of the checkpoint's "
        "own (its chat_template.jinja / processor or tokenizer config). Only needed for a checkpoint "
        "without one: the stages refuse to guess a format. The exported models carry it.",
    )


PIXELS_ORDER = "data.minPixels must not exceed data.maxPixels"


class DataSource(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!has(self.minPixels) || !has(self.maxPixels) || self.minPixels <= self.maxPixels", PIXELS_ORDER),
        )
    )

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
        default=8,
        ge=1,
        le=256,
        description="Frames sampled uniformly from a video frame folder, given to the model as its own "
        "video input. Qwen2-VL/Qwen2.5-VL: 2 frames per temporal patch. LLaVA-OneVision: exactly this many "
        "(a folder with fewer repeats frames), each pooled 2x2: videoFrames x 196 + 1 tokens for a "
        "SigLIP-384/14 tower.",
    )
    loader_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="DataLoader worker processes per rank that prepare the next micro-batches while the "
        "step computes: read the media (disk or S3), decode, scale and preprocess them, tokenize and pad. "
        "Forked from the rank once per pass (the processor and pairs are not copied). 0: in the rank's own "
        "process, inside the step. Give the pod cpu >= procPerNode x (1 + loaderWorkers).",
    )
    prefetch_batches: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Micro-batches each loader worker prepares ahead (DataLoader prefetch_factor): up to "
        "loaderWorkers x prefetchBatches wait in shared memory (/dev/shm, resources.shmSize).",
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of queries (not pairs: a query's pairs stay together) held out for "
        "evaluation (reward-model Acc/Acc+, DPO reward accuracy).",
    )
    max_length: int = Field(
        default=2048,
        ge=16,
        description="Token budget per sequence (prompt + response [+ critique]). A longer row loses "
        "critique tokens, then prompt text from its start; the response and the image/video tokens are "
        "never cut. A row that still does not fit stops the job with its file:line.",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=784,
        description="Largest image (and video frame) area in pixels: larger ones are scaled down, aspect "
        "kept, before the processor. Qwen2-VL/Qwen2.5-VL: also the image processor's max_pixels "
        "(tokens per image <= maxPixels / 784); LLaVA-OneVision: bounds the anyres tiles. Default: the "
        "checkpoint's processor setting (Qwen2-VL allows ~16k tokens per image).",
    )
    min_pixels: int | None = Field(
        default=None,
        ge=784,
        description="Qwen2-VL/Qwen2.5-VL: smallest image area in pixels (the image processor's "
        "min_pixels; smaller images are scaled up). Default: the checkpoint's processor setting.",
    )

    @model_validator(mode="after")
    def _pixels_order(self) -> DataSource:
        # The same rule as the CEL rule above, for offline validation and the trainer.
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(PIXELS_ORDER)
        return self


class StorageSpec(Model):
    uri: str = Field(
        pattern=r"^(s3|file)://.+",
        description="Prefix for everything the job writes: checkpoints, the reward model, scored data, "
        "the final policy. s3://bucket/prefix/ or file:///path/ (local runs, shared filesystems).",
    )
    endpoint: str | None = Field(
        default=None, pattern=formats.ENDPOINT_PATTERN, max_length=2048,
        description="S3-compatible endpoint URL, http(s)://host[:port] (e.g. https://s3.example.com). "
        "Default: AWS.",
    )
    region: str | None = Field(default=None, description="S3 region. Default: the SDK's default.")
    path_style: bool = Field(
        default=True,
        description="Address buckets as endpoint/bucket/key (most S3-compatible servers) instead of "
        "bucket.endpoint/key.",
    )
    credentials_secret: str | None = Field(
        default=None, pattern=formats.DNS_SUBDOMAIN_PATTERN, max_length=253,
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
