"""The FLOPs of one DPO step and the device's matmul peak, for bench/dpo_vs_trl.py's tokens/s and MFU.

How FLOPs are counted: `torch.utils.flop_counter.FlopCounterMode` (every matmul, convolution and
attention op the step dispatches, 2 FLOPs per multiply-add) over ONE plain step of the run's model and
pairs: mmalign's unshared path (`prefixSharing: false`: each row runs its whole prompt; one vision encode
per pair), policy forward + backward, frozen parts as the run freezes them. A live reference adds that
step's forward once more. So every variant of a run is credited with the same work for the same
objective (precomputed variants without the reference forward: it is not in their step), and a variant
that computes less (prefix sharing, packing, the tower handoff) shows it as a higher MFU, not as less
work. Not counted: elementwise ops, norms, softmax, the optimizer.

MFU = step FLOPs / (s per step × peak), with the peak MEASURED in the same run: the best of five dense
square matmuls (float32 on CPU, bf16 on CUDA), which is below a datasheet peak (an H100's 989 dense bf16
TFLOP/s) but what this machine's kernels reach.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def plain_step_flops(cfg: Any) -> dict[str, float]:
    """{"forward", "backward"}: FLOPs of the policy's forward and backward in one plain (unshared) step."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.dpo_vs_trl import policy_and_batch

    model, policy, batch = policy_and_batch(cfg, prefix_sharing=False)
    model.train()
    with FlopCounterMode(display=False) as forward, cfg.autocast():
        logps, _tokens = policy(batch)  # (2B,)
    with FlopCounterMode(display=False) as backward:
        logps.float().sum().backward()
    return {"forward": float(forward.get_total_flops()), "backward": float(backward.get_total_flops())}


def step_flops(counted: dict[str, float], reference: str) -> float:
    """One step's FLOPs for a variant: the policy's forward + backward, and a live reference's forward."""
    return counted["forward"] + counted["backward"] + (counted["forward"] if reference == "model" else 0.0)


def matmul_peak(device: str) -> float:
    """FLOP/s of the best of five dense square matmuls on `device` (float32 on CPU, bf16 on CUDA)."""
    cuda = device == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1536, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for attempt in range(6):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        if attempt:  # the first is a warm-up
            best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best
