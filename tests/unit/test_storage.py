"""trainer/storage.py and trainer/transfer.py against local paths, file:// URIs and a real S3 server
(SeaweedFS weed mini)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mmalign.trainer import s3client, storage, transfer
from tests.s3_server import S3Server, require_weed


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    require_weed()
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=4)
    yield server
    s3client.configure()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def test_parse_and_join(tmp_path: Path) -> None:
    assert storage.parse("s3://b/k/x").bucket == "b"
    assert storage.parse("s3://b/k/x").key == "k/x"
    assert storage.parse("file:///abs/p/").path == "/abs/p/"
    assert storage.parse("rel/x").path == os.path.join(os.getcwd(), "rel/x")
    assert storage.parse("file://./runs/").path == os.path.join(os.getcwd(), "runs") + "/"
    assert storage.join("s3://b/run/", "ckpt/", "/x") == "s3://b/run/ckpt/x"
    with pytest.raises(storage.StorageError, match="unsupported"):
        storage.parse("gs://b/x")


def _roundtrip(prefix: str, workdir: Path) -> None:
    storage.write_json(storage.join(prefix, "a/m.json"), {"x": 1})
    assert storage.read_json(storage.join(prefix, "a/m.json")) == {"x": 1}
    storage.write_text(storage.join(prefix, "a/lines.jsonl"), "one\ntwo\nthree")
    with storage.open_lines(storage.join(prefix, "a/lines.jsonl")) as lines:
        assert [line.rstrip("\n") for line in lines] == ["one", "two", "three"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(prefix, "missing"))
    with pytest.raises(FileNotFoundError):
        with storage.open_lines(storage.join(prefix, "missing")):
            pass
    assert not storage.exists(storage.join(prefix, "missing"))

    big = workdir / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 123))  # 3 parts of 5 MiB when remote
    info = transfer.upload_file(big, storage.join(prefix, "b/big.bin"))
    assert info.size == big.stat().st_size and info.sha256 == transfer.file_sha256(big)
    (workdir / "tree/sub").mkdir(parents=True)
    (workdir / "tree/x.txt").write_text("x")
    (workdir / "tree/sub/y.txt").write_text("yy")
    transfer.upload_folder(workdir / "tree", storage.join(prefix, "b/tree/"))
    listed = storage.list_prefix(storage.join(prefix, "b/"))
    assert [o.relative for o in listed] == ["big.bin", "tree/sub/y.txt", "tree/x.txt"]

    out = workdir / "down"
    paths = transfer.download_prefix(storage.join(prefix, "b/"), out, checksums={"big.bin": info.sha256})
    assert len(paths) == 3 and (out / "big.bin").read_bytes() == big.read_bytes()
    assert (out / "tree/sub/y.txt").read_text() == "yy"
    with pytest.raises(storage.StorageError, match="sha256"):
        transfer.download_file(storage.join(prefix, "b/tree/x.txt"), workdir / "z", sha256="0" * 64)
    assert not (workdir / "z").exists()

    assert storage.put_if_absent(storage.join(prefix, "lock"), b"first")
    assert not storage.put_if_absent(storage.join(prefix, "lock"), b"second")
    assert storage.read_bytes(storage.join(prefix, "lock")) == b"first"

    storage.delete(storage.join(prefix, "lock"))
    storage.delete(storage.join(prefix, "lock"))  # missing is fine
    assert storage.delete_prefix(storage.join(prefix, "b/")) == 3
    assert storage.list_prefix(storage.join(prefix, "b/")) == []


def test_local_paths(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "store") + "/", tmp_path)


def test_file_uris(tmp_path: Path) -> None:
    _roundtrip((tmp_path / "store").as_uri() + "/", tmp_path)


def test_s3(s3: S3Server, tmp_path: Path) -> None:
    _roundtrip(s3.uri("roundtrip/"), tmp_path)
    # the multipart upload really was multipart and its composite checksum was verified
    client = s3.client()
    transfer.upload_file(_file(tmp_path / "f.bin", 6 * 1024 * 1024), s3.uri("mp/f.bin"))
    head = client.head_object(Bucket=s3.bucket, Key="mp/f.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-2")


def test_s3_errors_are_storage_errors(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(storage.StorageError, match="NoSuchBucket|not exist|404"):
        storage.list_prefix("s3://no-such-bucket-here/x/")
    # unreachable endpoint: retried with backoff for MMALIGN_STORAGE_RETRY_SECONDS, then StorageError
    monkeypatch.setenv("MMALIGN_STORAGE_RETRY_SECONDS", "2")
    s3client.configure(endpoint="http://127.0.0.1:9", chunk_bytes=5 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="Could not connect") as error:
        storage.write_bytes(s3.uri("x"), b"1")
    assert time.monotonic() - started < 30
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(error.value)
    s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=4)


def test_refusals_are_permanent_at_once(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real server: no such bucket, and keys it does not accept, fail at once (no retries) as
    StoragePermanentError naming the bucket; the secret never appears in the message."""
    monkeypatch.setenv("MMALIGN_STORAGE_RETRY_SECONDS", "30")
    started = time.monotonic()
    with pytest.raises(storage.StoragePermanentError) as missing:
        storage.read_bytes("s3://no-such-bucket-here/x.json")
    assert missing.value.no_such_bucket and missing.value.bucket == "no-such-bucket-here"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=4)  # a new client, with the wrong key
    try:
        with pytest.raises(storage.StoragePermanentError) as denied:
            storage.write_bytes(s3.uri("denied.json"), b"{}")
    finally:
        monkeypatch.undo()
        s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=4)
    assert denied.value.bucket == s3.bucket and not denied.value.no_such_bucket, denied.value
    assert "wrong-secret-value" not in str(denied.value)
    assert time.monotonic() - started < 20


def test_a_write_waits_out_an_s3_outage(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server goes away and comes back (a restarted S3 gateway): the write retries and lands."""
    monkeypatch.setenv("MMALIGN_STORAGE_RETRY_SECONDS", "120")
    s3client.configure(chunk_bytes=5 * 1024 * 1024, concurrency=4)
    s3.stop()
    back = threading.Timer(2.0, s3.start)
    back.start()
    try:
        started = time.monotonic()
        storage.write_bytes(s3.uri("outage/payload"), b"after the outage")
        waited = time.monotonic() - started
    finally:
        back.join()
    assert waited >= 2.0  # it really was down, and the write was retried until it came back
    assert storage.read_bytes(s3.uri("outage/payload")) == b"after the outage"


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_client_follows_a_changed_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that used one S3 server and then another (the demo after a test, a test after a test)
    must talk to the new one: the cached client is rebuilt when AWS_ENDPOINT_URL changes."""
    s3client.configure()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    first = s3client.client()
    assert first.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert s3client.client().meta.endpoint_url == "http://127.0.0.1:10"
    assert s3client.client() is s3client.client()  # unchanged settings: the same client
