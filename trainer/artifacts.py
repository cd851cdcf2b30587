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
from mmalign.trainer import storage, transfer
from mmalign.trainer.context import Context, say


def export_state(engine: Any) -> dict[str, torch.Tensor] | None:
    """The trained model's full weights on rank 0 (names without the wrapper's `model.` prefix); None
    elsewhere. A collective under ZeRO-3 (it gathers the shards): every rank must call it."""
    prefix = "model."
    state = engine.state_dict_for_export()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or None


def upload_model_folder(local: Path, uri: str) -> None:
    """Upload a saved model folder and mark it complete with `layout.COMPLETE` written last."""
    infos = transfer.upload_folder(local, uri)
    storage.write_json(storage.join(uri, layout.COMPLETE),
                       {"files": [{"name": i.relative, "size": i.size, "sha256": i.sha256} for i in infos]})


def is_complete_model(uri: str) -> bool:
    return storage.exists(storage.join(uri, layout.COMPLETE))


def finished_before(ctx: Context, out_uri: str) -> bool:
    """An earlier attempt exported this stage's model: a restarted gang has nothing to do."""
    if not is_complete_model(out_uri):
        return False
    if ctx.dist.is_rank_0:
        say(f"{ctx.stage}: {out_uri} is complete; nothing to do")
    return True


def write_metrics(ctx: Context, metrics: dict[str, Any]) -> str:
    """`<storage>/<stage>/metrics.json`: the stage's final metrics; returns its URI."""
    uri = ctx.stage_uri(layout.METRICS)
    storage.write_json(uri, {"stage": ctx.stage, "job": ctx.job_name, **metrics})
    return uri


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
