"""`mmalign operator` flags and the operator-wide defaults the chart passes in."""

from __future__ import annotations

import pytest

from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator.builders import BuildOptions, JobRef, build_pod, with_operator_defaults
from mmalign.operator.main import default_priority, parse_args, trainer_security_contexts

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


def test_trainer_pods_get_the_security_contexts_and_a_job_overrides_them() -> None:
    """The chart's trainer.podSecurityContext / trainer.securityContext are the operator's own pod's: a
    read-only root gets an emptyDir at /tmp (HOME and work dir of the image), and a job's podTemplate
    wins key by key."""
    pod_security = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    container_security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                          "capabilities": {"drop": ["ALL"]}}
    options = BuildOptions(pod_security_context=pod_security, security_context=container_security)
    job = JobRef("j", "ns", "u", AlignmentJobSpec.model_validate(SPEC))
    pod = build_pod(job, "reward", 0, 0, options)
    (trainer,) = pod["spec"]["containers"]
    assert pod["spec"]["securityContext"] == pod_security and trainer["securityContext"] == container_security
    assert {"name": "tmp", "mountPath": "/tmp"} in trainer["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["spec"]["volumes"]
    own = {**SPEC, "podTemplate": {"spec": {
        "securityContext": {"runAsUser": 2000},
        "containers": [{"name": "trainer", "securityContext": {"readOnlyRootFilesystem": False}}]}}}
    pod = build_pod(JobRef("j", "ns", "u", AlignmentJobSpec.model_validate(own)), "reward", 0, 0, options)
    assert pod["spec"]["securityContext"] == {**pod_security, "runAsUser": 2000}
    assert pod["spec"]["containers"][0]["securityContext"] == {**container_security, "readOnlyRootFilesystem": False}
    # Without the values (an operator started by hand) the pod has none, as before.
    plain = build_pod(job, "reward", 0, 0, BuildOptions())
    assert "securityContext" not in plain["spec"] and "securityContext" not in plain["spec"]["containers"][0]
    assert "tmp" not in {v["name"] for v in plain["spec"]["volumes"]}


def test_a_bad_security_context_value_stops_the_operator_naming_it() -> None:
    assert trainer_security_contexts({}) == (None, None)
    with pytest.raises(SystemExit, match=r"trainer\.securityContext.*\n.*runAsUsr: unknown field"):
        trainer_security_contexts({"MMALIGN_TRAINER_SECURITY_CONTEXT": '{"runAsUsr": 1}'})
    with pytest.raises(SystemExit, match=r"trainer\.podSecurityContext\) is not JSON"):
        trainer_security_contexts({"MMALIGN_TRAINER_POD_SECURITY_CONTEXT": "{runAsUser: 1}"})
