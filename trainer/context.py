"""What a stage starts from: the job, who this process is, where its files go, and how it talks to people.

`Context` is built once per worker by trainer/train.py and handed to the stage's `run`. The node-local
scratch rule (`scratch_root`) lives here and only here: the checkpointer's shard folders and the
stages' export folders are both below it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

from mmalign.api import keys, layout
from mmalign.api.exit_codes import ExitCode
from mmalign.api.layout import StageName
from mmalign.api.spec import AlignmentJobManifest, AlignmentJobSpec
from mmalign.trainer.engine import Distributed


class StageConfigError(Exception):
    """The job cannot run as written (ExitCode.CONFIG_ERROR): says which field and what to do."""

    exit_code = ExitCode.CONFIG_ERROR


def scratch_root(job: str, stage: str) -> Path:
    """This job/stage's node-local scratch: `$MMALIGN_LOCAL_DIR` (the operator points it at the pod's
    scratch volume) or the temp folder, then `mmalign-<job>-<stage>`. Not created here."""
    base = os.environ.get(keys.ENV_LOCAL_DIR) or tempfile.gettempdir()
    return Path(base) / f"mmalign-{job}-{stage}"


@dataclasses.dataclass
class Context:
    """Everything a stage needs to start: the job, who we are, where things go."""

    manifest: AlignmentJobManifest
    stage: StageName
    dist: Distributed

    @property
    def spec(self) -> AlignmentJobSpec:
        return self.manifest.spec

    @property
    def job_name(self) -> str:
        return str(self.manifest.metadata["name"])

    def stage_uri(self, leaf: str = "") -> str:
        """`<storage>/<stage>/<leaf>`: metrics.json, reference log-probs, ..."""
        return layout.stage_uri(self.spec.storage.uri, self.stage, leaf)

    def scratch(self, name: str) -> Path:
        """The folder `name` below this stage's scratch root (see `scratch_root`), created."""
        path = scratch_root(self.job_name, self.stage) / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def say(message: str) -> None:
    """A human line on stderr (rank 0 only by the caller)."""
    print(f"[mmalign] {message}", file=sys.stderr, flush=True)
