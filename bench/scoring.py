"""Critique scoring throughput: the score stage's batched generate+score (trainer/scoring.py) vs a naive
per-sample `model.generate` loop producing the same critiques, on the same pairs, in one process.

    python bench/scoring.py --model tiny --data image                     # CPU, ~1 min: bench/results/
    python bench/scoring.py --model 0.5b --data text --pairs 8 --new-tokens 32       # CPU, a few minutes
    python bench/scoring.py --model 0.5b --data image --pairs 32 --new-tokens 128 --device cuda   # GPU

Variants:
  naive  for each pair, for each of its two responses: `model.base.generate` on that one unpadded
         generation prompt (greedy, KV cache, the template's stop tokens), then one scoring forward of the
         pair's two (prompt, response, critique) rows: the loop one writes first.
  stage  `scoring.score_pairs(..., batch_size=B)`: what stages/score.py runs on a shard: length-sorted
         batches of B pairs, one decode loop per batch with finished rows leaving it, scores from the
         loop's own last forward where the score row is the same tokens (else a scoring forward).
Both run greedy in float32 (on CUDA too, TF32 off): the bench ASSERTS that the two produce the same
critique texts, and reports the largest score difference. Pairs have prompts and responses of varied
length (random known words, noise images), so length sorting has something to do; random-init models
rarely stop early, so most critiques run to `--new-tokens`.

Timing: `--rounds` rounds, the variant order flips every round; each variant scores all pairs once per
round (the model is loaded once, outside the timing). Reported per variant: median seconds over rounds,
spread (min, max), samples/s (responses scored per second) and tokens/s (critique tokens generated per
second; both variants generate the same tokens), and stage / naive speedups. Results: JSON (`--out`,
default bench/results/scoring-<model>-<data>-<device>.json) and a PNG bar chart beside it.

GPU (goal: stage >= 10x naive; prepared, not run yet): in the GPU session's one script, after the wheels
are installed as docs/benchmarks.md describes,

    python3 bench/scoring.py --model 0.5b --data image --pairs 32 --batch-size 16 --tokens 256 \
        --new-tokens 128 --rounds 2 --device cuda --out $OUT/scoring-0.5b-image-cuda.json

(the naive side is the long one: 64 sequential `generate` calls of 128 tokens, about a minute on an H100).
Figures: docs/benchmarks.md, "Critique scoring".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.words import random_text
from mmalign.trainer import collate, models, scoring, tiny
from mmalign.trainer.template import Example

VARIANTS = ("naive", "stage")
RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class BenchConfig:
    model: str = "tiny"  # tiny.SIZES preset: "tiny" or "0.5b" (Qwen2-0.5B decoder widths)
    data: str = "image"  # "image": Qwen2-VL, one image per pair; "text": the Qwen2 text model
    pairs: int = 8
    batch_size: int = 8  # pairs per stage batch (stages.score.batchSize)
    tokens: int = 48  # mean prompt + response tokens per row (each pair draws 0.5x..1.5x)
    new_tokens: int = 32  # stages.score.maxNewTokens
    rounds: int = 3
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0: torch's default (one per core)
    seed: int = 0

    @property
    def uri(self) -> str:
        arch = "qwen2-vl" if self.data == "image" else "text"
        return f"builtin://tiny-{arch}" if self.model == "tiny" else f"builtin://random-{arch}-{self.model}"


def make_examples(cfg: BenchConfig, processor: Any) -> list[Example]:
    """`cfg.pairs` pairs of varied length: random known words, a noise image per pair (seeded)."""
    from PIL import Image

    rng = random.Random(cfg.seed)
    tokenizer = getattr(processor, "tokenizer", processor)

    def text(count: int) -> str:
        return random_text(tokenizer, rng, count)

    side = tiny.SIZES[cfg.model].image
    examples = []
    for _ in range(cfg.pairs):
        tokens = max(8, int(cfg.tokens * rng.uniform(0.5, 1.5)))
        noise = bytes(rng.randrange(256) for _ in range(side * side * 3))
        images = [Image.frombytes("RGB", (side, side), noise)] if cfg.data == "image" else []
        examples.append(
            Example(
                prompt=text(tokens // 2),
                chosen=text(max(2, tokens // 4)),
                rejected=text(max(2, tokens // 2)),
                images=images,
            )
        )
    return examples


def _sync(cfg: BenchConfig) -> None:
    if cfg.device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ variants


@torch.no_grad()
def naive(
    model: models.RewardModel, collator: collate.Collator, examples: list[Example], cfg: BenchConfig
) -> dict[str, Any]:
    """Per response: generate alone, unpadded; per pair: one scoring forward."""
    texts: list[list[str]] = []  # per pair: (chosen, rejected)
    scores: list[float] = []  # chosen of every pair, then rejected of every pair
    tokens = 0
    chosen_scores, rejected_scores = [], []
    for example in examples:
        prompts = collator.generation([example])  # rows: chosen, rejected
        pair = []
        for row in range(2):
            keep = prompts.attention_mask[row].bool()
            inputs = {k: v[row : row + 1, keep] for k, v in prompts.text_inputs().items()}
            inputs.update(prompts.vision)
            out = model.base.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=cfg.new_tokens,
                eos_token_id=collator.end_of_turn_ids,
                pad_token_id=collator.template.pad_token_id,
                do_sample=False,
                use_cache=True,
            )
            new = out[0, inputs["input_ids"].shape[1] :]  # (new,)
            tokens += int(new.numel())
            pair.append(collator.tokenizer.decode(new, skip_special_tokens=True).strip())
        texts.append(pair)
        batch = collator.reward([example], critique=True, critiques=[(pair[0], pair[1])])
        chosen, rejected = model(batch).scores.float().cpu().tolist()
        chosen_scores.append(chosen)
        rejected_scores.append(rejected)
    scores = chosen_scores + rejected_scores
    return {"texts": texts, "scores": scores, "tokens": tokens}


@torch.no_grad()
def stage(
    model: models.RewardModel, collator: collate.Collator, examples: list[Example], cfg: BenchConfig
) -> dict[str, Any]:
    scored = scoring.score_pairs(
        model,
        collator,
        examples,
        critique=True,
        max_new_tokens=cfg.new_tokens,
        temperature=0.0,
        batch_size=cfg.batch_size,
    )
    return {
        "texts": [list(p) for p in zip(scored.chosen_critiques, scored.rejected_critiques, strict=True)],
        "scores": scored.chosen + scored.rejected,
        "fused_rows": scored.fused,
    }


RUNNERS = {"naive": naive, "stage": stage}


# ------------------------------------------------------------------------------------ driver


def run_bench(cfg: BenchConfig, variants: list[str] | None = None) -> dict[str, Any]:
    variants = variants or list(VARIANTS)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides: the texts must agree
        torch.backends.cudnn.allow_tf32 = False
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, processor = models.load_reward_model(cfg.uri, seed=cfg.seed)  # float32, eval mode
    model = model.to(cfg.device).eval()
    collator = collate.Collator(processor, max_length=4 * cfg.tokens + cfg.new_tokens + 64, device=cfg.device)
    head: Any = model.base.get_output_embeddings()  # type: ignore[operator]
    vocab = len(collator.tokenizer)
    with torch.no_grad():
        # The 0.5B presets pad the (tied) embedding to Qwen's 151,936 rows, past the ~600 tokens the tiny
        # tokenizer decodes: zero rows give logit 0 < the best real row's, so greedy writes decodable
        # tokens (text equality means something) while the LM head matmul keeps its real size.
        head.weight[vocab:] = 0
    examples = make_examples(cfg, processor)
    results: dict[str, dict[str, Any]] = {v: {"seconds": []} for v in variants}
    seen: dict[str, dict[str, Any]] = {}
    for round_index in range(cfg.rounds):
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            _sync(cfg)
            start = time.perf_counter()
            seen[variant] = RUNNERS[variant](model, collator, examples, cfg)
            _sync(cfg)
            results[variant]["seconds"].append(time.perf_counter() - start)
            print(f"round {round_index} {variant:6s} {results[variant]['seconds'][-1]:.3f} s", flush=True)
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "uri": cfg.uri}
    if "naive" in seen and "stage" in seen:
        differ = [
            i
            for i, (a, b) in enumerate(zip(seen["naive"]["texts"], seen["stage"]["texts"], strict=True))
            if a != b
        ]
        if differ:
            raise AssertionError(
                f"critiques differ between naive and stage for pairs {differ}: "
                f"{seen['naive']['texts'][differ[0]]} vs {seen['stage']['texts'][differ[0]]}"
            )
        report["critiques_equal"] = True
        report["max_score_difference"] = max(
            abs(a - b) for a, b in zip(seen["naive"]["scores"], seen["stage"]["scores"], strict=True)
        )
    tokens = seen["naive"]["tokens"] if "naive" in seen else None
    for variant, row in results.items():
        seconds = row["seconds"]
        row.update(
            median_s=statistics.median(seconds),
            min_s=min(seconds),
            max_s=max(seconds),
            samples_per_s=2 * cfg.pairs / statistics.median(seconds),
        )
        if tokens is not None:
            row["tokens_per_s"] = tokens / statistics.median(seconds)
        if "fused_rows" in seen[variant]:
            row["fused_rows"] = seen[variant]["fused_rows"]
    if "naive" in results and "stage" in results:
        naive_s, stage_s = results["naive"]["seconds"], results["stage"]["seconds"]
        results["stage"]["speedup"] = statistics.median(naive_s) / statistics.median(stage_s)
        # spread of the ratio: the same round's pair of timings (interleaved)
        per_round = [n / s for n, s in zip(naive_s, stage_s, strict=True)]
        results["stage"]["speedup_min"], results["stage"]["speedup_max"] = min(per_round), max(per_round)
    report.update(
        samples=2 * cfg.pairs,
        critique_tokens=tokens,
        variants=results,
        environment={
            **environment(cfg),
            "load_average_start": load_at_start,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    )
    return report


def environment(cfg: BenchConfig) -> dict[str, Any]:
    import transformers

    device = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    """A PNG bar chart of samples/s per variant (PIL only: no plotting library in the image)."""
    from PIL import Image, ImageDraw

    rows = [
        (name, row["samples_per_s"], row["min_s"], row["max_s"]) for name, row in report["variants"].items()
    ]
    width, height, margin = 520, 300, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    cfg = report["config"]
    title = f"critique scoring, {report['uri']} {cfg['device']}: samples/s"
    draw.text((10, 10), title, fill="black")
    top = max(rate for _, rate, _, _ in rows) or 1.0
    bar = (width - 2 * margin) // (2 * len(rows))
    for index, (name, rate, low, high) in enumerate(rows):
        x = margin + index * 2 * bar + bar // 2
        y = height - margin - int((height - 2 * margin - 20) * rate / top)
        draw.rectangle([x, y, x + bar, height - margin], fill=("#999999" if name == "naive" else "#2a6fdb"))
        samples = report["samples"]
        spread = f"{samples / high:.1f}-{samples / low:.1f}"  # samples/s of the slowest and fastest round
        draw.text((x, y - 14), f"{rate:.2f} ({spread})", fill="black")
        draw.text((x, height - margin + 6), name, fill="black")
    speedup = report["variants"].get("stage", {}).get("speedup")
    if speedup:
        draw.text(
            (10, 26),
            f"stage / naive: {speedup:.2f}x (median of {cfg['rounds']} interleaved rounds)",
            fill="black",
        )
    draw.line([margin, height - margin, width - margin, height - margin], fill="black")
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = BenchConfig()
    parser.add_argument("--model", choices=sorted(tiny.SIZES), default=defaults.model)
    parser.add_argument("--data", choices=("image", "text"), default=defaults.data)
    for name in ("pairs", "batch_size", "tokens", "new_tokens", "rounds", "threads", "seed"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(defaults, name)
        )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--out", type=Path, help="JSON path (the PNG goes beside it); default bench/results/")
    options = vars(parser.parse_args(argv))
    out = options.pop("out")
    cfg = BenchConfig(**options)
    out = out or RESULTS / f"scoring-{cfg.model}-{cfg.data}-{cfg.device}.json"
    report = run_bench(cfg)
    print(
        json.dumps(
            {v: {k: r[k] for k in r if k != "seconds"} for v, r in report["variants"].items()}, indent=1
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
