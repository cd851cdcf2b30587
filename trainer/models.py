"""Load and save policy models and the critique-based reward model.

    model, processor = models.load_model("s3://bucket/models/qwen2-vl-7b/")     # or a folder, builtin://
    reward, processor = models.load_reward_model("builtin://tiny-qwen2-vl", seed=0)
    out = reward(batch)                     # batch from Collator.reward: scores + critique log-probs
    reward.save("/tmp/rm", processor)       # HF folder + score_head.safetensors; load_reward_model reads it
    models.write_reward_info("/tmp/rm", critique=True, base_model=uri)   # mmalign_reward.json
    models.reward_info_critique("/tmp/rm")  # True / False, None when the folder has no info file
    models.save_model(model, processor, "/tmp/policy")

The reward model's on-disk format is defined here and nowhere else: the base model's HF folder, the
score head in `score_head.safetensors`, and `mmalign_reward.json` ({critique, base_model}) that the
reward stage writes and the score stage reads to know whether to generate critiques.

Sources: a local Hugging Face folder, an `s3://` prefix holding one (downloaded ONCE per node into
`$MMALIGN_CACHE/models/<hash>/`: the first process takes a file lock, the others wait and reuse it), or
`builtin://tiny-*` (tiny.py, saved once as such a folder by builtin.model_folder): every source is read
by the same `from_pretrained`. Supported: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision (image-text-to-text)
and causal text LMs. A stage passes the engine's `Placement`: weights load in the job's precision (bf16
when `deepspeed.bf16`) and, under ZeRO-3, straight into each rank's partitions:

    placement = engine.training_placement(spec.stages.dpo, spec.deepspeed, dist)
    policy, processor = models.load_model(spec.model.uri, seed=spec.seed, placement=placement)
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.api.exit_codes import ExitCode
from mmalign.trainer import builtin, logprobs, storage, transfer
from mmalign.trainer.collate import Batch
from mmalign.trainer.engine import Placement

SCORE_HEAD_FILE = "score_head.safetensors"  # the score head's weights, beside the base model's
REWARD_INFO_FILE = "mmalign_reward.json"  # {critique, base_model}: how the reward model was trained
VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def model_dir(uri: str, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """A local folder holding the model at `uri`: the folder itself, the node's download of it, or a
    builtin model's folder (written once into the cache, builtin.model_folder; `seed` picks its weights)."""
    if builtin.is_builtin(uri):
        return builtin.model_folder(uri, seed)
    if not storage.is_remote(uri):
        path = storage.local_path(uri)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{uri}: no config.json; expected a Hugging Face model folder")
        return path
    root = Path(cache_dir) if cache_dir else builtin.cache_dir() / "models"
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other local ranks wait here for the first download
        if not (target / ".complete").exists():
            scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
            transfer.download_prefix(uri if uri.endswith("/") else uri + "/", scratch)
            if not (scratch / "config.json").exists():
                shutil.rmtree(scratch, ignore_errors=True)
                raise FileNotFoundError(f"{uri}: no config.json below this prefix; expected a model folder")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(scratch, target)
            (target / ".complete").touch()
    return target


