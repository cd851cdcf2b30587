"""The promise in one test: the Helm-installed operator runs tiny-cpu-s3 through reward → score → dpo on
2-pod torchrun gangs against a real API server and a real S3 server, and everything a user relies on is
there afterwards. The same functions drive `make demo` (mmalign.devcluster.demo)."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from typing import Any

import boto3
import pytest

from mmalign.devcluster import demo
from mmalign.devcluster.testing import wait_for

pytestmark = pytest.mark.e2e
STAGES = ("reward", "score", "dpo")
TTL_SECONDS = 20


def _pods(dev_cluster: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    out = demo.run(dev_cluster, "kubectl", "get", "pods", "-n", namespace, "-l", f"mmalign.io/job={name}",
                   "-o", "json")
    return json.loads(out)["items"]


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0].get("env", [])}


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _event_order(event: dict[str, Any]) -> tuple[datetime, int]:
    """When the operator posted it (eventTime has microseconds; kopf posts one object's events one by one,
    in order), then the API server's write order."""
    stamp = event.get("eventTime") or event.get("firstTimestamp") or event["metadata"]["creationTimestamp"]
    return _time(stamp), int(event["metadata"]["resourceVersion"])


def _label(reason: str, message: str) -> str:
    """`StageStarted reward` for stage events (their message starts `stage <name>`), else the reason."""
    match = re.match(r"stage (\w+)", message)
    return f"{reason} {match.group(1)}" if match else reason


# The operator's own event reasons (docs/operator.md); kopf may add others (warnings it logs).
OPERATOR_REASONS = {"Created", "StageStarted", "Running", "StageSucceeded", "GangRestarting", "Suspended",
                    "Resumed", "SpecChangeRefused", "Succeeded", "Failed"}


@pytest.fixture
def chart(dev_cluster: Any) -> Any:
    """The chart installed for this test only: its cluster-wide operator must not outlive it."""
    demo.install_chart(dev_cluster)
    yield
    demo.run(dev_cluster, "helm", "uninstall", "mmalign", "-n", demo.OPERATOR_NAMESPACE, "--wait")


