"""One DPO optimizer step, TRL 1.16 `DPOTrainer` vs mmalign's DPO step: same model config, same pairs,
same precision, same optimizer (AdamW, same lr, grad-norm clip 1.0), one process, one device.

    python bench/dpo_vs_trl.py --model tiny --pairs 2 --tokens 64 --out bench/results/tiny.json     # CPU
    python bench/dpo_vs_trl.py --model 0.5b --pairs 8 --tokens 1024 --device cuda --out dpo.json   # GPU

Variants (`--variants`, all six by default):
  trl:ref-model        DPOTrainer with a frozen reference model (its default; one reference forward/step)
  trl:precomputed      DPOTrainer(precompute_ref_log_probs=True); TRL 1.16 refuses it for image data, the
                       refusal is recorded in the JSON instead of a timing
  mmalign:ref-model    stages/dpo.py with `reference: model` (a frozen copy scores every batch)
  mmalign:precomputed  stages/dpo.py's default: reference log-probs computed once before training
  mmalign:*:unshared   the same without prefix sharing (stages.dpo.prefixSharing: false): chosen and
                       rejected rows each run the whole prompt; without the suffix, one prompt pass per
                       pair (trainer/prefix.py, the stage's default)
  mmalign:*:packed     (not in the default six) prefix sharing + packing (stages.dpo.packing): several
                       pairs' sequences per row, no padding between them; against the suffix-less
                       variant it shows what packing buys. Meant with `--mixed` (pairs of very
                       different lengths: each pair's row target drawn log-uniformly in
                       [tokens/8, tokens], seeded), where short pairs share a row
  mmalign:ref-model:tower-twice  (by name only, with --freeze-vision) the reference runs its own vision
                       tower forward; without the suffix, it runs only its projector over the policy's
                       frozen tower output of the same batch (stages/dpo.py tower_handoff, the stage's way)
`--freeze-vision`: both sides freeze the same vision tower (adapters.prepare, stages.dpo's default
freezeVisionTower: true and the paper's setting: the projector and the language model trained);
without it (the default here) both train every weight.
The mmalign step is the stage's micro_batch_loss + train_step without DeepSpeed (TRL runs without it
too): SequenceLogps (vision once per pair, chunked LM head) -> losses.DpoLoss("mm-dpo", β) -> backward ->
clip -> AdamW. Collation is outside the timed step on both sides (the Trainer prefetches batches before
`on_step_begin`). Every step trains on the SAME pairs (TRL: sequential sampler over repeated rows).

Timing: `--rounds` rounds; each round builds every variant fresh (same seed, same weights), runs
`--warmup` untimed + `--steps` timed steps, and frees it; the variant order flips every round so slow
drift (another process on the machine) hits all variants alike. Reported: median s/step over all
timed steps, pairs/s, tokens/s (the pairs' unpadded tokens), MFU (bench/flops.py: the plain step's FLOPs
counted once by torch's FlopCounterMode, over the matmul peak measured in the run), ratio to each TRL
variant, peak memory of the lowest round (CUDA:
max_memory_allocated; CPU: peak RSS above the RSS before the variant was built, sampled every 10 ms, which
counts allocator caching too: only roughly comparable).
TRL is imported lazily inside `trl_steps`, so tests/unit/test_bench_dpo.py runs the mmalign side without it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench import flops
from bench.words import random_text
from mmalign.trainer import adapters, collate, losses, models, prefix, tiny
from mmalign.trainer.stages import dpo as dpo_stage
from mmalign.trainer.stages.dpo import SequenceLogps

VARIANTS = ("trl:ref-model", "trl:precomputed", "mmalign:ref-model", "mmalign:precomputed",
            "mmalign:ref-model:unshared", "mmalign:precomputed:unshared")
PACKED_VARIANTS = ("mmalign:ref-model:packed", "mmalign:precomputed:packed")  # asked for by name only
TOWER_VARIANTS = ("mmalign:ref-model:tower-twice",)  # by name only; with --freeze-vision


@dataclasses.dataclass
class BenchConfig:
    model: str = "tiny"  # tiny.SIZES preset: "tiny" (CPU tests) or "0.5b" (Qwen2-0.5B decoder widths)
    data: str = "image"  # "image": Qwen2-VL, one image per pair; "text": Qwen2 text model, no images
    pairs: int = 2  # pairs per optimizer step (micro-batch = step: no accumulation)
    tokens: int = 64  # target tokens per row (prompt incl. image tokens + response); response ~ half
    steps: int = 3  # timed steps per variant and round
    warmup: int = 1  # untimed steps per variant and round (allocator, autotuning, lazy init)
    rounds: int = 2
    device: str = "cpu"
    lr: float = 1e-6
    beta: float = 0.1
    seed: int = 0
    mixed: bool = False  # pairs of very different lengths: row target log-uniform in [tokens/8, tokens]
    image_side: int = 0  # image width = height in pixels; 0: the preset's (448 px = 256 tokens at 0.5b)
    freeze_vision: bool = False  # both sides: the vision tower frozen, its projector trained (adapters.py)

    @property
    def side(self) -> int:
        return self.image_side or tiny.SIZES[self.model].image

    @property
    def image_tokens(self) -> int:  # one per 2x2 merged patch
        return (self.side // tiny.SIZES[self.model].patch // 2) ** 2 if self.data == "image" else 0

    @property
    def uri(self) -> str:
        arch = "qwen2-vl" if self.data == "image" else "text"
        return f"builtin://tiny-{arch}" if self.model == "tiny" else f"builtin://random-{arch}-{self.model}"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        # bf16 autocast over float32 weights on GPU: what TRL's `bf16=True` does (accelerate autocast),
        # applied to both sides. CPU stays float32 (CPU bf16 autocast is not how anyone trains).
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ data


def make_examples(cfg: BenchConfig, processor: Any) -> list[collate.Example]:
    """`cfg.pairs` pairs of about `cfg.tokens` tokens per row: random words, noise images (seeded)."""
    from PIL import Image

    rng = random.Random(cfg.seed)
    tokenizer = getattr(processor, "tokenizer", processor)

    def text(count: int) -> str:
        return random_text(tokenizer, rng, count)

    side, image_tokens = cfg.side, cfg.image_tokens
    response = max(4, cfg.tokens // 2)
    prompt = max(4, cfg.tokens - response - image_tokens - 12)  # 12: chat markers and end of turn
    examples = []
    for _ in range(cfg.pairs):
        if cfg.mixed:  # this pair's row target, log-uniform in [tokens/8, tokens]
            target = int(cfg.tokens * 8 ** (rng.random() - 1))
            response = max(4, target // 2)
            prompt = max(4, target - response - image_tokens - 12)
        noise = bytes(rng.randrange(256) for _ in range(side * side * 3))
        images = [Image.frombytes("RGB", (side, side), noise)] if cfg.data == "image" else []
        examples.append(collate.Example(prompt=text(prompt), chosen=text(response), rejected=text(response),
                                        images=images))
    return examples


def trl_rows(examples: list[collate.Example], processor: Any) -> list[dict[str, Any]]:
    """The same pairs in TRL's standard (non-conversational) format, with mmalign's chat template
    already applied, so both sides see the same token sequences."""
    template = collate.Collator(processor).template  # the exact strings Collator.pairs tokenizes
    rows = []
    for e in examples:
        prompt, chosen = template.prompt_and_response(e, "chosen")
        row: dict[str, Any] = {"prompt": prompt, "chosen": chosen,
                               "rejected": template.prompt_and_response(e, "rejected")[1]}
        if e.images:
            row["images"] = e.images
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ measuring


def _sync(cfg: BenchConfig) -> None:
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def _release_memory(cfg: BenchConfig) -> None:
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next RSS baseline is low


@contextlib.contextmanager
def peak_memory(cfg: BenchConfig, out: dict[str, float]) -> Iterator[None]:
    """out["peak_gib"]: CUDA peak allocated, or CPU peak RSS above the RSS at entry (10 ms samples)."""
    _release_memory(cfg)
    if cfg.device == "cuda":
        yield
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return
    import psutil

    process, stop = psutil.Process(), threading.Event()
    baseline = peak = process.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["peak_gib"] = (max(peak, process.memory_info().rss) - baseline) / 2**30


def _load(cfg: BenchConfig) -> tuple[Any, Any]:  # (PreTrainedModel, processor)
    model, processor = models.load_model(cfg.uri, seed=cfg.seed)  # the builtin's HF folder: float32, eval mode
    return model.to(cfg.device), _sized(cfg, processor)


def _sized(cfg: BenchConfig, processor: Any) -> Any:
    """The processor with its image size set to `cfg.side` (Qwen2-VL's processor resizes every image to
    its pixel bounds, the builtins' to the preset's side), for both TRL and mmalign."""
    if cfg.data == "image" and cfg.image_side:
        pixels = cfg.side * cfg.side
        processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    return processor


# ------------------------------------------------------------------------------------ mmalign side


def _frozen_tower(cfg: BenchConfig, model: Any) -> Any:
    """`model` with its vision tower frozen as stages.dpo's freezeVisionTower does, under --freeze-vision."""
    adapters.prepare(model, freeze_vision_tower=cfg.freeze_vision, lora=None, seed=cfg.seed, field="bench")
    return model


