"""What a training stage trains: a frozen vision tower, LoRA adapters, and the weights it exports.

Applied to a model AFTER it is loaded (models.py) and BEFORE the engine wraps it, by the reward and
dpo stages:

    lora = adapters.prepare(policy, freeze_vision_tower=True, lora=config.lora, seed=0, field="stages.dpo")
    # policy is the same Hugging Face object: vision tower frozen, LoRA layers injected in place;
    # lora is None without a `lora:` block
    with lora.disabled():                      # the base model again: DPO's reference under LoRA
        ...
    state = adapters.merged(state, lora)       # a gathered state dict -> plain HF keys, B·A merged in
    adapters.save_adapter(lora, folder, state, processor, base_model=uri)   # PEFT folder instead

Freezing (`freezeVisionTower`, default true): MM-RLHF's reward and DPO scripts train LLaVA-OV with
`--mm_tunable_parts="mm_mlp_adapter,mm_language_model"`: the vision encoder frozen, the projector and
the language model trained. Here the same split for every family (transformers 5.23 module names):

    LLaVA-OneVision      frozen: model.vision_tower           trained: model.multi_modal_projector
    Qwen2-VL, Qwen2.5-VL frozen: model.visual (patch_embed, blocks)   trained: model.visual.merger

LoRA (peft): adapters on the linear layers named by `targetModules` (matched by the last part of the
module name, outside the vision tower when it is frozen: Qwen2.5-VL's vision blocks also have
gate_proj/up_proj/down_proj, SigLIP has q_proj/k_proj/v_proj); everything else is frozen, the projector
too, so `disabled()` gives exactly the base model: the DPO reference needs no second copy. The reward
model's score head lives outside the Hugging Face model (models.RewardModel) and stays fully trained.
The adapters' A matrices are drawn from a private generator seeded by the job's seed (B starts at 0,
as peft does), so every rank and every run starts from the same adapters.

Export: `merged` (default) folds each adapter into its layer, W' = W + (alpha / r)·B·A, giving a plain
Hugging Face folder (the score stage and transformers load it like any model); `adapter` writes a PEFT
folder (adapter_config.json + adapter_model.safetensors) that `model.load_adapter(folder)` or
`peft.PeftModel.from_pretrained(base, folder)` puts over the base model.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.trainer.context import StageConfigError

ADAPTER = "default"  # peft's adapter name: it appears in the parameter names (lora_A.default.weight)
# model_type -> (the vision tower's modules, modules inside them that stay trainable: the projector)
VISION_TOWERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llava_onevision": (("model.vision_tower",), ()),
    "qwen2_vl": (("model.visual",), ("model.visual.merger",)),
    "qwen2_5_vl": (("model.visual",), ("model.visual.merger",)),
}


@dataclasses.dataclass
class Adapters:
    """The LoRA adapters injected into a model: the peft wrapper (whose LoRA layers live inside the
    Hugging Face model the stage trains) and the adapters' scale alpha / r."""

    peft_model: Any  # peft.PeftModel; the stage keeps using peft_model.get_base_model()
    scaling: float

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside: every adapter is bypassed, the model computes exactly what the base model does."""
        with self.peft_model.disable_adapter():
            yield


def prepare(
    model: nn.Module, *, freeze_vision_tower: bool, lora: Any | None, seed: int, field: str
) -> Adapters | None:
    """Freeze `model`'s vision tower (when asked) and inject LoRA adapters (when `lora` is given: the
    stage's `Lora` spec), in place. `field` (e.g. "stages.dpo") names the spec in errors."""
    tower = vision_tower(model, field) if freeze_vision_tower else ([], [])
    frozen_modules, trainable_modules = tower
    if freeze_vision_tower:
        for name in frozen_modules:
            model.get_submodule(name).requires_grad_(False)
        for name in trainable_modules:
            model.get_submodule(name).requires_grad_(True)
    if lora is None:
        return None
    import peft

    targets = lora_targets(
        model, lora.target_modules, frozen_modules, trainable_modules, f"{field}.lora.targetModules"
    )
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )
    with warnings.catch_warnings():  # peft 0.21 still asks transformers 5 for the old attribute name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.get_peft_model(model, config)  # freezes everything but the adapters
    model.train(model.training)  # the new dropout modules start in train mode: follow the model's
    _seeded_adapter_init(model, seed)
    return Adapters(peft_model=peft_model, scaling=lora.alpha / lora.r)


