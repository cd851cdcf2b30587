"""`mmalign jobs` and `mmalign.client` against the real API server, with the operator and its stub trainer.

The namespace, the operator subprocess (`--trainer-command` = the stub) and the job documents are the
lifecycle tests' (tests/integration/test_operator_lifecycle.py): imported, not copied. The CLI runs as a
user runs it, a subprocess with --kubeconfig and -n.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _pytest.fixtures import FixtureFunctionDefinition

from tests.integration import test_operator_lifecycle as lifecycle
from tests.integration.test_operator_lifecycle import REPO, Env, job_document

pytestmark = pytest.mark.integration
# The lifecycle tests' fixtures, all of them (`env`: a namespace with its own operator, and what it needs),
# so that this file follows wherever that one runs (the process node, the real node).
globals().update(
    {name: value for name, value in vars(lifecycle).items() if isinstance(value, FixtureFunctionDefinition)}
)


def jobs_cli(env: Env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "mmalign",
        "jobs",
        *args,
        "--kubeconfig",
        str(env.cluster.kubeconfig),
        "-n",
        env.namespace,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def jobs_main(capsys: pytest.CaptureFixture[str], env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process, through the `mmalign` entry point's main(): a Python start per
    call costs seconds on a loaded machine."""
    from mmalign.cli import main

    capsys.readouterr()
    code = main(["jobs", *args, "--kubeconfig", str(env.cluster.kubeconfig), "-n", env.namespace])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["mmalign", "jobs", *args], code, out, err)


def client_of(env: Env) -> Any:
    from mmalign.client import Client

    return Client(env.namespace, kubeconfig=str(env.cluster.kubeconfig))


def test_client_creates_validated_jobs_waits_with_progress_and_reads_results_and_the_cli_shows_them(
    env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from mmalign.client import InvalidJob, ProgressDisplay

    jobs = client_of(env)
    document = job_document(
        "sdk",
        stages=("reward", "score"),
        run_policy={"cleanPodsAfterFinished": False},
        env={"STUB_STEPS": "4", "STUB_STEP_SECONDS": "0.3"},
    )
    # a bad document is refused before it reaches the cluster, with its field path (as `mmalign validate`)
    bad = copy.deepcopy(document)
    bad["spec"]["stages"]["reward"]["learningRat"] = 1e-5
    with pytest.raises(InvalidJob) as refused:
        jobs.create(bad)
    assert any("spec.stages.reward.learningRat: unknown field" in p for p in refused.value.problems), (
        refused.value
    )
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad, sort_keys=False))
    refused_file = jobs_main(capsys, env, "create", str(bad_file))
    assert refused_file.returncode == 2 and f"{bad_file}:" in refused_file.stderr, refused_file
    assert "spec.stages.reward.learningRat: unknown field" in refused_file.stderr
    assert jobs.list() == []

    assert jobs.create(document) == "sdk"
    shown = io.StringIO()
    status = jobs.wait("sdk", timeout=90, progress=ProgressDisplay(out=shown, bar=False), poll_seconds=0.3)
    assert status.phase == "Succeeded"
    lines = shown.getvalue().splitlines()
    assert (
        "Running: stage reward" in shown.getvalue() and lines[-1] == "Succeeded: stage score 4/4 loss=0.25"
    ), lines
    metrics = jobs.metrics("sdk")
    assert metrics["reward"]["loss"] == pytest.approx(0.25) and metrics["score"][
        "reward_accuracy"
    ] == pytest.approx(1)
    artifacts = jobs.artifacts("sdk")
    assert sorted(artifacts) == ["reward", "score"] and all(
        u.startswith("s3://mmalign/tiny-cpu/") for u in artifacts.values()
    )

    listed = jobs_cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "STEP", "AGE"] and row.split()[:4] == [
        "sdk",
        "Succeeded",
        "score",
        "4/4",
    ]

    got = jobs_main(capsys, env, "get", "sdk")
    assert got.returncode == 0, got.stderr
    reward = next(line.split() for line in got.stdout.splitlines() if line.startswith("reward "))
    assert reward[:5] == ["reward", "Succeeded", "0", "0", "4/4"] and "loss=0.25" in reward, got.stdout
    assert (
        json.loads(jobs_main(capsys, env, "get", "sdk", "-o", "json").stdout)["status"]["phase"]
        == "Succeeded"
    )

    described = jobs_main(capsys, env, "describe", "sdk")
    assert described.returncode == 0, described.stderr
    text = described.stdout
    for expected in (
        "Phase:",
        "Stages:",
        "Outputs:",
        artifacts["reward"],
        "Conditions:",
        "AllStagesSucceeded",
        "Events:",
        "StageStarted",
        "StageSucceeded",
    ):
        assert expected in text, (expected, text)

    waited = jobs_main(capsys, env, "wait", "sdk")
    assert (waited.returncode, waited.stdout.strip()) == (0, "sdk: Succeeded"), waited
    logs = jobs_main(capsys, env, "logs", "sdk", "--stage", "reward")
    assert logs.returncode == 0 and "stub-env " in logs.stdout and '"step": 4' in logs.stdout, logs

    missing = jobs_main(capsys, env, "get", "nosuch")
    assert missing.returncode == 2 and "not found" in missing.stderr, missing


