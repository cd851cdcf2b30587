"""Checkpoints in object storage, and exact resume.

Protocol (one stage's prefix `P = spec.checkpoint_uri(stage)`, e.g. s3://bucket/job/dpo/checkpoints/;
the names are mmalign.api.layout's):

    P/step-00000010/<DeepSpeed shard files>     every rank uploads the files IT wrote
    P/step-00000010/rng-rank-00001.pt           every rank's RNG state (torch, python, cuda)
    P/step-00000010/_done/rank-00001.json       "rank 1 finished": its files, sizes, sha256, run nonce
    P/latest                                    the marker, written LAST by rank 0

1. `save(step, last=...)` (all ranks, after every optimizer step): the checkpointer owns the schedule
   and does nothing unless a save is due (every `everySteps` steps, and at the last step). When it is,
   DeepSpeed writes this rank's shards to a node-local folder; then the rank uploads them (parallel
   multipart, checksums verified, transfer.upload_file) and writes its `_done/rank-N.json`. With `async_upload` the upload runs in a background thread, joined before the
   next save and at `finish()`; training goes on meanwhile.
2. Rank 0 waits until every rank's `_done` object of THIS run (nonce) exists, then writes `latest`
   (step, tag, files with sizes and sha256, world size) and deletes all but the newest `keep_last`
   checkpoints. A failed or partial upload never writes `latest`; the previous checkpoint stays the
   one a restart resumes from, and the error surfaces as StorageError at the next join.
3. `restore()` (all ranks): read `latest`; one rank per node downloads the checkpoint into a node-local
   folder, verifying each file's sha256 from the marker; every rank loads model, optimizer, scheduler
   and its RNG state; the returned client state holds the step (and whatever the stage saved, e.g.
   the data position), so training continues at the same step with the same data order.

The nonce: a restarted gang may rewrite a step that an earlier, failed attempt partly wrote; rank 0
only accepts `_done` objects that carry the nonce of the current run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmalign.api import layout
from mmalign.api.exit_codes import ExitCode

from . import storage, transfer
from .context import scratch_root
from .engine import Distributed

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(layout.CHECKPOINT_TAG_PATTERN)


class CheckpointMismatch(Exception):
    """The latest checkpoint cannot be loaded by this gang (another world size): permanent."""

    exit_code = ExitCode.CONFIG_ERROR


class SavesShards(Protocol):
    """What the checkpointer needs from an engine (engine.Engine has it)."""

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None: ...

    def load(self, folder: str, tag: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    tag: str
    uri: str  # the step's prefix


class Checkpointer:
    """Saves and restores one stage's checkpoints under `uri` (see the module docstring)."""

    def __init__(self, uri: str, dist: Distributed, local_root: Path, every_steps: int, keep_last: int,
                 async_upload: bool, commit_timeout_seconds: float | None = None) -> None:
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.dist = dist
        self.local_root = Path(local_root)
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.async_upload = async_upload
        self.commit_timeout = commit_timeout_seconds or float(
            os.environ.get("MMALIGN_CHECKPOINT_COMMIT_TIMEOUT_SECONDS", "1800")
        )
        # One nonce per run of the gang, agreed by broadcast (see the module docstring).
        self.nonce = dist.broadcast_object(uuid.uuid4().hex)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: CheckpointInfo | None = None

    @classmethod
    def for_stage(cls, spec: Any, job_name: str, stage: str, dist: Distributed) -> Checkpointer:
        c = spec.checkpoint
        return cls(spec.checkpoint_uri(stage), dist, scratch_root(job_name, stage), c.every_steps,
                   c.keep_last, c.async_upload)

    # ------------------------------------------------------------------------------ save

    def save(self, engine: SavesShards, step: int, client_state: dict[str, Any], last: bool = False,
             ) -> CheckpointInfo | None:
        """Called after every optimizer step; saves when one is due (every `every_steps` steps, and at
        the `last` step, so a finished stage always ends on a checkpoint), else returns None. Writes
        this rank's shards for `step` and uploads them (in the background if async)."""
        if not (last or (step > 0 and step % self.every_steps == 0)):
            return None
        self.wait()  # the previous upload must finish (and its errors surface) first
        tag = layout.checkpoint_tag(step)
        rank_folder = self.local_root / "save" / f"rank-{self.dist.rank:05d}"
        shutil.rmtree(rank_folder / tag, ignore_errors=True)
        engine.save(str(rank_folder), tag, {**client_state, "step": step})
        torch.save(_rng_state(), rank_folder / tag / layout.rank_rng_name(self.dist.rank))
        info = CheckpointInfo(step, tag, storage.join(self.uri, tag) + "/")
        if self.async_upload:
            self._thread = threading.Thread(
                target=self._upload_guarded, args=(rank_folder / tag, info), name=f"ckpt-upload-{tag}",
                daemon=True,
            )
            self._thread.start()
        else:
            self._upload(rank_folder / tag, info)
            self.dist.barrier()  # every rank's _done object exists: rank 0's commit finds them at once
            if self.dist.is_rank_0:
                self._commit(info)
        return info

    def wait(self) -> None:
        """Join a background upload; raise its error (StorageError) if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, storage.StorageError):
                raise error
            raise storage.StorageError(f"checkpoint upload failed: {error}") from error

    def finish(self) -> None:
        """At the end of the stage: wait for the last upload and commit on every rank."""
        self.wait()
        self.dist.barrier()

    def _upload_guarded(self, folder: Path, info: CheckpointInfo) -> None:
        try:
            self._upload(folder, info)
            if self.dist.is_rank_0:
                self._commit(info)
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread by wait()
            log.error("checkpoint %s: upload failed: %s", info.tag, error)
            self._error = error

    def _upload(self, folder: Path, info: CheckpointInfo) -> None:
        files = transfer.upload_folder(folder, info.uri)
        done = {
            "rank": self.dist.rank,
            "nonce": self.nonce,
            "files": [{"name": f.relative, "size": f.size, "sha256": f.sha256} for f in files],
        }
        storage.write_json(storage.join(info.uri, layout.rank_done_name(self.dist.rank)), done)
        shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, info: CheckpointInfo) -> None:
        """Rank 0: once every rank of this run has uploaded `info`, write the marker, then prune."""
        deadline = time.monotonic() + self.commit_timeout
        files: dict[str, dict[str, Any]] = {}
        pending = set(range(self.dist.world_size))
        while pending:
            for rank in sorted(pending):
                try:
                    done = storage.read_json(storage.join(info.uri, layout.rank_done_name(rank)))
                except FileNotFoundError:
                    continue
                if done.get("nonce") == self.nonce:
                    pending.discard(rank)
                    files.update({f["name"]: f for f in done["files"]})
            if pending:
                if time.monotonic() > deadline:
                    raise storage.StorageError(
                        f"checkpoint {info.tag}: ranks {sorted(pending)} did not finish uploading within "
                        f"{self.commit_timeout:.0f}s; `latest` not moved"
                    )
                time.sleep(0.5)
        marker = {
            "step": info.step,
            "tag": info.tag,
            "uri": info.uri,
            "world_size": self.dist.world_size,
            "files": [files[name] for name in sorted(files)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_json(storage.join(self.uri, layout.MARKER), marker)  # the commit point
        self.last_committed = info
        log.info("checkpoint %s committed (%d files)", info.uri, len(files))
        self._prune(info.step)

    def _prune(self, latest_step: int) -> None:
        steps = sorted({int(m.group(1)) for o in storage.list_prefix(self.uri)
                        if (m := _STEP_DIR.match(o.relative))})
        older = [s for s in steps if s <= latest_step]
        for step in older[:-self.keep_last]:
            storage.delete_prefix(storage.join(self.uri, layout.checkpoint_tag(step)) + "/")

    # ------------------------------------------------------------------------------ restore

    def read_marker(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(storage.join(self.uri, layout.MARKER))
        except FileNotFoundError:
            return None

    def restore(self, engine: SavesShards) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into `engine` and this rank's RNG; None if there is none.

        Returns the client state saved with it ("step" and what the stage added)."""
        marker = self.dist.broadcast_object(self.read_marker() if self.dist.is_rank_0 else None)
        if marker is None:
            return None
        if int(marker["world_size"]) != self.dist.world_size:
            raise CheckpointMismatch(
                f"{self.uri}{layout.MARKER} (step {marker['step']}) was written by {marker['world_size']} "
                f"ranks but this gang has {self.dist.world_size}: ZeRO partitions are per rank. Run with "
                "resources.nodes x procPerNode as before, or delete the checkpoints to start the stage over"
            )
        folder = self.local_root / "restore" / f"node-{self.dist.node_rank}"
        tag = marker["tag"]
        if self.dist.is_local_rank_0:
            shutil.rmtree(folder, ignore_errors=True)
            transfer.download_prefix(
                marker["uri"], folder / tag, checksums={f["name"]: f["sha256"] for f in marker["files"]}
            )
        self.dist.barrier()
        client_state = engine.load(str(folder), tag)
        rng_file = folder / tag / layout.rank_rng_name(self.dist.rank)
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        self.dist.barrier()
        if self.dist.is_local_rank_0:
            shutil.rmtree(folder, ignore_errors=True)
        self.last_committed = CheckpointInfo(int(marker["step"]), tag, marker["uri"])
        log.info("resumed from %s (step %s)", marker["uri"], marker["step"])
        return {**client_state, "step": int(marker["step"])}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def describe_marker(marker: dict[str, Any]) -> str:
    return json.dumps({k: marker[k] for k in ("step", "uri", "world_size")})
