"""Bring your own cluster (devcluster/usercluster.py): which variables switch `make demo` and tests/e2e to
the user's cluster, and the clear errors when one is missing or wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.devcluster import demo, usercluster

DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\n")
    return path


def env(kubeconfig: Path, **extra: str) -> dict[str, str]:
    return {
        "MMALIGN_KUBECONFIG": str(kubeconfig),
        "MMALIGN_IMAGE": "registry.example.com:5000/ml/mmalign:0.3.0",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        **extra,
    }


def test_without_mmalign_kubeconfig_the_dev_cluster_is_used() -> None:
    # KUBECONFIG alone is not consent: a shell's KUBECONFIG may point at a production cluster.
    assert usercluster.from_env({"KUBECONFIG": "/etc/kubeconfig", "MMALIGN_IMAGE": "x:1"}) is None


def test_image_references() -> None:
    ref = usercluster.parse_image("registry.example.com:5000/ml/mmalign:0.3.0")
    assert (ref.repository, ref.tag, ref.digest) == ("registry.example.com:5000/ml/mmalign", "0.3.0", "")
    ref = usercluster.parse_image(f"ghcr.io/mmalign/mmalign@{DIGEST}")
    assert (ref.repository, ref.tag, ref.digest) == ("ghcr.io/mmalign/mmalign", "", DIGEST)
    assert str(ref) == f"ghcr.io/mmalign/mmalign@{DIGEST}"
    with pytest.raises(ValueError, match=r"MMALIGN_IMAGE='registry.example.com:5000/mmalign' has no tag"):
        usercluster.parse_image("registry.example.com:5000/mmalign")
    with pytest.raises(ValueError, match="sha256:<64 hex digits>"):
        usercluster.parse_image("mmalign@sha256:abc")


def test_user_cluster_from_env(kubeconfig: Path) -> None:
    user = usercluster.from_env(env(kubeconfig, AWS_ENDPOINT_URL="http://minio:9000"))
    assert user is not None
    assert user.env["KUBECONFIG"] == str(kubeconfig)
    assert user.env["AWS_DEFAULT_REGION"] == "us-east-1" and user.s3_endpoint == "http://minio:9000"
    assert user.s3_credentials == {
        "aws_access_key_id": "id",
        "aws_secret_access_key": "secret",
        "region_name": "us-east-1",
    }
    # The Secret the pods read gets exactly the S3 keys the user gave (no endpoint on AWS itself).
    assert demo.s3_env(user) == {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    on_aws = usercluster.from_env(env(kubeconfig))
    assert on_aws is not None and on_aws.s3_endpoint is None and "AWS_ENDPOINT_URL" not in demo.s3_env(on_aws)


def test_helm_values_point_operator_and_trainer_at_the_image(kubeconfig: Path) -> None:
    user = usercluster.from_env(env(kubeconfig, MMALIGN_OPERATOR_IMAGE=f"registry.example.com/op@{DIGEST}"))
    assert user is not None
    values = dict(arg.split("=", 1) for arg in user.helm_values() if arg != "--set-string")
    assert values == {
        "image.repository": "registry.example.com:5000/ml/mmalign",
        "image.tag": "0.3.0",
        "image.digest": "",
        "operator.image.repository": "registry.example.com/op",
        "operator.image.tag": "",
        "operator.image.digest": DIGEST,
    }


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("MMALIGN_IMAGE", "MMALIGN_KUBECONFIG is set but MMALIGN_IMAGE is not"),
        ("AWS_SECRET_ACCESS_KEY", "MMALIGN_KUBECONFIG is set but AWS_SECRET_ACCESS_KEY not"),
    ],
)
def test_missing_variables_are_named(kubeconfig: Path, drop: str, message: str) -> None:
    variables = env(kubeconfig)
    del variables[drop]
    with pytest.raises(ValueError, match=message):
        usercluster.from_env(variables)


def test_missing_kubeconfig_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MMALIGN_KUBECONFIG=.*nope: no such file"):
        usercluster.from_env(env(tmp_path / "nope"))


def test_example_job_in_another_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_S3_BUCKET", "team-bucket")
    job = demo.example_job()
    uris = [job["spec"]["model"]["uri"], job["spec"]["data"]["uri"], job["spec"]["storage"]["uri"]]
    assert all(uri.startswith("s3://team-bucket/") for uri in uris), uris
    assert demo.data_prefix() == "s3://team-bucket/demo/data/synthetic-colors/"
    assert uris[0] == demo.model_prefix() and uris[1].startswith(demo.data_prefix())


def test_missing_tools_are_named(kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(usercluster.sysconfig, "get_path", lambda _name: str(tmp_path))
    user = usercluster.from_env(env(kubeconfig))
    assert user is not None
    with pytest.raises(ValueError, match=r"kubectl and helm not found in .*empty-cache/bin or on PATH"):
        user.check_tools()