def test_logs_follow_rank0_across_a_gang_restart_until_the_stage_ends(env: Env) -> None:
    # Attempt 0: rank 0 is SIGKILLed at step 2 (exit 137, retryable); attempt 1 runs its 3 steps. Created
    # suspended, so that `logs -f` (a Python start: seconds on a loaded machine) is already waiting when
    # the first pod starts.
    env.apply(
        job_document(
            "follow",
            stages=("reward",),
            run_policy={"suspend": True},
            env={
                "STUB_STEPS": "3",
                "STUB_STEP_SECONDS": "1.5",
                "STUB_FAIL_CODE": "137",
                "STUB_FAIL_RANK": "0",
                "STUB_FAIL_ATTEMPTS": "1",
            },
        )
    )
    command = [
        sys.executable,
        "-m",
        "mmalign",
        "jobs",
        "logs",
        "follow",
        "-f",
        "--kubeconfig",
        str(env.cluster.kubeconfig),
        "-n",
        env.namespace,
    ]
    following = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert following.stderr is not None
        first = following.stderr.readline()
        assert first.startswith("==> waiting for "), first
        env.patch_spec("follow", {"runPolicy": {"suspend": False}})
        out, err = following.communicate(timeout=120)
        err = first + err
    finally:
        following.kill()
    assert following.returncode == 0, err
    # it ended by itself once the stage did
    assert env.status("follow")["stages"]["reward"]["phase"] == "Succeeded"
    assert "==> pod follow-reward-0-0 (stage reward, attempt 0) <==" in err
    assert "==> pod follow-reward-1-0 (stage reward, attempt 1) <==" in err
    attempts = [
        json.loads(line[len("stub-env ") :])["MMALIGN_ATTEMPT"]
        for line in out.splitlines()
        if line.startswith("stub-env ")
    ]
    assert attempts == ["0", "1"], out
    steps = [
        json.loads(line[len("mmalign-progress ") :])["step"]
        for line in out.splitlines()
        if line.startswith("mmalign-progress ")
    ]
    assert steps == [1, 1, 2, 3], out  # attempt 0 died at step 2; attempt 1 ran through


def test_wait_exit_codes_say_failed_or_timed_out(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from mmalign.client import JobFailed

    env.apply(
        job_document(
            "doomed",
            stages=("reward",),
            env={"STUB_STEPS": "3", "STUB_STEP_SECONDS": "3", "STUB_FAIL_CODE": "4", "STUB_FAIL_RANK": "0"},
        )
    )
    early = jobs_main(capsys, env, "wait", "doomed", "--timeout", "0.5")
    assert early.returncode == 124 and "still " in early.stderr, early
    failed = jobs_main(capsys, env, "wait", "doomed", "--quiet")
    assert failed.returncode == 1, failed
    assert failed.stdout.startswith("doomed: Failed: ") and "exited with code 4" in failed.stdout, (
        failed.stdout
    )
    with pytest.raises(JobFailed) as raised:
        client_of(env).wait("doomed", progress=False)
    assert raised.value.status.phase == "Failed" and "NAN_LOSS" in str(raised.value)