def policy_and_batch(cfg: BenchConfig, prefix_sharing: bool = True,
                     packing: bool = False) -> tuple[Any, SequenceLogps, collate.Batch]:
    """The policy model (its tower frozen under --freeze-vision), its SequenceLogps and the step's pairs."""
    model, processor = _load(cfg)
    model = _frozen_tower(cfg, model)
    collator = collate.Collator(processor, max_length=4 * cfg.tokens, device=cfg.device)
    return model, SequenceLogps(model, prefix_sharing, packing), collator.pairs(make_examples(cfg, processor))


def mmalign_steps(cfg: BenchConfig, reference: str, steps: int, prefix_sharing: bool = True,
                  packing: bool = False, tower_handoff: bool = True) -> tuple[list[float], list[float]]:
    """(seconds per step, loss per step) of mmalign's DPO step; reference: "precomputed" | "model";
    `prefix_sharing`: stages.dpo.prefixSharing, `packing`: stages.dpo.packing (policy, reference model
    and pre-pass alike); `tower_handoff`: with a reference model and a frozen tower, the reference runs
    only its projector over the policy's tower output (stages/dpo.py tower_handoff, the stage's way)."""
    model, policy, batch = policy_and_batch(cfg, prefix_sharing, packing)
    loss_fn = losses.DpoLoss("mm-dpo", beta=cfg.beta)  # fixed β: the same loss TRL's "sigmoid" is
    frozen: SequenceLogps | None = None
    if reference == "precomputed":
        # stages/dpo.py precompute_reference: a no-grad pass of the (still untrained) model, stored; here
        # the policy itself, whose weights equal the reference's before the first step.
        with torch.no_grad(), cfg.autocast():
            table = policy(batch)[0].float()  # (2B,)
        reference_chosen, reference_rejected = batch.split(table)
    else:
        frozen = SequenceLogps(_load(cfg)[0].requires_grad_(False), prefix_sharing, packing)
        if tower_handoff and cfg.data == "image":
            handoff, _why = dpo_stage.tower_handoff(model, frozen.model)
            policy.handoff = frozen.handoff = handoff
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0, fused=True)  # as the stage's engine
    times, losses_seen = [], []
    for _ in range(steps):
        _sync(cfg)
        start = time.perf_counter()
        with cfg.autocast():
            policy_logps, _tokens = policy(batch)  # (2B,) each
            if frozen is not None:  # stages/dpo.py Reference.logps with a reference model
                with torch.no_grad():
                    reference_chosen, reference_rejected = batch.split(frozen(batch)[0].float())
        policy_chosen, policy_rejected = batch.split(policy_logps)
        inputs = losses.DpoInputs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                                  reference_chosen=reference_chosen, reference_rejected=reference_rejected)
        loss, _metrics = loss_fn(inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(cfg)
        times.append(time.perf_counter() - start)
        losses_seen.append(float(loss.detach()))
    return times, losses_seen


# ------------------------------------------------------------------------------------ TRL side


def trl_steps(cfg: BenchConfig, reference: str, steps: int) -> tuple[list[float], list[float]]:
    """(seconds per step, loss per step) of TRL's DPOTrainer.train(), timed by a callback from
    `on_step_begin` to `on_step_end` (forward, backward, clip, AdamW step, zero_grad)."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()

    model, processor = _load(cfg)
    model = _frozen_tower(cfg, model)  # the Trainer's optimizer takes the parameters that require grad
    rows = trl_rows(make_examples(cfg, processor), processor)
    times: list[float] = []
    losses_seen: list[float] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            _sync(cfg)
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            _sync(cfg)
            times.append(time.perf_counter() - self.start)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses_seen.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=cfg.pairs, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=1.0, beta=cfg.beta, loss_type=["sigmoid"],
            optim="adamw_torch_fused",  # transformers' default for torch >= 2.8, on CPU too
            bf16=cfg.device == "cuda", use_cpu=cfg.device == "cpu",
            gradient_checkpointing=False,  # TRL's default is True; mmalign's step has none here either
            precompute_ref_log_probs=reference == "precomputed", max_length=None,
            train_sampling_strategy="sequential",  # every step: the same `pairs` rows
            logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed,
        )
        # Without precompute, TRL would load a reference from the hub by name: hand it the same weights.
        ref_model = _load(cfg)[0] if reference == "model" else None
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=processor,
                             train_dataset=datasets.Dataset.from_list(rows * steps), callbacks=[Timer()])
        trainer.train()
        del trainer
    return times, losses_seen


# ------------------------------------------------------------------------------------ driver


def run_variant(cfg: BenchConfig, variant: str) -> dict[str, Any]:
    side, reference, *options = variant.split(":")
    reference = "model" if reference == "ref-model" else "precomputed"
    memory: dict[str, float] = {}
    with peak_memory(cfg, memory):
        if side == "trl":
            times, losses_seen = trl_steps(cfg, reference, cfg.warmup + cfg.steps)
        else:
            times, losses_seen = mmalign_steps(cfg, reference, cfg.warmup + cfg.steps,
                                               prefix_sharing="unshared" not in options,
                                               packing="packed" in options,
                                               tower_handoff="tower-twice" not in options)
    return {"times": times[cfg.warmup:], "losses": losses_seen, **memory}


def run_bench(cfg: BenchConfig, variants: list[str]) -> dict[str, Any]:
    if any(v.startswith("trl:") for v in variants):
        # imported before any memory baseline is taken, so no variant's peak counts the imports
        import datasets  # noqa: F401
        import trl  # noqa: F401
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None  # others' work skews timings
    # the plain step's FLOPs and the device's matmul peak, once, before any variant (bench/flops.py)
    counted, peak = flops.plain_step_flops(cfg), flops.matmul_peak(cfg.device)
    shape = batch_shape(cfg)
    results: dict[str, dict[str, Any]] = {v: {"times": [], "peaks_gib": []} for v in variants}
    for round_index in range(cfg.rounds):
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            if "skipped" in results[variant]:
                continue
            try:
                seen = run_variant(cfg, variant)
            except (ValueError, NotImplementedError) as error:  # TRL refusing a setup: no precompute for images
                if not variant.startswith("trl:"):
                    raise
                results[variant] = {"skipped": f"{type(error).__name__}: {error}"}
                continue
            row = results[variant]
            row["times"] += seen["times"]
            row["peaks_gib"].append(seen["peak_gib"])
            row.setdefault("first_losses", seen["losses"][:2])
            print(f"round {round_index} {variant:28s} s/step {[round(t, 3) for t in seen['times']]} "
                  f"peak {seen['peak_gib']:.2f} GiB", flush=True)
    for row in results.values():
        if row.get("times"):
            # the lowest round: the first round also pays one-time costs (lazy imports, caches)
            row["peak_gib"] = min(row["peaks_gib"])
            row["s_per_step"] = statistics.median(row["times"])
            row["pairs_per_s"] = cfg.pairs / row["s_per_step"]
            row["tokens_per_s"] = shape["real_tokens"] / row["s_per_step"]  # the pairs' unpadded tokens
    for variant, row in results.items():
        if "s_per_step" in row:
            work = flops.step_flops(counted, "model" if ":ref-model" in variant else "precomputed")
            row["step_tflops"] = work / 1e12
            row["mfu"] = work / (row["s_per_step"] * peak)
    for variant, row in results.items():
        unshared = results.get(f"{variant}:unshared", {})
        if "s_per_step" in row and "s_per_step" in unshared:  # what prefix sharing alone buys
            row["speedup_vs_unshared"] = unshared["s_per_step"] / row["s_per_step"]
            row["memory_vs_unshared"] = row["peak_gib"] / max(unshared["peak_gib"], 1e-9)
        twice = results.get(f"{variant}:tower-twice", {})
        if "s_per_step" in row and "s_per_step" in twice:  # what the reference's tower handoff buys
            row["speedup_vs_tower_twice"] = twice["s_per_step"] / row["s_per_step"]
        shared = results.get(variant.removesuffix(":packed"), {}) if variant.endswith(":packed") else {}
        if "s_per_step" in row and "s_per_step" in shared:  # what packing adds to prefix sharing
            row["speedup_vs_shared"] = shared["s_per_step"] / row["s_per_step"]
            row["memory_vs_shared"] = row["peak_gib"] / max(shared["peak_gib"], 1e-9)
        for baseline in ("trl:ref-model", "trl:precomputed"):
            if "s_per_step" in row and "s_per_step" in results.get(baseline, {}):
                row[f"speedup_vs_{baseline}"] = results[baseline]["s_per_step"] / row["s_per_step"]
                row[f"memory_vs_{baseline}"] = row["peak_gib"] / max(results[baseline]["peak_gib"], 1e-9)
    return {"config": dataclasses.asdict(cfg), "uri": cfg.uri, "batch": shape,
            "flops": {"plain_step": counted, "matmul_peak_tflops": peak / 1e12, "counted": "bench/flops.py"},
            "environment": {**_environment(cfg), "load_average_start": load_at_start,
                            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "variants": results}


def batch_shape(cfg: BenchConfig) -> dict[str, int]:
    """What one step trains on, as mmalign collates it (TRL's rows carry one more EOS token per response
    for text data)."""
    processor = _sized(cfg, tiny.build_processor("qwen2-vl" if cfg.data == "image" else "text", size=cfg.model))
    batch = collate.Collator(processor, max_length=4 * cfg.tokens).pairs(make_examples(cfg, processor))
    shared, packed = prefix.share(batch), prefix.share(batch, pack=True)
    # *_computed_tokens: what the language model runs over, padding included (rows x row width)
    return {"rows": batch.rows, "tokens_per_row": int(batch.input_ids.shape[1]),
            "response_tokens": int(batch.response_mask.sum()), "real_tokens": int(batch.attention_mask.sum()),
            "prefix_shared_tokens": int((shared.segment != prefix.PAD).sum()),
            "unshared_computed_tokens": int(batch.input_ids.numel()),
            "prefix_shared_computed_tokens": int(shared.input_ids.numel()),
            "packed_rows": packed.rows, "packed_computed_tokens": int(packed.input_ids.numel())}


def _environment(cfg: BenchConfig) -> dict[str, Any]:
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    device = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "device": device, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    parser.add_argument("--model", choices=sorted(tiny.SIZES), default=defaults.model)
    parser.add_argument("--data", choices=("image", "text"), default=defaults.data)
    for name in ("pairs", "tokens", "steps", "warmup", "rounds", "seed", "image_side"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--mixed", action="store_true", help="pairs of very different lengths (log-uniform "
                        "row targets in [tokens/8, tokens]): what packing is for")
    parser.add_argument("--freeze-vision", action="store_true", help="both sides: the vision tower frozen, "
                        "its projector trained (stages.dpo freezeVisionTower, the paper's setting)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " +
                        ", ".join(VARIANTS + PACKED_VARIANTS + TOWER_VARIANTS))
    parser.add_argument("--out", type=Path,
                        help="write the results as JSON here, and their PNG beside it (bench/dpo_plot.py)")
    options = vars(parser.parse_args(argv))
    variants, out = options.pop("variants").split(","), options.pop("out")
    known = VARIANTS + PACKED_VARIANTS + TOWER_VARIANTS
    unknown = sorted(set(variants) - set(known))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    cfg = BenchConfig(**options)
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference pre-pass bar
    report = run_bench(cfg, variants)
    summary = {v: {k: r[k] for k in r if k not in ("times",)} for v, r in report["variants"].items()}
    print(json.dumps(summary, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        from bench.dpo_plot import plot

        png = plot(report, out)
        print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