def vision_tower(model: nn.Module, field: str) -> tuple[list[str], list[str]]:
    """(frozen module names, trainable module names inside them) of `model`'s vision tower; nothing
    for a text-only model."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in VISION_TOWERS:
        if getattr(config, "vision_config", None) is not None:
            raise StageConfigError(
                f"{field}.freezeVisionTower: mmalign does not know where the vision tower of a "
                f"{model_type!r} model is (known: {', '.join(sorted(VISION_TOWERS))}); set it to false"
            )
        return [], []
    frozen_names, trainable_names = VISION_TOWERS[model_type]
    present = {name for name, _ in model.named_modules()}
    missing = [name for name in (*frozen_names, *trainable_names) if name not in present]
    if missing:  # a transformers release that renamed the modules: never train them silently
        raise StageConfigError(
            f"{field}.freezeVisionTower: the {model_type} model has no module "
            f"{', '.join(missing)} (transformers renamed it?); set it to false"
        )
    return list(frozen_names), list(trainable_names)


def lora_targets(
    model: nn.Module, names: list[str], skip: list[str], keep: list[str], field: str
) -> list[str]:
    """The full names of the linear layers whose last name part is in `names`, outside the modules
    `skip` (the frozen vision tower) unless inside `keep` (its projector); a StageConfigError naming
    `field` when a name matches nothing."""

    def under(name: str, prefixes: list[str]) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)

    def skipped(name: str) -> bool:
        return under(name, skip) and not under(name, keep)

    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    wanted = set(names)
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in wanted and not skipped(name)]
    matched = {name.rsplit(".", 1)[-1] for name in chosen}
    unmatched = [name for name in names if name not in matched]
    if unmatched:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear if not skipped(name)})
        raise StageConfigError(
            f"{field}: no linear layer named {', '.join(unmatched)} outside the frozen "
            f"vision tower; this model's are: {', '.join(available)}"
        )
    return chosen


@torch.no_grad()
def _seeded_adapter_init(model: nn.Module, seed: int) -> None:
    """A: uniform(±1/sqrt(in_features)) (peft's kaiming_uniform(a=√5) bound) from a private generator;
    B: 0, so the adapted model starts as the base model."""
    generator = torch.Generator().manual_seed(seed + 104729)
    for name, parameter in sorted(model.named_parameters()):
        if f".lora_A.{ADAPTER}." in name:
            bound = 1.0 / math.sqrt(parameter.shape[1])
            values = torch.rand(parameter.shape, generator=generator, dtype=torch.float32) * 2 - 1
            parameter.copy_(values * bound)
        elif f".lora_B.{ADAPTER}." in name:
            parameter.zero_()


# ------------------------------------------------------------------------------ export


def merged(state: dict[str, torch.Tensor], lora: Adapters) -> dict[str, torch.Tensor]:
    """A full state dict of an adapted model (any key prefix) -> the base model's keys with every
    adapter merged into its layer: W' = W + scaling·B·A (computed in float32, stored in W's dtype)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            module = key[: -len(".base_layer.weight")]
            a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
            b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
            value = (value.float() + lora.scaling * (b @ a)).to(value.dtype)  # (out, in)
            key = f"{module}.weight"
        out[key.replace(".base_layer.", ".")] = value
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapters' weights of a full state dict, under the names a PeftModel gives them."""
    return {f"base_model.model.{key}": value for key, value in state.items() if ".lora_" in key}


def save_adapter(
    lora: Adapters, folder: str | Path, state: dict[str, torch.Tensor] | None, processor: Any, base_model: str
) -> Path:
    """A PEFT folder (adapter_config.json, adapter_model.safetensors) + the processor's files.
    `state`: the model's full state dict (gathered under ZeRO-3), else the live one is used."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    full = state if state is not None else lora.peft_model.get_base_model().state_dict()
    lora.peft_model.peft_config[ADAPTER].base_model_name_or_path = base_model
    lora.peft_model.save_pretrained(str(path), state_dict=adapter_state(full))
    processor.save_pretrained(path)
    return path


def trainable_summary(model: nn.Module) -> str:
    """ "trainable 1.2M of 7.6B parameters" for the stage's start line (ZeRO-3 partitions count whole:
    a parameter loaded into its shards has numel 0 and its full size in ds_numel)."""
    sizes = [(int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for p in model.parameters()]
    total = sum(size for size, _ in sizes)
    trainable = sum(size for size, grad in sizes if grad)
    return f"trainable {_count(trainable)} of {_count(total)} parameters"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
