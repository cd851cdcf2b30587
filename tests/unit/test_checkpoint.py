"""trainer/checkpoint.py: the `latest` marker protocol, pruning, resume, a failed upload, a failed
background write; engine.host_copy (what an async save's snapshot holds).

A fake engine stands in for DeepSpeed (it writes two "shard" files and reads them back); the real
engine is exercised by tests/trainer/. One process, world size 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmalign.trainer import checkpoint, s3client, storage, transfer
from mmalign.trainer.engine import Distributed, host_copy
from tests.s3_server import S3Server, require_weed

SINGLE = Distributed(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


class FakeEngine:
    def __init__(self, value: int = 0, shard_bytes: int = 1000) -> None:
        self.value = value
        self.shard_bytes = shard_bytes

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        path = Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.bin").write_bytes(bytes([self.value % 256]) * self.shard_bytes)
        (path / "client.json").write_text(json.dumps({"value": self.value, **(client_state or {})}))

    def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> Any:
        """As engine.Engine.snapshot: the state now, the files when `write()` runs."""
        frozen = FakeEngine(self.value, self.shard_bytes)
        return SimpleNamespace(write=lambda: frozen.save(folder, tag, client_state))

    def load(self, folder: str, tag: str) -> dict[str, Any]:
        state = json.loads((Path(folder) / tag / "client.json").read_text())
        self.value = state.pop("value")
        assert (Path(folder) / tag / "model.bin").read_bytes()[0] == self.value % 256
        return state


def _checkpointer(
    uri: str, tmp_path: Path, async_upload: bool, keep_last: int = 2
) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(
        uri, SINGLE, tmp_path / "local", every_steps=2, keep_last=keep_last, async_upload=async_upload
    )


@pytest.mark.parametrize("async_upload", [False, True])
def test_save_marker_prune_restore(tmp_path: Path, async_upload: bool) -> None:
    uri = (tmp_path / "store" / "ckpt").as_uri() + "/"
    saver = _checkpointer(uri, tmp_path, async_upload)
    assert saver.restore(FakeEngine()) is None  # nothing yet: fresh start
    engine = FakeEngine()
    for step in (2, 4, 6):
        engine.value = step * 10
        random_before = torch.rand(1)  # noqa: F841 - advance the RNG between saves
        saver.save(engine, step, {"data_position": step * 3})
        if step == 6:
            expected_next = torch.rand(3)  # what the RNG yields right after the last save
    saver.finish()
    marker = storage.read_json(uri + "latest")
    assert marker["step"] == 6 and marker["world_size"] == 1
    names = {f["name"] for f in marker["files"]}
    assert names == {"model.bin", "client.json", "rng-rank-00000.pt"}
    assert all(len(f["sha256"]) == 64 for f in marker["files"])
    steps = sorted(
        {o.relative.split("/")[0] for o in storage.list_prefix(uri) if o.relative.startswith("step-")}
    )
    assert steps == ["step-00000004", "step-00000006"]  # keep_last=2

    torch.rand(5)  # disturb the RNG: restore must bring it back
    fresh = FakeEngine()
    state = _checkpointer(uri, tmp_path, async_upload).restore(fresh)
    assert state == {"step": 6, "data_position": 18}
    assert fresh.value == 60
    assert torch.equal(torch.rand(3), expected_next)


def test_save_keeps_its_own_schedule(tmp_path: Path) -> None:
    """every_steps=2: steps 1 and 3 are not due (nothing written, None), step 2 is, and the last step
    (3) is saved whatever the schedule."""
    uri = (tmp_path / "ckpt").as_uri() + "/"
    saver = _checkpointer(uri, tmp_path, async_upload=False)
    assert saver.save(FakeEngine(1), 1, {}) is None
    assert storage.list_prefix(uri) == [] and saver.read_marker() is None

    def marker_step() -> int:
        marker = saver.read_marker()
        assert marker is not None
        return int(marker["step"])

    info = saver.save(FakeEngine(2), 2, {})
    assert info is not None and info.step == 2 and marker_step() == 2
    assert saver.save(FakeEngine(3), 3, {}) is None and marker_step() == 2
    last = saver.save(FakeEngine(3), 3, {}, last=True)
    saver.finish()
    assert last is not None and last.tag == "step-00000003"
    assert marker_step() == 3 and saver.last_committed == last


def test_corrupted_download_is_refused(tmp_path: Path) -> None:
    uri = (tmp_path / "ckpt").as_uri() + "/"
    saver = _checkpointer(uri, tmp_path, async_upload=False)
    saver.save(FakeEngine(7), 2, {})
    (tmp_path / "ckpt" / "step-00000002" / "model.bin").write_bytes(b"tampered")
    with pytest.raises(storage.StorageError, match="sha256"):
        saver.restore(FakeEngine())


def test_failed_upload_keeps_previous_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 server stops in the middle of a checkpoint upload (after its first file): the save fails
    with StorageError, `latest` still names the previous checkpoint, and resuming from it works once
    the server is back."""
    require_weed()
    server = S3Server(tmp_path / "s3").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MMALIGN_STORAGE_RETRY_SECONDS", "2")
        s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=2)
        uri = server.uri("job/reward/checkpoints/")
        saver = _checkpointer(uri, tmp_path, async_upload=True)
        engine = FakeEngine(value=1, shard_bytes=6 * 1024 * 1024)  # multipart: 2 parts
        saver.save(engine, 2, {"data_position": 6})
        saver.wait()
        assert storage.read_json(uri + "latest")["step"] == 2

        real_upload = transfer.upload_file
        uploaded: list[str] = []

        def stop_server_after_first_file(path: Any, target: str) -> Any:
            info = real_upload(path, target)
            uploaded.append(target)
            if len(uploaded) == 1:
                server.stop()
            return info

        monkeypatch.setattr(transfer, "upload_file", stop_server_after_first_file)
        engine.value = 2
        saver.save(engine, 4, {"data_position": 12})  # async: the error surfaces at the next join
        with pytest.raises(storage.StorageError):
            saver.wait()
        monkeypatch.setattr(transfer, "upload_file", real_upload)
        assert len(uploaded) == 1

        server.start()
        marker = storage.read_json(uri + "latest")
        assert marker["step"] == 2
        resumed = FakeEngine()
        state = _checkpointer(uri, tmp_path, async_upload=True).restore(resumed)
        assert state == {"step": 2, "data_position": 6} and resumed.value == 1
    finally:
        server.stop()
        s3client.configure()
        os.environ.pop("MMALIGN_STORAGE_RETRY_SECONDS", None)


