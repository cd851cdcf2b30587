"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mmalign.trainer import s3client
from tests.s3_server import S3Server, require_weed


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`s3://<bucket>` on a real S3 server (SeaweedFS) of the module's own, with the trainer's S3 client
    pointed at it for the module's tests; the environment is restored afterwards."""
    require_weed()
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3client.configure()
    yield f"s3://{server.bucket}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3client.configure()
    server.stop()
