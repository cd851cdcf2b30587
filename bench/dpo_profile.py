"""Where mmalign's DPO step spends its time: bench/dpo_vs_trl.py's mmalign step, timed per phase
(policy forward, reference forward, backward, optimizer) and per component inside each (vision tower,
projector, decoder layers, LM head), policy and reference apart.

    python -m bench.dpo_profile --model 0.5b --data image --pairs 1 --tokens 300 --reference model
    python -m bench.dpo_profile --model 0.5b --pairs 1 --tokens 300 --reference model --freeze-vision
    python -m bench.dpo_profile --model 0.5b --layers 4 --vision-layers 2 ...   # a cut 0.5B (< 3 GiB)

How: module hooks with wall clocks, which are exact on CPU (every op runs synchronously; on CUDA the
numbers are launch times, so this is CPU-only). Forward: pre/post forward hooks. Backward: full backward
pre/post hooks on the vision blocks, the merger and the decoder layers; the LM head's backward (its
chunks' logits recomputed, torch.utils.checkpoint, then their gradients) and the loss are the time
from the start of backward to the first decoder layer's backward. "other" is each phase's remainder:
masks, mRoPE positions, norms, the embedding, copies. Steps after `--warmup` are averaged.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench import dpo_vs_trl as bench
from mmalign.trainer import collate, losses, tiny
from mmalign.trainer.stages import dpo as dpo_stage
from mmalign.trainer.stages.dpo import SequenceLogps

# module name (HF Qwen2-VL / Qwen2 causal LM, transformers 5.23) -> component
COMPONENTS = (
    (re.compile(r"model\.visual\.(patch_embed|blocks\.\d+)"), "vision tower"),
    (re.compile(r"model\.visual\.merger"), "projector"),
    (re.compile(r"model\.(language_model\.)?layers\.\d+"), "decoder layers"),
    (re.compile(r"lm_head"), "LM head"),
)
BACKWARD_HOOKED = ("vision tower", "projector", "decoder layers")


class Clock:
    """Seconds per (phase, component), summed over the steps the driver counts."""

    def __init__(self, cpu: bool = False) -> None:
        # cpu: seconds of CPU this process used (all its threads), not wall time: on a machine others
        # share, the split stays meaningful while the wall clock counts their work too
        self.now = time.process_time if cpu else time.perf_counter
        self.phase = ""
        self.totals: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.started: dict[int, float] = {}
        self.first_decoder_backward: float | None = None

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        self.phase, start = phase, self.now()
        yield
        self.totals[(phase, "total")] += self.now() - start
        self.phase = ""

    def hook(self, model: torch.nn.Module, owner: str) -> None:
        """Time every component module of `model` ("policy" or "reference": its phases' prefix)."""
        for name, module in model.named_modules():
            component = next((c for pattern, c in COMPONENTS if pattern.fullmatch(name)), None)
            if component is None:
                continue
            module.register_forward_pre_hook(self._start(id(module)))
            module.register_forward_hook(self._stop(id(module), component))
            if owner == "policy" and component in BACKWARD_HOOKED:
                module.register_full_backward_pre_hook(self._start(id(module), backward=component))
                module.register_full_backward_hook(self._stop(id(module), component))

    def _start(self, key: int, backward: str | None = None) -> Callable[..., None]:
        def start(*_: Any) -> None:
            now = self.now()
            if backward == "decoder layers" and self.first_decoder_backward is None:
                self.first_decoder_backward = now
            self.started[key] = now

        return start

    def _stop(self, key: int, component: str) -> Callable[..., None]:
        def stop(*_: Any) -> None:
            if key in self.started and self.phase:
                self.totals[(self.phase, component)] += self.now() - self.started.pop(key)

        return stop


def profile(
    cfg: bench.BenchConfig,
    reference: str,
    steps: int,
    warmup: int,
    tower_handoff: bool = True,
    cpu: bool = False,
) -> dict[str, Any]:
    """bench.mmalign_steps' step (prefix sharing on), timed by a Clock: {phase: {component: s/step}}
    (`cpu`: CPU seconds of this process instead of wall seconds)."""
    model, processor = bench._load(cfg)
    model = bench._frozen_tower(cfg, model)
    policy = SequenceLogps(model, prefix_sharing=True)
    batch = collate.Collator(processor, max_length=4 * cfg.tokens).pairs(bench.make_examples(cfg, processor))
    loss_fn = losses.DpoLoss("mm-dpo", beta=cfg.beta)
    clock = Clock(cpu)
    frozen = None
    if reference == "precomputed":
        with torch.no_grad():
            reference_chosen, reference_rejected = batch.split(policy(batch)[0].float())
    else:
        frozen = SequenceLogps(bench._load(cfg)[0].requires_grad_(False), prefix_sharing=True)
        if tower_handoff and cfg.data == "image":
            policy.handoff = frozen.handoff = dpo_stage.tower_handoff(model, frozen.model)[0]
        clock.hook(frozen.model, "reference")
    clock.hook(model, "policy")
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0, fused=True)
    seconds = []
    for step in range(warmup + steps):
        if step == warmup:
            clock.totals.clear()
        start = clock.now()
        with clock.timing("policy forward"):
            policy_logps, _tokens = policy(batch)  # (2B,)
        if frozen is not None:
            with clock.timing("reference forward"), torch.no_grad():
                reference_chosen, reference_rejected = batch.split(frozen(batch)[0].float())
        policy_chosen, policy_rejected = batch.split(policy_logps)
        loss, _metrics = loss_fn(
            losses.DpoInputs(
                policy_chosen=policy_chosen,
                policy_rejected=policy_rejected,
                reference_chosen=reference_chosen,
                reference_rejected=reference_rejected,
            )
        )
        clock.first_decoder_backward = None
        backward_start = clock.now()
        with clock.timing("backward"):
            loss.backward()  # type: ignore[no-untyped-call]
        if step >= warmup and clock.first_decoder_backward is not None:
            clock.totals[("backward", "LM head + loss")] += clock.first_decoder_backward - backward_start
        with clock.timing("optimizer"):
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds.append(clock.now() - start)
    phases: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (phase, component), total in sorted(clock.totals.items()):
        phases[phase][component] = round(total / steps, 3)
    for parts in phases.values():
        parts["other"] = round(parts["total"] - sum(v for k, v in parts.items() if k != "total"), 3)
    return {
        "s_per_step": round(sum(seconds) / len(seconds), 3),
        "phases": dict(phases),
        "trained_parameters": sum(p.numel() for p in trained),
        "handoff": bool(frozen is not None and frozen.handoff is not None),
    }


