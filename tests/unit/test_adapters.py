"""Freezing the vision tower and LoRA on the tiny models: which parameters get gradients, the DPO
reference with adapters disabled, and the exported weights (merged, or the adapters alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from PIL import Image

from mmalign.api.stages import DpoLora, DpoStage, Lora, RewardStage
from mmalign.trainer import adapters, collate, logprobs, models
from mmalign.trainer.context import StageConfigError
from mmalign.trainer.stages.dpo import Reference, SequenceLogps

VISION = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision")
TOWER = {
    "tiny-qwen2-vl": "model.visual.",
    "tiny-qwen2.5-vl": "model.visual.",
    "tiny-llava-onevision": "model.vision_tower.",
}
PROJECTOR = {
    "tiny-qwen2-vl": "model.visual.merger.",
    "tiny-qwen2.5-vl": "model.visual.merger.",
    "tiny-llava-onevision": "model.multi_modal_projector.",
}


def _examples(text_only: bool = False) -> list[collate.Example]:
    red, blue = Image.new("RGB", (48, 40), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 60, 220))
    return [
        collate.Example(
            "What colour is the image?",
            "The image is red.",
            "It is blue.",
            [] if text_only else [red],
            "Correct.",
            "Wrong: it is red.",
        ),
        collate.Example(
            "Describe the image.",
            "Blue.",
            "A green image.",
            [] if text_only else [blue],
            "Right colour.",
            "Wrong colour.",
        ),
    ]


def _with_grads(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _in_tower(name: str, arch: str) -> bool:
    return name.startswith(TOWER[arch]) and not name.startswith(PROJECTOR[arch])


def _assert_same_logps(loaded: Any, policy: Any, processor: Any) -> None:
    """The reloaded export gives the trained policy's sequence log-probs on the same pairs."""
    batch = collate.Collator(processor).pairs(_examples())
    with torch.no_grad():
        torch.testing.assert_close(
            logprobs.policy_logprobs(loaded, batch).logps,
            logprobs.policy_logprobs(policy, batch).logps,
            rtol=1e-5,
            atol=1e-4,
        )


@pytest.mark.parametrize("name", [*VISION, "tiny-text"])
def test_a_frozen_vision_tower_gets_no_gradient_the_projector_and_language_model_do(name: str) -> None:
    model, processor = models.load_model(f"builtin://{name}")
    assert adapters.prepare(model, freeze_vision_tower=True, lora=None, seed=0, field="stages.dpo") is None
    model.train()
    batch = collate.Collator(processor).pairs(_examples(name == "tiny-text"))
    logprobs.policy_logprobs(model, batch).logps.sum().backward()
    grads = _with_grads(model)
    assert any(".language_model." in n or n.startswith("model.layers.") for n in grads)
    if name == "tiny-text":
        assert all(p.requires_grad for p in model.parameters())  # nothing to freeze
        return
    tower = [n for n, _ in model.named_parameters() if _in_tower(n, name)]
    assert tower and not any(p.requires_grad for n, p in model.named_parameters() if _in_tower(n, name))
    assert not grads & set(tower)
    assert any(n.startswith(PROJECTOR[name]) for n in grads)  # as MM-RLHF: the projector is trained

    unfrozen, _ = models.load_model(f"builtin://{name}")
    adapters.prepare(unfrozen, freeze_vision_tower=False, lora=None, seed=0, field="stages.dpo")
    logprobs.policy_logprobs(unfrozen, batch).logps.sum().backward()
    assert _with_grads(unfrozen) & set(tower)


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-llava-onevision"])
def test_under_lora_only_the_adapters_and_the_score_head_get_gradients(name: str) -> None:
    """Qwen2.5-VL's vision blocks have gate/up/down_proj and SigLIP q/k/v_proj: no adapter goes there."""
    base, processor = models.load_model(f"builtin://{name}")
    reward = models.RewardModel(base, seed=0)
    lora = adapters.prepare(
        reward.base, freeze_vision_tower=True, lora=Lora(r=4, alpha=8), seed=0, field="stages.reward"
    )
    assert lora is not None and lora.scaling == 2.0
    adapted = [n for n, m in reward.base.named_modules() if hasattr(m, "lora_A")]
    assert adapted and not any(_in_tower(n + ".", name) for n in adapted)
    assert all(".language_model." in n for n in adapted)
    reward.train()
    out = reward(collate.Collator(processor).reward(_examples(), critique=True))
    assert out.critique is not None
    (out.scores.sum() - out.critique.logps.sum()).backward()
    trainable = {n for n, p in reward.named_parameters() if p.requires_grad}
    lora_params = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    head = {n for n, _ in reward.named_parameters() if n.startswith("score_head.")}
    assert trainable == lora_params | head and len(head) == 4  # the score head in full
    assert head <= _with_grads(reward)
    assert {n for n in _with_grads(reward) if ".lora_B." in n}  # B starts at 0: A's first gradient is 0
    assert not any(p.grad is not None for n, p in reward.named_parameters() if n not in trainable)


