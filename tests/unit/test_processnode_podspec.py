"""Pod spec -> local process translation (devcluster/podspec.py): env, volumes, path rewriting."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.devcluster import podspec
from mmalign.devcluster.podspec import ContainerConfigError, container_env, expand, rewrite_path

POD = {
    "metadata": {"name": "job-reward-0-1", "namespace": "ml", "uid": "u-1",
                 "labels": {"mmalign.io/job": "j"}, "annotations": {"note": "x"}},
    "spec": {"nodeName": "process-node-1", "serviceAccountName": "trainer",
             "volumes": [{"name": "spec", "configMap": {"name": "job"}}, {"name": "host", "hostPath": {"path": "/data"}},
                         {"name": "scratch", "emptyDir": {}}],
             "containers": [{"name": "main", "image": "img", "command": ["mmalign"]}]},
    "status": {"podIP": "127.5.0.2", "podIPs": [{"ip": "127.5.0.2"}], "hostIP": "127.0.0.1"},
}
SECRETS = {"s3": {"key": b"AKIA", "secret": b"shh"}}
CONFIGMAPS = {"job": {"spec.yaml": b"steps: 1\n", "mode": b"fast"}}


def env_of(*env, env_from=(), container=None, base=None):
    spec = {"name": "main", "env": list(env), "envFrom": list(env_from), **(container or {})}
    return container_env(POD, spec, SECRETS, CONFIGMAPS, {"cpu": "8", "memory": "32Gi"}, base)


@pytest.mark.parametrize(("text", "expected"), [
    ("$(A)-$(B)", "1-two"), ("$(MISSING)", "$(MISSING)"), ("$$(A)", "$(A)"), ("a$$b", "a$b"), ("$A", "$A"),
])
def test_expand_like_the_kubelet(text, expected):
    assert expand(text, {"A": "1", "B": "two"}) == expected


@pytest.mark.parametrize(("path", "value"), [
    ("metadata.name", "job-reward-0-1"), ("metadata.namespace", "ml"), ("metadata.uid", "u-1"),
    ("metadata.labels['mmalign.io/job']", "j"), ("metadata.annotations['note']", "x"),
    ("spec.nodeName", "process-node-1"), ("spec.serviceAccountName", "trainer"), ("status.podIP", "127.5.0.2"),
    ("status.hostIP", "127.0.0.1"), ("status.podIPs", "127.5.0.2"),
])
def test_field_refs(path, value):
    assert env_of({"name": "V", "valueFrom": {"fieldRef": {"fieldPath": path}}}) == {"V": value}


def test_secret_configmap_resource_refs_env_from_and_expansion():
    got = env_of(
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "job", "key": "mode"}}},
        {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
        {"name": "URL", "value": "s3://$(MODE)/$(HOME)"},
        env_from=[{"secretRef": {"name": "s3"}, "prefix": "AWS_"}],
        container={"resources": {"requests": {"memory": "1Gi"}}}, base={"HOME": "/pods/x/home"})
    assert got == {"AWS_key": "AKIA", "AWS_secret": "shh", "KEY": "AKIA", "MODE": "fast", "CPUS": "8",
                   "MEM_MI": "1024", "URL": "s3://fast//pods/x/home"}


@pytest.mark.parametrize("ref", [
    {"secretKeyRef": {"name": "s3", "key": "missing"}}, {"secretKeyRef": {"name": "nope", "key": "k"}},
    {"configMapKeyRef": {"name": "nope", "key": "k"}}, {"fieldRef": {"fieldPath": "spec.bogus"}},
])
def test_missing_required_refs_are_container_config_errors(ref):
    with pytest.raises(ContainerConfigError):
        env_of({"name": "V", "valueFrom": ref})


MOUNTS = [("/etc/job/deep", "/p/volumes/deep"), ("/etc/job", "/p/volumes/spec"), ("/data", "/data")]


@pytest.mark.parametrize(("value", "expected"), [
    ("/etc/job", "/p/volumes/spec"),
    ("/etc/job/spec.yaml", "/p/volumes/spec/spec.yaml"),
    ("/etc/job/deep/x", "/p/volumes/deep/x"),  # the longest (nested) mount wins
    ("--config=/etc/job/spec.yaml", "--config=/p/volumes/spec/spec.yaml"),
    ("CFG=/etc/job", "CFG=/p/volumes/spec"),
    ("/etc/jobs/other", "/etc/jobs/other"),  # a prefix of a name is not a path prefix
    ("relative/etc/job", "relative/etc/job"),
    ("s3://bucket/etc/job", "s3://bucket/etc/job"),
])
def test_rewrite_path(value, expected):
    assert rewrite_path(value, MOUNTS) == expected


def test_mounts_command_line_and_working_dir(tmp_path: Path):
    container = {"name": "main", "command": ["mmalign", "train"], "args": ["--spec=$(SPEC)", "/etc/job/spec.yaml"],
                 "workingDir": "/workspace",
                 "volumeMounts": [{"name": "spec", "mountPath": "/etc/job/"}, {"name": "host", "mountPath": "/in"},
                                  {"name": "scratch", "mountPath": "/scratch", "subPath": "a"}]}
    mounts = podspec.container_mounts(POD, container, tmp_path)
    assert mounts == [("/etc/job", f"{tmp_path}/volumes/spec"), ("/scratch", f"{tmp_path}/volumes/scratch/a"),
                      ("/in", "/data")]
    argv = podspec.command_line(container, {"SPEC": "/etc/job/spec.yaml"}, mounts)
    assert argv == ["mmalign", "train", f"--spec={tmp_path}/volumes/spec/spec.yaml",
                    f"{tmp_path}/volumes/spec/spec.yaml"]
    assert podspec.working_dir(container, mounts, tmp_path) == tmp_path / "rootfs/workspace"
    assert podspec.working_dir({"workingDir": "/scratch/x"}, mounts, tmp_path) == tmp_path / "volumes/scratch/a/x"
    assert podspec.working_dir({"workingDir": str(tmp_path)}, mounts, tmp_path) == tmp_path
    assert podspec.working_dir({}, mounts, tmp_path) == tmp_path / "work"


def test_a_container_without_command_cannot_run():
    with pytest.raises(ContainerConfigError, match="cannot run the image's entrypoint"):
        podspec.command_line({"name": "c", "image": "busybox", "args": ["x"]}, {}, [])


def test_volume_files():
    cm = podspec.volume_files(POD, {"name": "v", "configMap": {"name": "job", "items": [
        {"key": "spec.yaml", "path": "conf/job.yaml", "mode": 0o600}]}}, SECRETS, CONFIGMAPS)
    assert cm == [podspec.VolumeFile("conf/job.yaml", b"steps: 1\n", 0o600)]
    secret = podspec.volume_files(POD, {"name": "v", "secret": {"secretName": "s3"}}, SECRETS, CONFIGMAPS)
    assert [f.path for f in secret] == ["key", "secret"]
    projected = podspec.volume_files(POD, {"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "job", "items": [{"key": "mode", "path": "mode"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}},
        SECRETS, CONFIGMAPS)
    assert projected[0].token_audience == "" and projected[0].token_seconds == 3607
    assert [(f.path, f.content) for f in projected[1:]] == [("mode", b"fast"), ("namespace", b"ml")]
    assert podspec.volume_files(POD, {"name": "v", "emptyDir": {}}, SECRETS, CONFIGMAPS) == []
    assert podspec.volume_files(POD, {"name": "v", "secret": {"secretName": "x", "optional": True}}, {}, {}) == []
    with pytest.raises(ContainerConfigError, match="secret 'x'"):
        podspec.volume_files(POD, {"name": "v", "secret": {"secretName": "x"}}, {}, {})


def test_decode_data():
    assert podspec.decode_data({"kind": "Secret", "data": {"k": "aGk="}}) == {"k": b"hi"}
    assert podspec.decode_data({"kind": "ConfigMap", "data": {"k": "hi"}, "binaryData": {"b": "AAE="}}) == \
        {"k": b"hi", "b": b"\x00\x01"}


def test_paths_inside_the_project_environment_are_never_rewritten() -> None:
    """A CI clone under /tmp with the chart's emptyDir at /tmp: the venv's python must stay itself."""
    import sys

    python = str(Path(sys.prefix).resolve() / "bin" / "python3")
    mounts = [("/tmp", "/pods/p1/volumes/tmp"), (python.rsplit("/", 2)[0], "/pods/p1/volumes/venv")]
    assert podspec.rewrite_path(python, mounts) == python
    assert podspec.rewrite_path("/tmp/elsewhere/x", mounts[:1]) == "/pods/p1/volumes/tmp/elsewhere/x"
