"""Tiny models of every architecture: one-pass chosen/rejected batches with images processed once,
chunked log-probs equal to a naive full-logits computation, the reward model, loading and saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import builtin, collate, engine, logprobs, models, tiny

ARCHITECTURES = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-text")
CPU = torch.device("cpu")


def _examples(text_only: bool) -> list[collate.Example]:
    red, blue = Image.new("RGB", (48, 40), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 60, 220))
    return [
        collate.Example("What colour is the image?", "The image is red.", "It is blue, I think.",
                        [] if text_only else [red], "Correct.", "Wrong: it is red."),
        collate.Example("Describe the image.", "Blue.", "The whole image is filled with a green colour.",
                        [] if text_only else [blue], "Right colour.", "Wrong colour."),
    ]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_model(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    model, processor = models.load_model(f"builtin://{request.param}")
    return request.param, model, processor


def _vision_module(model: Any) -> torch.nn.Module | None:
    backbone = model.model
    return getattr(backbone, "visual", None) or getattr(backbone, "vision_tower", None)


def test_pairs_in_one_pass_match_a_naive_forward_values_and_gradients(tiny_model: tuple[str, Any, Any]) -> None:
    name, model, processor = tiny_model
    batch = collate.Collator(processor).pairs(_examples(name == "tiny-text"))
    assert batch.rows == 4 and batch.pairs == 2  # [chosen_0, chosen_1, rejected_0, rejected_1]
    model.train()

    model.zero_grad()
    chunked = logprobs.policy_logprobs(model, batch, chunk_size=3)  # several chunks per row
    chunked.logps.sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logits = model(**batch.model_inputs()).logits  # HF path: pixels duplicated, full logits
    naive = logprobs.naive_sequence_logprobs(logits, batch.input_ids, batch.response_mask)
    naive.sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(chunked.logps.double(), naive, rtol=1e-5, atol=1e-4)
    assert set(fast_grads) == set(naive_grads)
    for parameter in fast_grads:
        scale = float(naive_grads[parameter].abs().max())  # float32 summation-order noise scales with it
        torch.testing.assert_close(fast_grads[parameter], naive_grads[parameter], rtol=1e-4,
                                   atol=max(1e-6, 1e-5 * scale))
    if name != "tiny-text":
        assert any("visual" in n or "vision_tower" in n for n in fast_grads)  # gradients reach the vision tower
    assert chunked.tokens.tolist() == batch.response_mask[:, 1:].sum(1).tolist()


@pytest.mark.parametrize("name", ARCHITECTURES[:3])
def test_images_go_through_the_vision_tower_once_per_pair(name: str) -> None:
    model, processor = models.load_model(f"builtin://{name}")
    vision = _vision_module(model)
    assert vision is not None
    batch = collate.Collator(processor).pairs(_examples(False))
    seen: list[int] = []
    handle = vision.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        int((args[0] if args else kwargs["pixel_values"]).shape[0])), with_kwargs=True)
    try:
        logprobs.forward_hidden(model, batch)
        once = list(seen)
        seen.clear()
        model(**batch.model_inputs())  # the TRL-style path: every row's pixels
        twice = list(seen)
    finally:
        handle.remove()
    assert len(once) == 1 and len(twice) == 1
    assert twice[0] == 2 * once[0]


def test_the_lm_head_never_sees_more_than_one_chunk(tiny_model: tuple[str, Any, Any]) -> None:
    name, model, processor = tiny_model
    batch = collate.Collator(processor).pairs(_examples(name == "tiny-text"))
    shapes: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        out = logprobs.policy_logprobs(model, batch, chunk_size=5)
        forward = len(shapes)
        out.logps.sum().backward()  # backward recomputes the chunks (checkpoint) but the last, 5 rows each
    finally:
        handle.remove()
    vocabulary = head.weight.shape[0]
    scored = int(batch.response_mask[:, 1:].sum())
    assert all(shape[0] <= 5 and shape[-1] == vocabulary and len(shape) == 2 for shape in shapes)
    assert sum(shape[0] for shape in shapes[:forward]) == scored  # scored positions only
    assert shapes[forward:] == shapes[: forward - 1][::-1]  # recomputed in backward, the last chunk kept


@pytest.mark.parametrize("name", ARCHITECTURES[:3])
def test_mixed_batches_of_image_and_text_rows(name: str) -> None:
    model, processor = models.load_model(f"builtin://{name}")
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    examples = [collate.Example("One image.", "a", "b", [image]), collate.Example("No image.", "c", "d", []),
                collate.Example("Two frames.", "e", "f", [image, image])]
    batch = collate.Collator(processor).pairs(examples)
    with torch.no_grad():
        fast = logprobs.policy_logprobs(model, batch).logps.double()
        naive = logprobs.naive_sequence_logprobs(model(**batch.model_inputs()).logits, batch.input_ids,
                                                 batch.response_mask)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-4)


def test_response_mask_covers_exactly_the_response(tiny_model: tuple[str, Any, Any]) -> None:
    name, _, processor = tiny_model
    examples = _examples(name == "tiny-text")
    batch = collate.Collator(processor).pairs(examples)
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [e.chosen for e in examples] + [e.rejected for e in examples]
    for row, text in enumerate(texts):
        response = batch.input_ids[row][batch.response_mask[row]]
        assert tokenizer.decode(response) == text + "<|im_end|>"
        assert batch.attention_mask[row].sum() == batch.response_mask[row].nonzero().max() + 1  # right padding
    if batch.mm_token_type_ids is not None:  # Qwen: image tokens typed 1, nothing else
        image_token = tokenizer.convert_tokens_to_ids(tiny.QWEN_IMAGE)
        assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == image_token)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_models_are_deterministic_per_seed(name: str) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    first = tiny.build_tiny(name.removeprefix("tiny-"))[0].state_dict()
    torch.manual_seed(456)
    second = tiny.build_tiny(name.removeprefix("tiny-"), seed=0)[0].state_dict()
    other = tiny.build_tiny(name.removeprefix("tiny-"), seed=1)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].numel() > 1)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builtin_models_are_save_pretrained_folders_loaded_like_a_users(name: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """builtin:// is a Hugging Face folder in the cache (config, safetensors, tokenizer/processor files,
    the chat template), written once, read by the same from_pretrained as a user's folder: the same
    weights as the in-memory build, and `?seed=` (else the job's seed) picks other weights."""
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    folder = builtin.model_folder(f"builtin://{name}")
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    if name != "tiny-text":
        assert (folder / "processor_config.json").exists()
    built, _ = tiny.build_tiny(name.removeprefix("tiny-"))
    loaded, processor = models.load_model(f"builtin://{name}")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    expected = built.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert processor.chat_template == tiny.CHAT_TEMPLATES[name.removeprefix("tiny-")]
    assert models.model_dir(f"builtin://{name}") == folder  # written once: the second load reuses it
    assert builtin.model_folder(f"builtin://{name}?seed=1") != builtin.model_folder(f"builtin://{name}", seed=2)
    assert builtin.model_folder(f"builtin://{name}", seed=1) == builtin.model_folder(f"builtin://{name}?seed=1")
    bf16, _ = models.load_model(f"builtin://{name}", placement=engine.Placement(torch.bfloat16, None, CPU))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # the job's precision, from the start
    assert all(torch.equal(v, expected[k].to(torch.bfloat16)) for k, v in bf16.state_dict().items())


def test_placements_follow_the_job() -> None:
    """bf16 jobs load bf16; ZeRO-3 loads into partitions (the engine's own config) where the model will be
    partitioned; whole models on a GPU load straight onto it."""
    from types import SimpleNamespace

    def spec(zero_stage: int, bf16: bool) -> Any:
        return SimpleNamespace(zero_stage=zero_stage, bf16=bf16, offload_optimizer=False, config=None)

    optim = SimpleNamespace(micro_batch_size=2, gradient_accumulation=1, max_grad_norm=1.0)
    two_gpus = engine.Distributed(0, 2, 0, 2, torch.device("cuda", 0))
    two_cpus = engine.Distributed(0, 2, 0, 2, CPU)
    trained = engine.training_placement(optim, spec(3, True), two_gpus)
    assert trained.dtype == torch.bfloat16 and trained.device is None and trained.zero3 is not None
    assert trained.zero3 == engine.deepspeed_config(optim, spec(3, True), 2)
    assert engine.training_placement(optim, spec(2, True), two_gpus) == engine.Placement(
        torch.bfloat16, None, torch.device("cuda", 0))
    assert engine.training_placement(optim, spec(2, False), two_cpus) == engine.Placement()
    assert engine.frozen_placement(spec(3, False), two_cpus, shard=True).zero3 == {
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    assert engine.frozen_placement(spec(3, True), two_gpus, shard=False) == engine.Placement(
        torch.bfloat16, None, torch.device("cuda", 0))  # a replica: whole, on its GPU
    one_rank = engine.Distributed(0, 1, 0, 1, CPU)
    assert engine.frozen_placement(spec(3, False), one_rank, shard=True) == engine.Placement()  # frozen() keeps it whole


def test_reward_model_scores_critiques_saves_and_reloads(tiny_model: tuple[str, Any, Any], tmp_path: Path) -> None:
    name, base, processor = tiny_model
    reward = models.RewardModel(base, seed=0)
    examples = _examples(name == "tiny-text")
    collator = collate.Collator(processor)
    batch = collator.reward(examples, critique=True)
    out = reward(batch)
    assert out.scores.shape == (4,) and out.critique is not None
    tokenizer = getattr(processor, "tokenizer", processor)
    assert tokenizer.decode(batch.input_ids[0][batch.critique_mask[0]]) == "Correct.<|im_end|>"
    # the score reads the last real token: padding after it changes nothing
    alone = reward(collator.reward(examples[:1], critique=True)).scores
    torch.testing.assert_close(alone, out.scores[[0, 2]], rtol=1e-4, atol=1e-5)
    (out.scores.sum() - out.critique.logps.sum()).backward()
    assert reward.score_head.dense.weight.grad is not None

    reward.save(tmp_path / "rm", processor)
    assert models.reward_info_critique(str(tmp_path / "rm")) is None  # no info file written yet
    models.write_reward_info(tmp_path / "rm", critique=False, base_model=f"builtin://{name}")
    assert models.reward_info_critique(str(tmp_path / "rm")) is False
    reloaded, processor2 = models.load_reward_model(str(tmp_path / "rm"))
    again = reloaded(collate.Collator(processor2).reward(examples, critique=True))
    torch.testing.assert_close(again.scores, out.scores)
    torch.testing.assert_close(again.critique.logps, out.critique.logps)  # type: ignore[union-attr]



def test_a_collator_loads_pairs_once_bound_and_splits_chosen_from_rejected(tmp_path: Path) -> None:
    """One Collator per stage: PreferencePairs (media loaded by its loader) give the same tokens as the
    ready Examples; `Batch.split` gives the chosen rows [:B] and the rejected rows [B:]."""
    from mmalign.trainer import data, media

    _, processor = models.load_model("builtin://tiny-qwen2-vl")
    examples = _examples(False)
    pairs = []
    for i, example in enumerate(examples):
        example.images[0].save(tmp_path / f"{i}.png")
        pairs.append(data.PreferencePair(
            id=str(i), uid=f"x:{i}", query_id=str(i), category="c", prompt=example.prompt, chosen=example.chosen,
            rejected=example.rejected, chosen_critique=example.chosen_critique,
            rejected_critique=example.rejected_critique, media=[f"{i}.png"], media_kind="image",
            media_base=str(tmp_path)))
    collator = collate.Collator(processor, media.MediaLoader(), max_length=256)
    for kind in ("pairs", "reward", "generation"):
        from_pairs, from_examples = getattr(collator, kind)(pairs), getattr(collator, kind)(examples)
        assert torch.equal(from_pairs.input_ids, from_examples.input_ids), kind
        assert torch.equal(from_pairs.vision["pixel_values"], from_examples.vision["pixel_values"]), kind
    batch = collator.pairs(pairs)
    chosen, rejected = batch.split(torch.arange(4))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]
    assert batch.split(["c0", "c1", "r0", "r1"]) == (["c0", "c1"], ["r0", "r1"])
    with pytest.raises(ValueError, match="expected 4"):
        batch.split(torch.arange(3))
    with pytest.raises(ValueError, match="media loader"):
        collate.Collator(processor).pairs(pairs)


def test_saved_builtin_policy_reloads_from_its_folder(tmp_path: Path) -> None:
    model, processor = models.load_model("builtin://tiny-qwen2-vl")
    models.save_model(model, processor, tmp_path / "policy")
    again, processor2 = models.load_model(f"file://{tmp_path / 'policy'}")
    batch = collate.Collator(processor2).pairs(_examples(False))
    with torch.no_grad():
        torch.testing.assert_close(logprobs.policy_logprobs(again, batch).logps,
                                   logprobs.policy_logprobs(model, batch).logps)


def test_s3_models_download_once_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = models.load_model("builtin://tiny-text")
    models.save_model(model, processor, tmp_path / "source")
    calls: list[str] = []

    def fake_download(uri: str, folder: str) -> list[Path]:
        calls.append(uri)
        import shutil

        shutil.copytree(tmp_path / "source", folder, dirs_exist_ok=True)
        return []

    monkeypatch.setattr(models.transfer, "download_prefix", fake_download)
    first = models.model_dir("s3://bucket/models/tiny", cache_dir=tmp_path / "cache")
    second = models.model_dir("s3://bucket/models/tiny", cache_dir=tmp_path / "cache")
    assert first == second and (first / "config.json").exists()
    assert calls == ["s3://bucket/models/tiny/"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.model_dir(str(tmp_path))
