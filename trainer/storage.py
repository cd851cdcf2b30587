"""Object storage for everything the trainer reads and writes: `s3://bucket/key`, `file:///abs/path`
and plain local paths, behind one set of functions. This module holds URIs, configuration, the one S3
client of the process, the retry policy and small objects (read/write/exists/list/delete); moving whole
files and folders (multipart, checksums, parallel transfers) is `transfer.py`, which builds on these.

    from mmalign.trainer import storage
    storage.configure(endpoint=spec.storage.endpoint, region=spec.storage.region,
                      path_style=spec.storage.path_style)        # once per process (optional)
    for line in storage.open_lines("s3://bucket/data/pairs.jsonl"): ...
    storage.write_json("s3://bucket/run/score/manifest.json", {...})

S3 client: endpoint from `configure(endpoint=...)` or `AWS_ENDPOINT_URL`; keys from
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (or the pod's cloud identity through the SDK's chain);
region from `configure(region=...)` or `AWS_DEFAULT_REGION`/`AWS_REGION`; path-style addressing by
default. Credentials are never logged or put into an error message.

Transient errors (connection refused/reset, timeouts, 5xx, throttling) are retried with exponential
backoff for `MMALIGN_STORAGE_RETRY_SECONDS` (default 60) in total; then, and for any permanent error
(missing bucket, access denied), a `StorageError` is raised. Stages map it to ExitCode.STORAGE_ERROR,
which the operator treats as retryable.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

T = TypeVar("T")

# Multipart: parts of this size, this many in flight per file. S3 allows at most 10,000 parts, so the
# chunk grows for files over 10,000 x 64 MiB (see transfer._chunk_size_for). They are set here, by
# configure(), because the S3 client's connection pool is sized from the concurrency too.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_CONCURRENCY = 8
_MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum size for every part but the last


class StorageError(Exception):
    """Storage failed after retries, or permanently (no such bucket, access denied, bad checksum)."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "s3" (bucket + key) or "file" (an absolute local `path`)."""

    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else Path(self.path).as_uri()


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `relative` is its name below the listed prefix; `sha256` is hex, when known."""

    uri: str
    relative: str
    size: int
    sha256: str | None = None


@dataclass
class _Settings:
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    concurrency: int = DEFAULT_CONCURRENCY


_settings = _Settings()
_client_lock = threading.Lock()
_client: Any = None
_client_key: tuple[Any, ...] | None = None


def configure(
    endpoint: str | None = None,
    region: str | None = None,
    path_style: bool = True,
    chunk_bytes: int | None = None,
    concurrency: int | None = None,
) -> None:
    """Set the S3 endpoint/region/addressing (the job's `storage:` block) and transfer.py's part size and
    parallelism.

    `endpoint`/`region` left None fall back to AWS_ENDPOINT_URL / AWS_DEFAULT_REGION.
    """
    global _client
    with _client_lock:
        _settings.endpoint = endpoint
        _settings.region = region
        _settings.path_style = path_style
        if chunk_bytes is not None:
            _settings.chunk_bytes = max(int(chunk_bytes), _MIN_PART_BYTES)
        if concurrency is not None:
            _settings.concurrency = max(1, int(concurrency))
        _client = None


def configure_from_spec(storage_spec: Any) -> None:
    """`configure` from a `config.StorageSpec` (duck-typed: endpoint, region, path_style)."""
    configure(endpoint=storage_spec.endpoint, region=storage_spec.region, path_style=storage_spec.path_style)


# ------------------------------------------------------------------------------------------ URIs


def parse(uri: str | os.PathLike[str]) -> Location:
    """`s3://bucket/key`, `file:///abs/path` (or `file://./rel`), or a plain path."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise StorageError(f"{text}: an s3:// URI needs a bucket (s3://bucket/key)")
        return Location("s3", bucket=parsed.netloc, key=parsed.path.lstrip("/"))
    if text.startswith("file://"):
        rest = unquote(text[len("file://"):])
        # file:///abs -> /abs ; file://./rel and file://rel -> relative to the working directory
        path = rest if rest.startswith("/") else os.path.join(os.getcwd(), rest)
        return Location("file", path=_keep_slash(os.path.abspath(path), rest))
    if "://" in text:
        raise StorageError(f"{text}: unsupported URI scheme (use s3://, file:// or a local path)")
    return Location("file", path=_keep_slash(os.path.abspath(text), text))


def _keep_slash(path: str, original: str) -> str:
    # abspath drops a trailing slash; prefixes keep it so that join() behaves the same for both schemes.
    return path + "/" if original.endswith("/") and not path.endswith("/") else path


def join(prefix: str, *parts: str) -> str:
    """Join URI segments with single slashes: join("s3://b/run/", "ckpt", "x") == "s3://b/run/ckpt/x"."""
    out = prefix
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def is_remote(uri: str) -> bool:
    return os.fspath(uri).startswith("s3://")


def local_path(uri: str) -> Path:
    """The local path of a file:// URI or plain path (StorageError for s3://)."""
    location = parse(uri)
    if location.scheme != "file":
        raise StorageError(f"{uri}: not a local path")
    return Path(location.path)


# ------------------------------------------------------------------------------------------ S3 client


def _s3() -> Any:
    """The process's S3 client, rebuilt whenever the endpoint/region it would use changes: `configure`
    or the AWS_* environment may change after a first call (tests, the demo), and a client cached
    with an old endpoint would silently talk to a server that is gone."""
    global _client, _client_key
    endpoint = _settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = _settings.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    key = (endpoint, region, _settings.path_style, _settings.concurrency)
    with _client_lock:
        if _client is None or _client_key != key:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": "path" if _settings.path_style else "virtual"},
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=max(16, 2 * _settings.concurrency),
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported",
            )
            # Keys come from the environment / the SDK's provider chain; they never pass through here.
            _client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
            _client_key = key
        return _client