def load_model(uri: str, *, seed: int = 0, placement: Placement | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, processor-or-tokenizer) from a folder, an s3:// prefix or builtin://, all
    through `from_pretrained` on a Hugging Face folder. `placement` (engine.training_placement /
    frozen_placement): the dtype, and ZeRO-3 partitions built straight from the checkpoint; default
    float32, whole on this rank."""
    import transformers

    placement = placement or Placement()
    folder = model_dir(uri, cache_dir, seed)
    config = transformers.AutoConfig.from_pretrained(folder)
    vision = config.model_type in VISION_MODEL_TYPES
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    where = {"device_map": {"": placement.device}} if placement.device is not None else {}
    with placement.building():
        model = auto.from_pretrained(folder, dtype=placement.dtype, **where)
    processor = load_processor(uri, seed=seed, cache_dir=cache_dir)
    model.eval()
    return model, processor


def load_processor(uri: str, *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The processor (VLM) or tokenizer (text model) of the model at `uri`, without its weights: what
    the stages need before step 0 to count every row's tokens (preflight.fitting)."""
    import transformers

    folder = model_dir(uri, cache_dir, seed)
    vision = transformers.AutoConfig.from_pretrained(folder).model_type in VISION_MODEL_TYPES
    return (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(folder)


def save_model(model: nn.Module, processor: Any, folder: str | os.PathLike[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an HF folder (safetensors weights + config + processor/tokenizer) that load_model reads.

    `state_dict`: full weights gathered by the engine (ZeRO-3 shards parameters)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict)  # type: ignore[operator]
    processor.save_pretrained(path)
    return path


def hidden_size(model: nn.Module) -> int:
    config: Any = model.config
    return int(getattr(config, "text_config", config).hidden_size)


class ScoreHead(nn.Module):
    """Two-layer MLP with tanh on one hidden state -> a scalar reward, as the MM-RLHF reference
    (`RewardHead` in llava/model/language_model/llava_qwen.py: dense -> tanh -> out_proj)."""

    def __init__(self, hidden: int, seed: int = 0) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, 1)
        generator = torch.Generator().manual_seed(seed + 7919)  # same head on every rank
        with torch.no_grad():
            for layer in (self.dense, self.out_proj):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
                layer.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (R, H) -> (R,)
        return self.out_proj(torch.tanh(self.dense(hidden))).squeeze(-1)


@dataclasses.dataclass
class RewardOutput:
    scores: torch.Tensor  # (R,) reward per row, float32
    critique: logprobs.SequenceLogprobs | None  # summed critique-token log-probs per row (teacher forced)


class RewardModel(nn.Module):
    """Critique-based reward model: a VLM (`base`, its LM head writes critiques) + `score_head`
    reading the hidden state at the last non-pad token of (prompt, response[, critique])."""

    def __init__(self, base: nn.Module, score_head: ScoreHead | None = None, seed: int = 0) -> None:
        super().__init__()
        self.base = base
        self.score_head = score_head or ScoreHead(hidden_size(base), seed)
        self.score_head.to(next(base.parameters()).dtype)

    @property
    def config(self) -> Any:
        return self.base.config

    def forward(self, batch: Batch, chunk_size: int = 1024) -> RewardOutput:
        """One forward pass: vision once per pair, scores at each row's last token, and the critique
        log-probs when the batch has a critique_mask (Collator.reward(critique=True))."""
        hidden = logprobs.forward_hidden(self.base, batch)  # (R, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, batch.last_token_index()]  # (R, H)
        scores = self.score_head(last.to(self.score_head.dense.weight.dtype)).float()
        critique = None
        if batch.critique_mask is not None:
            critique = logprobs.sequence_logprobs(self.base, hidden, batch, batch.critique_mask, chunk_size)
        return RewardOutput(scores=scores, critique=critique)

    def save(self, folder: str | os.PathLike[str], processor: Any,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """HF folder of the base model + `score_head.safetensors`. `state_dict`: this module's full
        state dict (keys `base.*`, `score_head.*`) when the engine gathered it (ZeRO-3)."""
        from safetensors.torch import save_file

        base_state = head_state = None
        if state_dict is not None:
            base_state = {k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")}
            head_state = {k[len("score_head."):]: v for k, v in state_dict.items() if k.startswith("score_head.")}
        path = save_model(self.base, processor, folder, base_state)
        head = head_state or self.score_head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(path / SCORE_HEAD_FILE))
        return path


class MissingScoreHead(Exception):
    """A reward model to score with has no trained score head (a configuration error: exit code 2)."""

    exit_code = ExitCode.CONFIG_ERROR


def load_reward_model(uri: str, *, seed: int = 0, placement: Placement | None = None,
                      cache_dir: str | os.PathLike[str] | None = None,
                      trained: bool = False) -> tuple[RewardModel, Any]:
    """A RewardModel from a saved reward-model folder/prefix (score head restored), or from any policy
    source (a fresh, seeded score head: the start of the reward stage). `trained`: the model must be a
    trained reward model (the score stage): a folder without `score_head.safetensors` is refused
    (MissingScoreHead) instead of scoring with a random head. builtin:// models have no score head and
    keep their seeded one (tests, demo). The score head is small: built whole, ZeRO-3 partitions it when
    the engine starts."""
    head_file = None if builtin.is_builtin(uri) else model_dir(uri, cache_dir, seed) / SCORE_HEAD_FILE
    if trained and head_file is not None and not head_file.exists():  # refused before loading the weights
        raise MissingScoreHead(
            f"{uri}: no {SCORE_HEAD_FILE} in this folder, so it is not a trained reward model; point "
            "stages.score.rewardModel at a folder the reward stage wrote (it holds the score head), or "
            "remove it to use this job's reward stage")
    base, processor = load_model(uri, seed=seed, placement=placement, cache_dir=cache_dir)
    head = None
    if head_file is not None and head_file.exists():
        from safetensors.torch import load_file

        head = ScoreHead(hidden_size(base), seed)
        head.load_state_dict(load_file(str(head_file)))
    return RewardModel(base, head, seed), processor


def write_reward_info(folder: str | os.PathLike[str], *, critique: bool, base_model: str) -> None:
    """`mmalign_reward.json` beside a saved reward model: whether it was trained to write critiques."""
    storage.write_json(str(Path(folder) / REWARD_INFO_FILE), {"critique": critique, "base_model": base_model})


def reward_info_critique(uri: str) -> bool | None:
    """The `critique` flag of the reward model at `uri` (folder or prefix); None without a readable
    info file (a reward model from elsewhere)."""
    try:
        return bool(storage.read_json(storage.join(uri, REWARD_INFO_FILE))["critique"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