def _perturb(model: torch.nn.Module) -> None:
    """As if trained: non-zero B, so the adapted model differs from the base model."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _adapted(
    name: str, export: Literal["merged", "adapter"] = "merged"
) -> tuple[Any, Any, adapters.Adapters]:
    model, processor = models.load_model(f"builtin://{name}")
    lora = adapters.prepare(
        model, freeze_vision_tower=True, lora=DpoLora(r=4, alpha=8, export=export), seed=0, field="stages.dpo"
    )
    assert lora is not None
    _perturb(model)
    return model, processor, lora


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava-onevision"])
def test_the_lora_reference_is_the_base_model_with_the_adapters_disabled(name: str) -> None:
    """dpo.Reference(model=policy, lora=...): log-probs equal to the untouched base model's, while the
    policy (adapters on, train mode) differs from them; the policy's mode is restored after."""
    policy, processor, lora = _adapted(name)
    base, _ = models.load_model(f"builtin://{name}")
    pairs = _examples()
    batch = collate.Collator(processor).pairs(pairs)
    wrapper = SequenceLogps(policy)
    wrapper.train()
    reference = Reference(model=wrapper, lora=lora)
    chosen, rejected = reference.logps([], batch)
    assert wrapper.training
    with torch.no_grad():
        expected = logprobs.policy_logprobs(base, batch).logps
        adapted = logprobs.policy_logprobs(policy, batch).logps
    assert torch.equal(torch.cat([chosen, rejected]), expected)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_merged_export_loads_with_transformers_and_computes_what_the_adapted_model_does(
    tmp_path: Path,
) -> None:
    import transformers

    policy, processor, lora = _adapted("tiny-qwen2-vl")
    state = adapters.merged({k: v.clone() for k, v in policy.state_dict().items()}, lora)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    models.save_model(policy, processor, tmp_path / "merged", state_dict=state)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    )
    _assert_same_logps(loaded, policy, processor)
    reference = lora.peft_model.merge_and_unload().state_dict()  # peft's own merge agrees
    assert set(reference) == set(state)
    assert all(torch.allclose(reference[k], state[k], atol=1e-6) for k in state)


def test_adapter_export_is_a_peft_folder_transformers_loads_over_the_base(tmp_path: Path) -> None:
    import transformers

    base, processor = models.load_model("builtin://tiny-qwen2-vl")
    models.save_model(base, processor, tmp_path / "base")
    policy, _, lora = _adapted("tiny-qwen2-vl", export="adapter")
    adapters.save_adapter(
        lora, tmp_path / "adapter", dict(policy.state_dict()), processor, base_model=str(tmp_path / "base")
    )
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "base", dtype=torch.float32)
    loaded.load_adapter(str(tmp_path / "adapter"))
    _assert_same_logps(loaded, policy, processor)


def test_adapters_start_the_same_for_a_seed_whatever_the_global_rng() -> None:
    def adapter_weights(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        model, _ = models.load_model("builtin://tiny-text")
        adapters.prepare(model, freeze_vision_tower=True, lora=Lora(r=2), seed=3, field="stages.dpo")
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, second = adapter_weights(0), adapter_weights(1)
    assert first and all(torch.equal(first[k], second[k]) for k in first)
    assert all(not v.any() for k, v in first.items() if ".lora_B." in k)  # B = 0: starts as the base


def test_a_target_module_that_matches_nothing_names_the_field_and_the_choices() -> None:
    model, _ = models.load_model("builtin://tiny-qwen2.5-vl")
    with pytest.raises(
        StageConfigError,
        match=r"stages\.dpo\.lora\.targetModules: no linear layer named "
        r"qkv .*this model's are: .*q_proj",
    ) as error:
        adapters.prepare(
            model,
            freeze_vision_tower=True,
            lora=Lora(target_modules=["q_proj", "qkv"]),
            seed=0,
            field="stages.dpo",
        )
    assert "qkv" not in str(error.value).split("are:")[1]  # qkv lives only in the frozen vision tower


def test_spec_defaults_freeze_the_vision_tower_and_merge_lora_exports() -> None:
    assert RewardStage().freeze_vision_tower and DpoStage().freeze_vision_tower
    assert RewardStage().lora is None and DpoStage().lora is None
    dpo = DpoStage.model_validate({"lora": {"r": 8, "targetModules": ["q_proj"]}})
    assert dpo.lora is not None and dpo.lora.export == "merged" and dpo.lora.alpha == 32.0
    with pytest.raises(ValueError, match="export"):
        RewardStage.model_validate({"lora": {"export": "adapter"}})  # the reward model is always merged
