"""`mmalign jobs` output (mmalign.client.tables) and how the client picks its namespace, without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mmalign.client import InvalidJob, load_document, tables
from mmalign.client.connection import connect

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)


def job(name: str, status: dict[str, object], created: str = "2026-01-02T11:00:00Z") -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created, "generation": 2},
        "status": status,
    }


RUNNING = {
    "phase": "Restarting",
    "stage": "dpo",
    "progress": "40/100 (40%)",
    "observedGeneration": 2,
    "message": "stage dpo: pod j-dpo-0-1 exited with code 137",
    "stages": {
        "reward": {
            "phase": "Succeeded",
            "startTime": "2026-01-02T11:00:00Z",
            "completionTime": "2026-01-02T11:30:00Z",
            "metrics": {"reward_accuracy": 0.8125, "loss": 0.4},
            "artifact": "s3://b/j/reward/final",
        },
        "score": {"phase": "Skipped", "message": "not in spec.stages"},
        "dpo": {
            "phase": "Restarting",
            "attempt": 1,
            "restarts": 1,
            "startTime": "2026-01-02T11:31:00Z",
            "progress": {"step": 40, "total": 100, "etaSeconds": 90},
            "metrics": {"loss": 0.69314},
            "pendingPods": [
                {"name": "j-dpo-1-1", "reason": "Unschedulable", "message": "0/2 nodes are available"}
            ],
            "futureField": "ignored",
        },
    },
    "conditions": [
        {
            "type": "Restarting",
            "status": "True",
            "reason": "RetryableExitCode",
            "message": "pod j-dpo-0-1 exited with code 137",
            "lastTransitionTime": "2026-01-02T11:59:30Z",
        }
    ],
}


def test_list_has_one_row_per_job_with_the_current_stages_step_and_age() -> None:
    text = tables.list_table([job("j", RUNNING), job("new", {}, created="2026-01-02T11:59:15Z")], NOW)
    assert [line.split() for line in text.splitlines()] == [
        ["NAME", "PHASE", "STAGE", "STEP", "AGE"],
        ["j", "Restarting", "dpo", "40/100", "60m"],
        ["new", "Pending", "-", "-", "45s"],
    ]
    assert tables.list_table([job("j", RUNNING)], NOW, namespaces=True).splitlines()[1].split()[0] == "ml"


def test_get_shows_every_stage_with_progress_eta_duration_and_metrics_loss_first() -> None:
    rows = {
        line.split()[0]: line.split() for line in tables.get_text(job("j", RUNNING), NOW).splitlines()[3:]
    }
    assert rows["reward"] == [
        "reward",
        "Succeeded",
        "0",
        "0",
        "-",
        "-",
        "30m",
        "loss=0.4",
        "reward_accuracy=0.8125",
    ]
    assert rows["score"][:2] == ["score", "Skipped"]
    assert rows["dpo"] == ["dpo", "Restarting", "1", "1", "40/100", "90s", "29m", "loss=0.6931"]


def test_describe_shows_outputs_pending_pods_conditions_and_events_oldest_first() -> None:
    events = [
        {
            "type": "Warning",
            "reason": "GangRestarting",
            "message": "attempt 1",
            "count": 2,
            "lastTimestamp": "2026-01-02T11:59:30Z",
        },
        {
            "type": "Normal",
            "reason": "StageStarted",
            "message": "stage reward",
            "lastTimestamp": "2026-01-02T11:00:00Z",
        },
    ]
    text = tables.describe_text(job("j", RUNNING), events, NOW)
    assert (
        "Phase:               Restarting" in text and "stage dpo: pod j-dpo-0-1 exited with code 137" in text
    )
    assert "s3://b/j/reward/final" in text and "j-dpo-1-1   Unschedulable   0/2 nodes are available" in text
    assert "Restarting   True     RetryableExitCode   30s   pod j-dpo-0-1 exited with code 137" in text
    started, restarting = text.index("StageStarted"), text.index("GangRestarting")
    assert started < restarting and "30s (x2)   Warning   GangRestarting" in text
    assert tables.describe_text(job("new", {}), [], NOW).endswith(
        "Conditions:\n  <none>\n\nEvents:\n  <none>"
    )


def test_the_namespace_is_the_kubeconfig_contexts_as_with_kubectl(tmp_path: Path) -> None:
    cluster = {"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}
    user = {"name": "u", "user": {"token": "t"}}
    contexts = [
        {"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
        {"name": "b", "context": {"cluster": "c", "user": "u"}},
    ]
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [user],
                "contexts": contexts,
                "current-context": "a",
            }
        )
    )
    assert connect(str(kubeconfig))[1] == "team-a"
    assert connect(str(kubeconfig), context="b")[1] == "default"


def test_a_job_file_is_validated_as_mmalign_validate_does_with_its_line(tmp_path: Path) -> None:
    document = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "manifests/examples/tiny-cpu.yaml").read_text()
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert load_document(path) == document and load_document(str(path)) == document
    document["spec"]["runPolicy"]["backoffLimit"] = -1
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "backoffLimit" in text)
    with pytest.raises(InvalidJob) as refused:
        load_document(path)
    assert [p.split(": ")[:2] for p in refused.value.problems] == [
        [f"{path}:{line}", "spec.runPolicy.backoffLimit"]
    ]