_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "SlowDown",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "503", "500", "502", "504",
}


def _is_transient(error: BaseException) -> bool:
    """Connection trouble, timeouts, 5xx and throttling: worth retrying. Follows wrapped causes
    (boto3's transfer manager re-raises as S3UploadFailedError with the real error as context)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        if isinstance(current, EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError
                      | ReadTimeoutError | ConnectionError | TimeoutError):
            return True
        if isinstance(current, ClientError):
            code = str(current.response.get("Error", {}).get("Code", ""))
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code in _TRANSIENT_CODES or status >= 500
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _retry_seconds() -> float:
    return float(os.environ.get("MMALIGN_STORAGE_RETRY_SECONDS", "60"))


def _with_retries(what: str, fn: Callable[[], T]) -> T:
    """Run `fn`, retrying transient S3 errors with jittered exponential backoff; else StorageError."""
    deadline = time.monotonic() + _retry_seconds()
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - classified below, re-raised as StorageError
            if not _is_transient(error) or time.monotonic() + delay > deadline:
                raise StorageError(f"{what}: {_describe(error)}") from error
            log.warning("storage: %s failed (%s), retry %d in %.1fs", what, _describe(error), attempt, delay)
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            delay = min(delay * 2, 10.0)


def _describe(error: BaseException) -> str:
    # botocore messages name the operation and the server's error code; never the keys.
    return f"{type(error).__name__}: {error}"


def _not_found(error: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")
    return False


# ------------------------------------------------------------------------------------------ reading


def exists(uri: str) -> bool:
    location = parse(uri)
    if location.scheme == "file":
        return os.path.exists(location.path)

    def head() -> bool:
        try:
            _s3().head_object(Bucket=location.bucket, Key=location.key)
            return True
        except Exception as error:
            if _not_found(error):
                return False
            raise

    return _with_retries(f"head {uri}", head)


def read_bytes(uri: str) -> bytes:
    """A small object's bytes. FileNotFoundError when it does not exist."""
    location = parse(uri)
    if location.scheme == "file":
        with open(location.path, "rb") as f:
            return f.read()

    def get() -> bytes:
        try:
            body = _s3().get_object(Bucket=location.bucket, Key=location.key)["Body"]
            return body.read()
        except Exception as error:
            if _not_found(error):
                raise FileNotFoundError(uri) from error
            raise

    try:
        return _with_retries(f"read {uri}", get)
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise error.__cause__ from None
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@contextlib.contextmanager
def open_lines(uri: str) -> Iterator[Iterator[str]]:
    """Stream a text object line by line (newline kept), without reading it whole into memory.

        with storage.open_lines(uri) as lines:
            for number, line in enumerate(lines, 1): ...

    S3 objects are streamed from one GET; a connection failure mid-stream raises StorageError.
    """
    location = parse(uri)
    if location.scheme == "file":
        if not os.path.exists(location.path):
            raise FileNotFoundError(uri)
        with open(location.path, encoding="utf-8") as f:
            yield iter(f)
        return

    def get() -> Any:
        try:
            return _s3().get_object(Bucket=location.bucket, Key=location.key)["Body"]
        except Exception as error:
            if _not_found(error):
                raise FileNotFoundError(uri) from error
            raise

    try:
        body = _with_retries(f"open {uri}", get)
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise error.__cause__ from None
        raise
    try:
        yield _stream_lines(uri, body)
    finally:
        body.close()