def test_failed_background_write_is_raised_by_the_next_save_and_by_finish(tmp_path: Path) -> None:
    """asyncUpload: the local write of step 4's files fails in the background (a full disk): the next
    save raises it, naming the step, before it saves anything; `latest` still names step 2; a failure
    of the stage's last save is raised by finish()."""
    uri = (tmp_path / "ckpt").as_uri() + "/"
    saver = _checkpointer(uri, tmp_path, async_upload=True)
    saver.save(FakeEngine(1), 2, {})

    class FullDisk(FakeEngine):
        def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> Any:
            def write() -> None:
                raise OSError(28, "No space left on device")

            return SimpleNamespace(write=write)

    saver.save(FullDisk(2), 4, {})  # returns at once: the write fails in the background
    with pytest.raises(RuntimeError, match=r"checkpoint step-00000004 .*No space left on device.*previous"):
        saver.save(FakeEngine(3), 6, {})
    assert storage.read_json(uri + "latest")["step"] == 2
    assert not any(o.relative.startswith("step-00000006") for o in storage.list_prefix(uri))  # not started

    saver.save(FullDisk(4), 8, {}, last=True)
    with pytest.raises(RuntimeError, match="step-00000008"):
        saver.finish()
    assert storage.read_json(uri + "latest")["step"] == 2


def test_host_copy_is_a_compact_frozen_copy_that_keeps_ties() -> None:
    """What Engine.snapshot keeps of each file DeepSpeed saves: tensors copied (the training step that
    follows changes the originals in place, not the copy), a view of a flat buffer copied as its own
    elements only, a tensor met twice (tied weights) copied once, other objects deep-copied."""
    flat = torch.arange(10, dtype=torch.float32)  # a ZeRO flat buffer
    view = flat[2:4]
    tied = torch.ones(3)
    scaler = SimpleNamespace(cur_scale=1.0)
    state = {
        "module": {"embed": tied, "lm_head": tied, "part": view},
        "optimizer": [flat],
        "shapes": (torch.Size([2]), 3),
        "scaler": scaler,
    }
    copied = host_copy(state, {})
    flat.add_(100.0)
    tied.mul_(5.0)
    scaler.cur_scale = 2.0
    assert torch.equal(copied["module"]["part"], torch.tensor([2.0, 3.0]))
    assert copied["module"]["part"].untyped_storage().nbytes() == 2 * 4  # not the whole buffer
    assert torch.equal(copied["optimizer"][0], torch.arange(10, dtype=torch.float32))
    assert copied["module"]["embed"] is copied["module"]["lm_head"]
    assert torch.equal(copied["module"]["embed"], torch.ones(3))
    assert copied["shapes"] == (torch.Size([2]), 3) and copied["scaler"].cur_scale == 1.0