def _in_memory(architecture: str, size: str) -> Callable[[bench.BenchConfig], tuple[Any, Any]]:
    def load(cfg: bench.BenchConfig) -> tuple[Any, Any]:
        model, processor = tiny.build_tiny(architecture, seed=cfg.seed, size=size)
        return model.to(cfg.device), bench._sized(cfg, processor)

    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(tiny.SIZES), default="0.5b")
    parser.add_argument("--data", choices=("image", "text"), default="image")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reference", choices=("model", "precomputed"), default="model")
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--tower-twice", action="store_true", help="no tower handoff to the reference")
    parser.add_argument("--layers", type=int, help="cut the preset's decoder to this many layers")
    parser.add_argument("--vision-layers", type=int, help="cut the preset's vision tower to this many blocks")
    parser.add_argument("--vocab", type=int, help="cut the preset's vocabulary (the LM head and embedding)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU seconds of this process (all threads), "
        "not wall seconds: on a machine shared with other work",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    size = args.model
    if args.layers or args.vision_layers or args.vocab:  # a custom preset: the same widths and image
        preset = tiny.SIZES[args.model]
        size = f"{args.model}-cut"
        tiny.SIZES[size] = dataclasses.replace(
            preset,
            layers=args.layers or preset.layers,
            vision_layers=args.vision_layers or preset.vision_layers,
            vocab=args.vocab or preset.vocab,
        )
    cfg = bench.BenchConfig(
        model=size, data=args.data, pairs=args.pairs, tokens=args.tokens, freeze_vision=args.freeze_vision
    )
    if size != args.model:  # no builtin:// name for it: the bench's loader builds it in memory instead
        bench._load = _in_memory("qwen2-vl" if args.data == "image" else "text", size)  # type: ignore[assignment]
    report = {
        "config": {
            **dataclasses.asdict(cfg),
            "reference": args.reference,
            "tower_twice": args.tower_twice,
            "clock": "cpu" if args.cpu_time else "wall",
            "layers": tiny.SIZES[size].layers,
            "vocab": tiny.SIZES[size].vocab,
            "vision_layers": tiny.SIZES[size].vision_layers,
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **profile(
            cfg,
            args.reference,
            args.steps,
            args.warmup,
            tower_handoff=not args.tower_twice,
            cpu=args.cpu_time,
        ),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
