"""`mmalign operator` flags and the operator-wide defaults the chart passes in."""

from __future__ import annotations

import pytest

from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import BuildOptions, JobRef, build_pod, with_operator_defaults
from mmalign.operator.main import default_priority, parse_args

SPEC = {"model": {"uri": "builtin://tiny-text"}, "data": {"uri": "builtin://synthetic-colors"},
        "storage": {"uri": "s3://b/p/"}, "stages": {"reward": {}}}


def test_flags() -> None:
    args = parse_args(["-n", "a", "--namespace", "b", "--peering", "mm", "--metrics-port", "0"])
    assert args.namespace == ["a", "b"] and args.peering == "mm" and args.metrics_port == 0
    assert args.liveness_port == 8080 and args.log_format == "json" and args.priority is None
    assert parse_args([]).all_namespaces is False and parse_args(["-A"]).all_namespaces is True
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "a"])  # one scope or the other
    with pytest.raises(SystemExit):
        parse_args(["--resync-seconds", "30"])  # progress must reach the status within 30 s


def test_trainer_command_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_TRAINER_COMMAND", "python stub.py")
    assert parse_args([]).trainer_command == "python stub.py"


def test_earlier_replicas_have_higher_peering_priority() -> None:
    first = default_priority()
    import time

    time.sleep(0.01)
    assert default_priority() < first


def test_operator_defaults_fill_in_and_the_job_wins() -> None:
    defaults = {"schedulerName": "volcano", "nodeSelector": {"pool": "gpu", "zone": "a"},
                "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "X", "value": "default"}],
                "tolerations": [{"key": "gpu", "operator": "Exists"}], "priorityClassName": "low"}
    own = {**SPEC, "podTemplate": {"nodeSelector": {"zone": "b"}, "env": [{"name": "X", "value": "mine"}],
                                   "priorityClassName": "high"}}
    merged = with_operator_defaults(own, "registry/trainer:1", defaults)
    assert merged["image"] == "registry/trainer:1"
    template = merged["podTemplate"]
    assert template["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    assert template["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "X", "value": "mine"}]
    assert template["schedulerName"] == "volcano" and template["priorityClassName"] == "high"
    assert template["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert with_operator_defaults({**SPEC, "image": "mine:2"}, "registry/trainer:1", None)["image"] == "mine:2"
    spec = AlignmentJobSpec.model_validate(merged)
    pod = build_pod(JobRef("j", "ns", "u", spec), "reward", 0, 0, BuildOptions())
    assert pod["spec"]["schedulerName"] == "volcano" and pod["spec"]["containers"][0]["image"] == "registry/trainer:1"