def test_tiny_pipeline_end_to_end(dev_cluster: Any, namespace: str, chart: None) -> None:
    demo.prepare_storage(dev_cluster, namespace)
    job = demo.example_job(dev_cluster)
    name = job["metadata"]["name"]
    # The plumbing, not the learning: the demo's recipe (12 reward epochs, 4 DPO epochs: docs/paper.md,
    # "The demo's reward model") cut to the ~80 steps it had before, checkpoints every 5 steps so both
    # training stages still save several times. What the full recipe learns is the demo's to show.
    stages = job["spec"]["stages"]
    stages["reward"]["epochs"], stages["dpo"]["epochs"] = 2, 1
    job["spec"]["checkpoint"]["everySteps"] = 5
    job["spec"]["runPolicy"].update(ttlSecondsAfterFinished=TTL_SECONDS, cleanPodsAfterFinished=False)
    demo.run(dev_cluster, "kubectl", "apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    # Record every pod the operator makes while the job runs (pods of a finished stage may go early).
    seen: dict[str, dict[str, Any]] = {}
    phases: list[tuple[str, str]] = []
    deadline = time.monotonic() + 1500
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = demo.job_status(dev_cluster, name, namespace)
        row = (status.get("stage", ""), status.get("phase", ""))
        if row[1] and (not phases or phases[-1] != row):
            phases.append(row)
        for pod in _pods(dev_cluster, namespace, name):
            seen[pod["metadata"]["name"]] = pod
        if row[1] in demo.TERMINAL:
            break
        time.sleep(2)
    assert status.get("phase") == "Succeeded", json.dumps(status, indent=1)

    # Stages ran in order, each Running before the job Succeeded.
    order = [stage for stage, phase in phases if phase == "Running"]
    assert [s for i, s in enumerate(order) if s not in order[:i]] == list(STAGES), phases
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Created"]["status"] == "True"
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"

    # Each stage: a 2-pod gang with the torchrun conventions, node ranks 0 and 1.
    for stage in STAGES:
        pods = [p for p in seen.values() if p["metadata"]["labels"]["mmalign.io/stage"] == stage]
        envs = [_env(p) for p in pods]
        assert sorted(e["PET_NODE_RANK"] for e in envs) == ["0", "1"], stage
        assert all(e["PET_NNODES"] == "2" and e["PET_NPROC_PER_NODE"] == "1" for e in envs)
        assert len({e["MASTER_ADDR"] for e in envs}) == 1 and all(e["MASTER_PORT"] for e in envs)
        assert all("s3-credentials" in json.dumps(p["spec"]["containers"][0].get("envFrom", [])) for p in pods)

    # Per-stage metrics in status.
    bucket = demo.bucket()
    stages = status["stages"]
    for stage in STAGES:
        entry = stages[stage]
        assert entry["phase"] == "Succeeded" and entry["metrics"], (stage, entry)
        assert entry["artifact"].startswith(f"s3://{bucket}/tiny-cpu-s3/")
    assert {"eval_acc", "eval_acc_plus"} <= stages["reward"]["metrics"].keys(), stages["reward"]["metrics"]
    assert {"acc", "acc_plus"} <= stages["score"]["metrics"].keys(), stages["score"]["metrics"]
    assert "eval_reward_accuracy" in stages["dpo"]["metrics"], stages["dpo"]["metrics"]
    # What `make demo` prints to show the job learned: held-out Acc and the RM-judged win rate.
    assert 0.0 <= stages["dpo"]["metrics"]["win_rate"] <= 1.0, stages["dpo"]["metrics"]
    summary = demo.learning_summary(stages)
    assert len(summary) == 3 and summary[0].startswith("reward model: held-out Acc"), summary

    # Artifacts in S3: latest markers of the training stages, the models, the scored pairs with δ.
    s3 = boto3.client("s3", endpoint_url=dev_cluster.s3_endpoint, **dev_cluster.s3_credentials)

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    for stage in ("reward", "dpo"):
        latest = json.loads(s3.get_object(Bucket=bucket,
                                          Key=f"tiny-cpu-s3/{stage}/checkpoints/latest")["Body"].read())
        assert latest["step"] > 0 and latest["files"], latest
        assert latest["world_size"] == 2, latest  # both ranks wrote their shards: really distributed
        assert stages[stage]["lastCheckpoint"].rstrip("/") == latest["uri"].rstrip("/")
        assert any(k.endswith("config.json") for k in keys(f"tiny-cpu-s3/{stage}/model/")), stage
    scored_keys = [k for k in keys("tiny-cpu-s3/score/scored/") if k.endswith(".jsonl")]
    rows = [json.loads(line) for key in scored_keys
            for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines() if line]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="tiny-cpu-s3/score/scored/manifest.json")["Body"]
                          .read())
    assert len(rows) == manifest["pairs"] > 0
    assert manifest["world_size"] == 2 and len(manifest["shards"]) == 2, manifest
    for row in rows:
        assert row["delta"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"], abs=1e-5)
        assert {"prompt", "chosen", "rejected", "chosen_critique", "rejected_critique"} <= row.keys()

    # DPO used the scored δ: Dynamic Reward Scaling gave different β to the pairs of a batch.
    assert stages["dpo"]["metrics"]["beta/std"] > 0, stages["dpo"]["metrics"]

    # Conditions and stage times tell one story, in order: created, each stage started after the previous
    # one completed, Running turned False in the very pass that set Succeeded.
    created, running, succeeded = conditions["Created"], conditions["Running"], conditions["Succeeded"]
    assert (created["reason"], running["reason"], succeeded["reason"]) == (
        "JobAccepted", "Succeeded", "AllStagesSucceeded"), conditions
    assert _time(created["lastTransitionTime"]) < _time(succeeded["lastTransitionTime"]), conditions
    assert running["lastTransitionTime"] == succeeded["lastTransitionTime"] == status["completionTime"], conditions
    assert set(conditions) <= {"Created", "Running", "Restarting", "Succeeded"}, conditions
    if "Restarting" in conditions:  # only after a gang restart; it turned False when the new gang ran
        assert conditions["Restarting"]["status"] == "False", conditions
        assert (_time(created["lastTransitionTime"]) <= _time(conditions["Restarting"]["lastTransitionTime"])
                <= _time(succeeded["lastTransitionTime"])), conditions
    moments = [created["lastTransitionTime"], status["startTime"]]
    for stage in STAGES:
        moments += [stages[stage]["startTime"], stages[stage]["completionTime"]]
    moments.append(succeeded["lastTransitionTime"])
    assert [_time(m) for m in moments] == sorted(_time(m) for m in moments), moments

    # The job's events, in the order the operator sent them: exactly one lifecycle, stage after stage.
    events = json.loads(demo.run(dev_cluster, "kubectl", "get", "events", "-n", namespace, "-o", "json",
                                 "--field-selector", f"involvedObject.name={name}"))["items"]
    events.sort(key=_event_order)
    messages = " ".join(f"{e['reason']}: {e.get('message', '')}" for e in events)
    ours = [e for e in events if e["involvedObject"].get("kind") == "AlignmentJob" and e["reason"] in OPERATOR_REASONS]
    labels = [_label(e["reason"], e.get("message", "")) for e in ours]
    expected = ["Created", *[f"{what} {stage}" for stage in STAGES for what in ("StageStarted", "StageSucceeded")],
                "Succeeded"]
    assert [x for x in labels if not x.startswith(("Running", "GangRestarting"))] == expected, labels
    assert ours[0]["message"] == f"accepted: stages {', '.join(STAGES)}", ours[0]
    assert ours[-1]["message"] == f"stages {', '.join(STAGES)} succeeded", ours[-1]
    # `Running` says the job's phase became Running: when its first gang ran, and again only after a
    # gang restart (GangRestarting), always inside the restarted stage's window
    restarts = {stage: stages[stage]["restarts"] for stage in STAGES}
    if not any(restarts.values()):
        assert labels == [*expected[:2], "Running reward", *expected[2:]], labels
    for stage in STAGES:
        window = labels[labels.index(f"StageStarted {stage}"):labels.index(f"StageSucceeded {stage}")]
        assert labels.count(f"GangRestarting {stage}") == window.count(f"GangRestarting {stage}") == restarts[stage]
        assert labels.count(f"Running {stage}") == window.count(f"Running {stage}"), (stage, labels)
    transitions = [x.split()[0] for x in labels if x.startswith(("Running", "GangRestarting"))]
    assert "Running" in transitions and ("Running", "Running") not in zip(transitions, transitions[1:], strict=False), labels
    # each event was sent after the status write it reports (condition times are whole seconds)
    sent = {label: _time(e.get("eventTime") or e["firstTimestamp"]) for label, e in zip(labels, ours, strict=True)}
    assert sent["Created"] >= _time(created["lastTransitionTime"]), sent
    assert sent["Succeeded"] >= _time(succeeded["lastTransitionTime"]), sent
    for stage in STAGES:
        assert sent[f"StageStarted {stage}"] >= _time(stages[stage]["startTime"]), (stage, sent)
        assert sent[f"StageSucceeded {stage}"] >= _time(stages[stage]["completionTime"]), (stage, sent)

    # After the TTL the job and everything it owned are gone.
    wait_for(lambda: not json.loads(demo.run(dev_cluster, "kubectl", "get", "aj", "-n", namespace, "-o", "json"))
             ["items"], TTL_SECONDS + 90, interval=2, what="the job deleted after its TTL")
    wait_for(lambda: not _pods(dev_cluster, namespace, name), 90, interval=2, what="pods garbage-collected")
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "x") not in messages
