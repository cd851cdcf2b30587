"""What a user reads about a failure or a decision: long messages keep their head (the reason) and their
tail, the score stage's restart names what it really resumes from, and an output that is not reused
reaches the job as an Event (trainer progress line -> operator reconcile; no cluster)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmalign.api import conditions, keys
from mmalign.api.exit_codes import ExitCode
from mmalign.api.progress import ProgressReport, parse_line
from mmalign.operator.policy import PodView, classify
from mmalign.trainer import data, failures, identity, progress, storage
from mmalign.trainer.stages import dpo
from tests.unit.test_identity import context
from tests.unit.test_operator_status import World

REASON = "media not found for 7 of 120 pairs: data.jsonl:3: row 'q1': /data/img/1.png (no such file)"
ADVICE = "or set data.missingMedia: placeholder to train with a grey placeholder image (counted and reported)."
LONG = REASON + "; " + "; ".join(f"data.jsonl:{i}: row 'q{i}': /data/img/{i}.png" for i in range(40)) + ". " + ADVICE


@pytest.fixture(autouse=True)
def _no_notes() -> Iterator[None]:
    progress.forget_notes()
    yield
    progress.forget_notes()


def test_shorten_keeps_head_and_tail_and_cuts_the_middle() -> None:
    short = conditions.shorten(LONG)
    assert len(short) == conditions.MESSAGE_LIMIT
    assert short.startswith(REASON) and short.endswith(ADVICE) and conditions.CUT in short
    assert conditions.shorten("a   b\n c") == "a b c"  # one line
    assert conditions.shorten("x" * 10, 5) == "xxxxx"


def test_termination_log_and_condition_keep_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setenv(keys.ENV_TERMINATION_LOG, str(log))
    failures.report_failure(ExitCode.DATA_ERROR, "DATA_ERROR", data.DataError(LONG))
    line = log.read_text().strip()
    assert line.startswith(f"mmalign: DATA_ERROR (exit 3): {REASON}") and line.endswith(ADVICE)
    assert capsys.readouterr().err.strip() == line
    # the operator reads that line from the pod's status: the condition's message starts with the reason
    pod = PodView("j-reward-0-0", "reward", 0, 0, phase="Failed", exit_code=3, reason="Error", message=line)
    failure = classify(pod, retryable_exit_codes=[5])
    assert not failure.retryable and failure.reason == "DataError"
    assert f"pod j-reward-0-0 exited with code 3: mmalign: DATA_ERROR (exit 3): {REASON}" in failure.message
    assert failure.message.endswith("(permanent: fix the cause, then re-create the job)")
    assert len(failure.message) < 1024  # an Event's message limit


def test_a_restarted_score_stage_names_its_shards_not_a_checkpoint() -> None:
    world = World()
    world.step()
    world.run_stage("reward")
    world.set("score", "Running")
    world.step()
    world.set("score", "Failed", 137, node=1)
    world.step()
    score = world.status.stages.score
    assert score is not None and score.phase == "Restarting"
    assert score.last_checkpoint is None  # score has no checkpoints: nothing that never exists
    assert "keeping the shards already scored in s3://b/j/score/scored/" in score.message
    assert "checkpoints/latest" not in world.status.message


def test_a_notice_on_the_progress_line_becomes_one_event() -> None:
    why = "s3://b/j/dpo/model/ was made with other inputs or parameters (changed: stages.dpo.beta); recomputing it"
    line = ProgressReport("dpo", 0, 10, event="start", notices=(why,)).to_line()
    report = parse_line(line)
    assert report is not None and report.notices == (why,)
    assert "notices" not in json.loads(ProgressReport("dpo", 0, 10).to_line().split(" ", 1)[1])
    world = World()
    world.step()
    world.run_stage("reward")
    world.run_stage("score")
    world.set("dpo", "Running")
    world.step()
    world.step(progress=report)
    world.step(progress=ProgressReport("dpo", 3, 10, notices=(why,)))  # the same notice on later lines
    recomputing = [e for plan in world.plans for e in plan.events if e.reason == conditions.EVENT_RECOMPUTING]
    assert [e.message for e in recomputing] == [f"stage dpo: {why}"]
    assert world.status.stages.dpo is not None and world.status.stages.dpo.notices == [why]


def test_outputs_of_another_identity_put_a_notice_on_the_stages_progress_lines(tmp_path: Path) -> None:
    ctx = context(tmp_path, "score")
    prefix = storage.join(ctx.spec.storage.uri, "score/scored/")
    identity.claim(ctx, prefix, {"x": 1}, "scored pairs")
    storage.write_text(storage.join(prefix, "shard-00000-of-00001.jsonl"), "{}\n")
    identity.claim(ctx, prefix, {"x": 2}, "scored pairs")
    out = io.StringIO()
    progress.Progress("score", 4, True, out=out, bar=io.StringIO()).finish()
    reports = [parse_line(line) for line in out.getvalue().splitlines()]
    assert all(r is not None and len(r.notices) == 1 and "changed: x" in r.notices[0] for r in reports)
    other = io.StringIO()
    progress.Progress("dpo", 4, True, out=other, bar=io.StringIO())  # notes belong to their stage
    first = parse_line(other.getvalue())
    assert first is not None and first.notices == ()


def test_dpo_reports_its_skipped_lines(tmp_path: Path) -> None:
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"id": "q_0", "prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    ctx = context(tmp_path, "dpo", **{"data.uri": str(rows), "data.onBadLine": "skip", "stages.score": None})
    pairs, stats = dpo.load_pairs(ctx, needs_delta=False)
    assert len(pairs) == 1 and stats.skipped == 1
