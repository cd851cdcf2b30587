"""A torchrun worker for tests/trainer/test_async_checkpoint.py: an async checkpoint whose background
write is held until the training that follows has changed every live tensor, then a resume from it.

    torchrun --standalone --nproc-per-node 2 tests/trainer/snapshot_probe.py OUT ZERO_STAGE

Per rank, on builtin://tiny-text under real DeepSpeed (gloo): 2 optimizer steps, `Checkpointer.save` with
async_upload at step 2 (the engine's snapshot; its `write()` waits for an event), 2 more steps, then the
event: the files of step 2 reach the disk only after steps 3-4 updated the weights and Adam's moments in
place. A second engine (the RNG scrambled first) restores that checkpoint and runs steps 3-4 again.
`OUT/rank-R.json`: the losses of both runs, the restored client state, what was on disk when save()
returned, and (rank 0) whether the final weights of both runs are equal.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import torch


class HeldWrites:
    """The engine as the Checkpointer sees it, with the snapshot's write held until `release` is set."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.release = threading.Event()
        self.nbytes = 0

    def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> Any:
        snapshot = self.engine.snapshot(folder, tag, client_state)
        self.nbytes = snapshot.nbytes
        release = self.release

        class Held:
            def write(self) -> None:
                release.wait()
                snapshot.write()

        return Held()

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        self.engine.save(folder, tag, client_state)

    def load(self, folder: str, tag: str) -> dict[str, Any]:
        return dict(self.engine.load(folder, tag))

    def load_resized(self, folder: str, tag: str) -> dict[str, Any]:
        return dict(self.engine.load_resized(folder, tag))


def main(out: str, zero_stage: int) -> None:
    from mmalign.api import runtime, stages
    from mmalign.trainer import checkpoint, engine, models

    torch.set_num_threads(1)
    dist = engine.init_distributed()
    deepspeed_spec = runtime.DeepSpeedSpec.model_validate({"zeroStage": zero_stage, "bf16": False})
    optim = stages.DpoStage.model_validate({"learningRate": 1e-2, "warmupRatio": 0.0, "microBatchSize": 2})
    placement = engine.training_placement(optim, deepspeed_spec, dist)
    root = Path(out)
    uri = (root / "checkpoints").as_uri() + "/"

    def build() -> Any:
        model, _ = models.load_model("builtin://tiny-text", placement=placement)
        trained = engine.Engine(model, optim, deepspeed_spec, dist, total_steps=100)
        trained.train()
        return trained

    def step(trained: Any) -> float:
        ids = torch.randint(0, 100, (2, 12))  # (B, T) from the global RNG: the checkpoint restores it
        loss = trained.model(input_ids=ids, labels=ids).loss
        trained.backward(loss)
        trained.step()
        return float(loss.detach())

    def checkpointer() -> checkpoint.Checkpointer:
        return checkpoint.Checkpointer(
            uri, dist, root / "scratch", every_steps=2, keep_last=1, async_upload=True
        )

    torch.manual_seed(dist.rank)
    first = build()
    losses = [step(first), step(first)]
    held = HeldWrites(first)
    saver = checkpointer()
    saver.save(held, 2, {"position": 6})
    tag_folder = root / "scratch" / "save" / f"rank-{dist.rank:05d}" / "step-00000002"
    on_disk = sorted(p.name for p in tag_folder.glob("*.pt"))  # save() returned: nothing written yet
    losses += [step(first), step(first)]  # steps 3-4 change the live tensors in place
    held.release.set()
    saver.finish()
    final_first = first.state_dict_for_export()

    torch.manual_seed(12345)  # restore must bring back the RNG of step 2
    second = build()
    state = checkpointer().restore(second)
    resumed = [step(second), step(second)]
    final_second = second.state_dict_for_export()
    same_weights = (
        all(torch.equal(final_first[k], final_second[k]) for k in final_first)
        and final_first.keys() == final_second.keys()
    )
    (root / f"rank-{dist.rank}.json").write_text(
        json.dumps(
            {
                "losses": losses,
                "resumed": resumed,
                "state": {k: state[k] for k in ("step", "position")},
                "on_disk_after_save": on_disk,
                "snapshot_bytes": held.nbytes,
                "same_final_weights": same_weights if dist.is_rank_0 else None,
            }
        )
    )
    engine.end_worker(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
