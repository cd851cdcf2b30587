"""A stage's outputs: the trained weights out of the engine, model folders marked complete, metrics.json.

A model folder counts as written only once its `layout.COMPLETE` file exists (uploaded last, with
every file's size and sha256), so a restarted stage whose output is complete does nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mmalign.api import layout
from mmalign.trainer import adapters, identity, storage, transfer
from mmalign.trainer.context import Context, say


def export_state(engine: Any, merge: adapters.Adapters | None = None) -> dict[str, torch.Tensor] | None:
    """The trained model's full weights on rank 0 (names without the wrapper's `model.` prefix); None
    elsewhere. A collective under ZeRO-3 (it gathers the shards): every rank must call it. `merge`: the
    model's LoRA adapters, folded into the base weights (plain Hugging Face names, adapters.merged)."""
    prefix = "model."
    state = engine.state_dict_for_export()
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if ours and merge is not None:
        ours = adapters.merged(ours, merge)
    return ours or None


def upload_model_folder(local: Path, uri: str, made_by: identity.Identity) -> None:
    """Upload a saved model folder and mark it complete with `layout.COMPLETE` written last: its files
    and the identity of what made it (identity.py)."""
    infos = transfer.upload_folder(local, uri)
    storage.write_json(storage.join(uri, layout.COMPLETE),
                       {"files": [{"name": i.relative, "size": i.size, "sha256": i.sha256} for i in infos],
                        "identity": made_by})


def is_complete_model(uri: str) -> bool:
    return storage.exists(storage.join(uri, layout.COMPLETE))


def finished_before(ctx: Context, out_uri: str, wanted: identity.Identity) -> bool:
    """An earlier attempt exported this stage's model FOR THE SAME identity: nothing to do. A complete
    model made by something else (another spec, other inputs) is recomputed: rank 0 says which fields
    changed and removes the old `_complete.json` (the folder never looks complete while it is rewritten;
    the stage's checkpoints of the old identity are dropped by loop.resume)."""
    complete = storage.join(out_uri, layout.COMPLETE)
    if not storage.exists(complete):
        return False
    diff = identity.changed(identity.recorded(complete), wanted)
    if not diff:
        if ctx.dist.is_rank_0:
            say(f"{ctx.stage}: {out_uri} is complete for the same inputs and parameters; nothing to do")
        return True
    ctx.dist.barrier()  # every rank has read the marker before rank 0 removes it
    if ctx.dist.is_rank_0:
        identity.not_reused(ctx, f"{out_uri} was made with other inputs or parameters (changed: "
                            f"{', '.join(diff)}); recomputing it")  # a log line and an Event
        storage.delete(complete)
    ctx.dist.barrier()
    return False


def write_metrics(ctx: Context, metrics: dict[str, Any]) -> str:
    """`<storage>/<stage>/metrics.json`: the stage's final metrics; returns its URI."""
    uri = ctx.stage_uri(layout.METRICS)
    storage.write_json(uri, {"stage": ctx.stage, "job": ctx.job_name, **metrics})
    return uri


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
