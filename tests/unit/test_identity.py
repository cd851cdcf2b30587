"""Content identity of stage outputs (trainer/identity.py): inputs by content, the reuse decision, and
what a rerun with changed parameters finds (no torch processes: a one-rank Distributed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmalign.api import layout
from mmalign.api.spec import AlignmentJobManifest
from mmalign.trainer import artifacts, data, identity, models, storage
from mmalign.trainer.context import Context
from mmalign.trainer.engine import Distributed

SPEC: dict[str, Any] = {
    "model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
    "storage": {"uri": "file:///tmp/unused/"}, "stages": {"reward": {}, "score": {}, "dpo": {"beta": 0.1}},
}
ONE_RANK = Distributed(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def context(tmp_path: Path, stage: str = "dpo", **changes: Any) -> Context:
    spec = copy.deepcopy(SPEC)
    spec["storage"]["uri"] = (tmp_path / "store").as_uri() + "/"
    for path, value in changes.items():  # "stages.dpo.beta": 0.2
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    manifest = AlignmentJobManifest.model_validate(
        {"apiVersion": "mmalign.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "j"}, "spec": spec})
    return Context(manifest=manifest, stage=stage, dist=ONE_RANK)  # type: ignore[arg-type]


def pairs_of(path: Path, rows: list[dict[str, Any]]) -> list[data.PreferencePair]:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data.read_pairs(data.DataSource(uri=str(path), missing_media="placeholder"))[0]


ROW = {"id": "q1", "prompt": "Which?", "chosen": "red", "rejected": "blue"}


def test_fingerprint_covers_the_rows_content(tmp_path: Path) -> None:
    first = data.fingerprint(pairs_of(tmp_path / "a.jsonl", [ROW]))
    assert data.fingerprint(pairs_of(tmp_path / "a.jsonl", [ROW])) == first
    assert data.fingerprint(pairs_of(tmp_path / "a.jsonl", [{**ROW, "chosen": "green"}])) != first  # same file:line


def test_model_identity_of_a_folder_follows_config_and_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "x"}')
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "README.md").write_text("notes")
    first = identity.model_identity(str(folder))
    (folder / "README.md").write_text("other notes")  # not a weight: same model
    assert identity.model_identity(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"v" * 100)  # same name and size, other content
    assert identity.model_identity(str(folder)) != first
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "config.json").write_text('{"model_type": "y"}')
    assert identity.model_identity(str(folder)) != first


def test_model_identity_of_builtin_and_of_an_output(tmp_path: Path) -> None:
    assert identity.model_identity("builtin://tiny-text", 0) != identity.model_identity("builtin://tiny-text", 1)
    out = tmp_path / "rm"
    out.mkdir()
    storage.write_json(str(out / layout.COMPLETE), {"files": [], "identity": {"stages.reward.margin": 0.0}})
    before = identity.model_identity(str(out))
    assert before.startswith("artifact:")
    storage.write_json(str(out / layout.COMPLETE), {"files": [], "identity": {"stages.reward.margin": 0.5}})
    assert identity.model_identity(str(out)) != before  # a retrained reward model is another input


def test_s3_listing_identity_uses_etags(monkeypatch: pytest.MonkeyPatch) -> None:
    listing = [storage.ObjectInfo("s3://b/m/config.json", "config.json", 10, etag="e1")]
    monkeypatch.setattr(storage, "list_prefix", lambda uri: listing)
    monkeypatch.setattr(identity, "recorded", lambda uri: None)  # no _complete.json there
    first = identity.model_identity("s3://b/m/")
    listing[0] = storage.ObjectInfo("s3://b/m/config.json", "config.json", 10, etag="e2")
    assert identity.model_identity("s3://b/m/") != first


def test_changed_names_the_fields() -> None:
    assert identity.changed({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert identity.changed({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]
    assert identity.changed(None, {"a": 1}) == ["identity"]


def test_stage_identities_see_their_parameters(tmp_path: Path) -> None:
    pairs = pairs_of(tmp_path / "p.jsonl", [ROW])
    base = context(tmp_path).spec
    beta = context(tmp_path, **{"stages.dpo.beta": 0.2}).spec
    assert identity.changed(identity.dpo(base, pairs), identity.dpo(beta, pairs)) == ["stages.dpo.beta"]
    assert identity.reward(base, pairs) == identity.reward(beta, pairs)
    assert identity.score(base, pairs) == identity.score(beta, pairs)
    length = context(tmp_path, **{"data.maxLength": 128}).spec
    assert "data.maxLength" in identity.changed(identity.reward(base, pairs), identity.reward(length, pairs))
    # how often to evaluate does not shape an output
    every = context(tmp_path, **{"stages.reward.evalEverySteps": 7}).spec
    assert identity.reward(base, pairs) == identity.reward(every, pairs)


def test_finished_before_reuses_only_the_same_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = context(tmp_path)
    out = ctx.spec.artifact_uri("dpo")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    made_by = {"stages.dpo.beta": 0.1, "data": "abc"}
    assert not artifacts.finished_before(ctx, out, made_by)  # nothing there
    artifacts.upload_model_folder(folder, out, made_by)
    assert artifacts.finished_before(ctx, out, dict(made_by))
    assert not artifacts.finished_before(ctx, out, {**made_by, "stages.dpo.beta": 0.2})
    assert "changed: stages.dpo.beta" in capsys.readouterr().err
    assert not storage.exists(storage.join(out, layout.COMPLETE))  # the old marker is gone while it retrains


def test_claim_keeps_files_of_the_same_identity_only(tmp_path: Path) -> None:
    ctx = context(tmp_path, stage="score")
    prefix = ctx.spec.artifact_uri("score")
    identity.claim(ctx, prefix, {"x": 1}, "scored pairs")
    storage.write_text(storage.join(prefix, layout.shard_name(0, 1)), "{}\n")
    identity.claim(ctx, prefix, {"x": 1}, "scored pairs")
    assert storage.exists(storage.join(prefix, layout.shard_name(0, 1)))
    identity.claim(ctx, prefix, {"x": 2}, "scored pairs")
    assert not storage.exists(storage.join(prefix, layout.shard_name(0, 1)))
    assert identity.recorded(storage.join(prefix, layout.IDENTITY)) == {"x": 2}


def test_a_reward_folder_without_score_head_is_refused(tmp_path: Path) -> None:
    model, processor = models.load_model("builtin://tiny-text")
    models.save_model(model, processor, tmp_path / "policy")
    with pytest.raises(models.MissingScoreHead, match=str(tmp_path / "policy")):
        models.load_reward_model(str(tmp_path / "policy"), trained=True)
    models.load_reward_model(str(tmp_path / "policy"))  # the reward stage's start: a fresh head is fine
