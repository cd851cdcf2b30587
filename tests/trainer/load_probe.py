"""A torchrun worker for tests/trainer/test_loading.py: load one model folder the way the stages do, and
write what it cost this rank into `OUT/rank-R.json`.

    torchrun --standalone --nproc-per-node 2 tests/trainer/load_probe.py FOLDER OUT ZERO_STAGE BF16

It loads the policy (engine.training_placement) and then the frozen reference (engine.frozen_placement,
shard=True), as `stages.dpo` with `reference: model` does, and records this rank's peak anonymous memory
(RssAnon, sampled every 20 ms: the process's own copies), what it keeps after (RssAnon with the free heap
trimmed) and peak resident set (VmHWM: RssAnon plus the memory-mapped checkpoint pages, which the page
cache shares between the ranks of a node) during each load,
the elements of the parameters it holds, and a check that the weights are the saved ones.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _kept_anon() -> int:
    """RssAnon once the garbage is collected and glibc has handed its free heap back (malloc_trim): what
    the process still holds. Without the trim, memory a load freed stays in malloc's arenas for a while
    (one arena per thread), and a rank's "kept" bytes moved by ~200 MB between identical runs (CI)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status("RssAnon")


class PeakAnon:
    """The highest RssAnon seen while the block runs (a thread samples it)."""

    def __enter__(self) -> PeakAnon:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status("RssAnon"))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def main(folder: str, out: str, zero_stage: int, bf16: bool) -> None:
    from safetensors import safe_open

    from mmalign.trainer import engine, models

    torch.set_num_threads(1)
    dist = engine.init_distributed()
    deepspeed_spec = SimpleNamespace(zero_stage=zero_stage, bf16=bf16, offload_optimizer=False, config=None,
                                     gradient_checkpointing=False)
    optim = SimpleNamespace(micro_batch_size=1, gradient_accumulation=1, max_grad_norm=1.0)
    import deepspeed  # noqa: F401 - imported before the first measurement: its memory is not the model's
    import transformers

    transformers.AutoModelForCausalLM  # noqa: B018 - the lazy module imports its classes here
    record: dict[str, object] = {"rank": dist.rank, "world_size": dist.world_size,
                                 "baseline_anon": _kept_anon()}
    loaded = {}
    for name, placement in (("policy", engine.training_placement(optim, deepspeed_spec, dist)),
                            ("reference", engine.frozen_placement(deepspeed_spec, dist, shard=True))):
        dist.barrier()
        started, before = time.monotonic(), _status("RssAnon")
        with PeakAnon() as anon:
            model, _ = models.load_model(folder, placement=placement)
        dist.barrier()
        parameters = list(model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in parameters)
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in parameters)
        record[name] = {"seconds": round(time.monotonic() - started, 1), "anon_before": before,
                        "peak_anon": anon.peak, "anon_after": _kept_anon(),
                        "vm_hwm": _status("VmHWM"), "held_elements": held, "elements": full,
                        "dtypes": sorted({str(p.dtype) for p in parameters}),
                        "partitioned": all(hasattr(p, "ds_tensor") for p in parameters)}
        loaded[name] = model
    # the partitions hold the saved weights: gather two tensors and compare with the files
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
    checks = {}
    for model in loaded.values():
        named = dict(model.named_parameters())
        for key in ("model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
            parameter = named[key]
            with safe_open(str(Path(folder) / index[key]), framework="pt") as f:
                saved = f.get_tensor(key)
            if hasattr(parameter, "ds_tensor"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([parameter]):
                    checks[key] = bool(torch.equal(parameter.data.to(saved.dtype), saved))
            else:
                checks[key] = bool(torch.equal(parameter.data.to(saved.dtype), saved))
    record["weights_match"] = checks
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank-{dist.rank}.json").write_text(json.dumps(record, indent=1))
    engine.end_worker(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