def _stream_lines(uri: str, body: Any) -> Iterator[str]:
    try:
        for raw in body.iter_lines(keepends=True):
            yield raw.decode("utf-8")
    except UnicodeDecodeError:
        raise
    except Exception as error:  # noqa: BLE001
        raise StorageError(f"reading {uri}: {_describe(error)}") from error


def list_prefix(uri: str) -> list[ObjectInfo]:
    """Every object below a prefix (recursively), sorted by name; [] when there is none.

    For S3 the prefix is used as given ("run/ckpt" also matches "run/ckpt2/x"); end it with "/" to
    list a folder. Local prefixes are folders.
    """
    location = parse(uri)
    if location.scheme == "file":
        root = Path(location.path)
        if not root.is_dir():
            return []
        out = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")):
            relative = path.relative_to(root).as_posix()
            out.append(ObjectInfo(path.as_uri(), relative, path.stat().st_size))
        return out

    def list_all() -> list[ObjectInfo]:
        paginator = _s3().get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
            for item in page.get("Contents", []):
                relative = item["Key"][len(location.key):].lstrip("/")
                found.append(ObjectInfo(f"s3://{location.bucket}/{item['Key']}", relative, item["Size"]))
        return sorted(found, key=lambda info: info.relative)

    return _with_retries(f"list {uri}", list_all)


# ------------------------------------------------------------------------------------------ writing


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object at once (local files atomically: temp file + rename)."""
    location = parse(uri)
    if location.scheme == "file":
        _atomic_local_write(location.path, data)
        return
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    _with_retries(
        f"write {uri}",
        lambda: _s3().put_object(Bucket=location.bucket, Key=location.key, Body=data, ChecksumSHA256=digest),
    )


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def put_if_absent(uri: str, data: bytes) -> bool:
    """Create the object only if nothing is there yet (S3 `If-None-Match: *`). True if this call wrote it."""
    location = parse(uri)
    if location.scheme == "file":
        os.makedirs(os.path.dirname(location.path), exist_ok=True)
        tmp = _write_temp_beside(location.path, data)
        try:
            os.link(tmp, location.path)  # atomic, and fails if the target exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    from botocore.exceptions import ClientError

    def put() -> bool:
        try:
            _s3().put_object(Bucket=location.bucket, Key=location.key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    return _with_retries(f"conditional write {uri}", put)


def delete(uri: str) -> None:
    """Delete one object (missing is fine)."""
    location = parse(uri)
    if location.scheme == "file":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(location.path)
        return
    _with_retries(f"delete {uri}", lambda: _s3().delete_object(Bucket=location.bucket, Key=location.key))


def delete_prefix(uri: str) -> int:
    """Delete every object below a prefix; returns how many."""
    location = parse(uri)
    if location.scheme == "file":
        root = Path(location.path)
        if not root.exists():
            return 0
        count = sum(1 for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root, ignore_errors=True)
        return count
    objects = list_prefix(uri)
    for start in range(0, len(objects), 1000):
        batch = [{"Key": parse(info.uri).key} for info in objects[start:start + 1000]]

        def delete_batch(batch: list[dict[str, str]] = batch) -> Any:
            return _s3().delete_objects(Bucket=location.bucket, Delete={"Objects": batch, "Quiet": True})

        _with_retries(f"delete {uri}", delete_batch)
    return len(objects)


# ------------------------------------------------------------------------------------------ helpers


def _write_temp_beside(path: str, data: bytes) -> str:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _atomic_local_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _write_temp_beside(path, data)
    os.replace(tmp, path)


def open_bytes(uri: str) -> io.BytesIO:
    """A small object as a seekable file object (images, JSON, torch.load)."""
    return io.BytesIO(read_bytes(uri))
