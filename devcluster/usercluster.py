"""Bring your own cluster: `make demo` and tests/e2e on a cluster of yours instead of the dev cluster.

    MMALIGN_KUBECONFIG=~/.kube/config MMALIGN_IMAGE=registry.example.com/mmalign:0.3.0 \\
    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=https://s3.example.com \\
    make demo        # or: .venv/bin/pytest tests/e2e -q

The variables (`from_env` reads them; docs/quickstart.md, "Bring your own cluster"):

- MMALIGN_KUBECONFIG: the kubeconfig of the cluster (its current context is used). It is the switch, and
  on purpose not KUBECONFIG: a shell's KUBECONFIG often points at a cluster that a test run must never
  touch, so naming the cluster again is the consent.
- MMALIGN_IMAGE: the project's image (the Dockerfile, pushed where the cluster pulls from), with a tag or
  a digest: the operator and every trainer pod run from it.
- MMALIGN_OPERATOR_IMAGE (optional): the Dockerfile's slim `operator` target for the operator's pod.
- AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (only for a non-AWS S3 server; it must answer
  both this machine, which uploads and checks, and the pods), AWS_DEFAULT_REGION (default us-east-1).
  They go into the job namespace's `s3-credentials` Secret, as the dev cluster's do.

Nothing is started or stopped on that cluster beyond what the demo or test creates: the chart release,
the bucket (demo.bucket(), created when missing), a namespace per test, the jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mmalign.devcluster import binaries

ENV_KUBECONFIG = "MMALIGN_KUBECONFIG"
ENV_IMAGE = "MMALIGN_IMAGE"
ENV_OPERATOR_IMAGE = "MMALIGN_OPERATOR_IMAGE"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class ImageRef:
    repository: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


def parse_image(ref: str, variable: str = ENV_IMAGE) -> ImageRef:
    """`registry:5000/team/mmalign:0.3.0` or `...@sha256:<64 hex>`; a bare name is refused (with
    `IfNotPresent`, an implicit `latest` runs whatever a node pulled once)."""
    ref = ref.strip()
    if "@" in ref:
        repository, digest = ref.split("@", 1)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"{variable}={ref!r}: the digest must be sha256:<64 hex digits>")
        return ImageRef(repository, digest=digest)
    name = ref.rsplit("/", 1)[-1]  # a registry's port (host:5000/...) is not a tag
    if ":" not in name or not name.split(":", 1)[1]:
        raise ValueError(
            f"{variable}={ref!r} has no tag: give one (e.g. {ref}:0.3.0) or a digest (@sha256:...)"
        )
    repository, tag = ref.rsplit(":", 1)
    return ImageRef(repository, tag=tag)


@dataclass(frozen=True)
class UserCluster:
    """What demo.py and tests/e2e need from a cluster, for one they did not start."""

    kubeconfig: Path
    image: ImageRef
    operator_image: ImageRef | None
    s3: dict[str, str]  # AWS_* for this machine's uploads and for the pods' Secret

    @property
    def s3_endpoint(self) -> str | None:
        return self.s3.get("AWS_ENDPOINT_URL")

    @property
    def s3_credentials(self) -> dict[str, str]:
        """boto3 keyword arguments."""
        return {
            "aws_access_key_id": self.s3["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.s3["AWS_SECRET_ACCESS_KEY"],
            "region_name": self.s3["AWS_DEFAULT_REGION"],
        }

    @property
    def env(self) -> dict[str, str]:
        """KUBECONFIG, PATH (the cached kubectl and helm first, as for the dev cluster), AWS_*."""
        dirs = [str(binaries.bin_dir()), sysconfig.get_path("scripts"), os.environ.get("PATH", "")]
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": os.pathsep.join(d for d in dirs if d), **self.s3}

    def helm_values(self) -> list[str]:
        """`helm install` arguments that point the chart's operator and trainer images at ours."""
        args = [
            "--set-string",
            f"image.repository={self.image.repository}",
            "--set-string",
            f"image.tag={self.image.tag}",
            "--set-string",
            f"image.digest={self.image.digest}",
        ]
        if self.operator_image:
            op = self.operator_image
            args += [
                "--set-string",
                f"operator.image.repository={op.repository}",
                "--set-string",
                f"operator.image.tag={op.tag}",
                "--set-string",
                f"operator.image.digest={op.digest}",
            ]
        return args

    def check_tools(self) -> None:
        """kubectl and helm, from the dev cluster's cache (`make binaries`) or the user's PATH."""
        missing = [tool for tool in ("kubectl", "helm") if shutil.which(tool, path=self.env["PATH"]) is None]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} not found in {binaries.bin_dir()} or on PATH: "
                "`make binaries` builds them, or install them"
            )

    def describe(self) -> str:
        return f"your cluster ({ENV_KUBECONFIG}={self.kubeconfig}, image {self.image})"


def from_env(environ: dict[str, str] | None = None) -> UserCluster | None:
    """The user's cluster when MMALIGN_KUBECONFIG is set, else None (the dev cluster is used)."""
    env = dict(os.environ) if environ is None else environ
    if not env.get(ENV_KUBECONFIG):
        return None
    kubeconfig = Path(env[ENV_KUBECONFIG]).expanduser()
    if not kubeconfig.is_file():
        raise ValueError(
            f"{ENV_KUBECONFIG}={env[ENV_KUBECONFIG]}: no such file (the kubeconfig of your cluster)"
        )
    if not env.get(ENV_IMAGE):
        raise ValueError(
            f"{ENV_KUBECONFIG} is set but {ENV_IMAGE} is not: give the project's image as your "
            "cluster pulls it, e.g. MMALIGN_IMAGE=registry.example.com/mmalign:0.3.0"
        )
    missing = [key for key in S3_KEYS if not env.get(key)]
    if missing:
        raise ValueError(
            f"{ENV_KUBECONFIG} is set but {', '.join(missing)} not: the S3 keys the demo uploads "
            "with and the pods read (plus AWS_ENDPOINT_URL for a non-AWS S3 server)"
        )
    s3 = {key: env[key] for key in S3_KEYS}
    s3["AWS_DEFAULT_REGION"] = env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    if env.get("AWS_ENDPOINT_URL"):
        s3["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
    operator = (
        parse_image(env[ENV_OPERATOR_IMAGE], ENV_OPERATOR_IMAGE) if env.get(ENV_OPERATOR_IMAGE) else None
    )
    return UserCluster(kubeconfig.absolute(), parse_image(env[ENV_IMAGE]), operator, s3)
