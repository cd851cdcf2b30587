"""Object storage for everything the trainer reads and writes: `s3://bucket/key`, `file:///abs/path`
and plain local paths, behind one set of functions. This module holds URIs and small objects
(read/write/exists/list/delete). The S3 client, its settings and the retry policy are `s3client.py`;
moving whole files and folders (multipart, checksums, parallel transfers) is `transfer.py`. Both build
on s3client, so they talk to one endpoint under one policy.

    from mmalign.trainer import storage
    storage.configure_from_spec(spec.storage)                    # once per process (optional)
    for line in storage.open_lines("s3://bucket/data/pairs.jsonl"): ...
    storage.write_json("s3://bucket/run/score/manifest.json", {...})

Every failure is a `StorageError`: after retries for transient S3 errors (s3client.py says which and for
how long), at once for permanent ones (missing bucket, access denied, bad URI). Stages map it to
ExitCode.STORAGE_ERROR, which the operator treats as retryable — except its subclass
`StoragePermanentError` (S3 said 403 access denied / bad keys or 404 no such bucket), which becomes the
permanent ExitCode.STORAGE_PERMANENT.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mmalign.api import layout

from . import s3client

# Storage's one error type, for every scheme: it is defined in s3client.py because the retry loop there
# raises it, and imported here because this is where callers know it from (storage.StorageError).
from .s3client import StorageError as StorageError
from .s3client import StoragePermanentError as StoragePermanentError

join = layout.join_uri  # the URI join, as callers of this module know it (storage.join)

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
    etag: str | None = None  # S3's ETag (content-derived), None for local files


def configure_from_spec(storage_spec: Any) -> None:
    """`s3client.configure` from a `config.StorageSpec` (duck-typed: endpoint, region, path_style)."""
    s3client.configure(
        endpoint=storage_spec.endpoint, region=storage_spec.region, path_style=storage_spec.path_style
    )


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


def is_remote(uri: str) -> bool:
    return os.fspath(uri).startswith("s3://")


def local_path(uri: str) -> Path:
    """The local path of a file:// URI or plain path (StorageError for s3://)."""
    location = parse(uri)
    if location.scheme != "file":
        raise StorageError(f"{uri}: not a local path")
    return Path(location.path)


# ------------------------------------------------------------------------------------------ reading


def exists(uri: str) -> bool:
    location = parse(uri)
    if location.scheme == "file":
        return os.path.exists(location.path)

    def head() -> bool:
        try:
            s3client.client().head_object(Bucket=location.bucket, Key=location.key)
            return True
        except Exception as error:
            if s3client.is_not_found(error):
                return False
            raise

    return s3client.with_retries(f"head {uri}", head)


def head(uri: str) -> ObjectInfo | None:
    """One object's size (and ETag on S3) without reading it; None when there is no such object (a local
    folder is no object either)."""
    location = parse(uri)
    if location.scheme == "file":
        return ObjectInfo(uri, os.path.basename(location.path), os.path.getsize(location.path)) \
            if os.path.isfile(location.path) else None

    def call() -> ObjectInfo | None:
        try:
            found = s3client.client().head_object(Bucket=location.bucket, Key=location.key)
        except Exception as error:
            if s3client.is_not_found(error):
                return None
            raise
        return ObjectInfo(uri, location.key.rsplit("/", 1)[-1], int(found["ContentLength"]),
                          etag=str(found.get("ETag", "")).strip('"') or None)

    return s3client.with_retries(f"head {uri}", call)


def read_bytes(uri: str) -> bytes:
    """A small object's bytes. FileNotFoundError when it does not exist."""
    location = parse(uri)
    if location.scheme == "file":
        with open(location.path, "rb") as f:
            return f.read()

    def get() -> bytes:
        try:
            body = s3client.client().get_object(Bucket=location.bucket, Key=location.key)["Body"]
            return body.read()
        except Exception as error:
            if s3client.is_not_found(error):
                raise FileNotFoundError(uri) from error
            raise

    try:
        return s3client.with_retries(f"read {uri}", get)
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
            return s3client.client().get_object(Bucket=location.bucket, Key=location.key)["Body"]
        except Exception as error:
            if s3client.is_not_found(error):
                raise FileNotFoundError(uri) from error
            raise

    try:
        body = s3client.with_retries(f"open {uri}", get)
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
        raise StorageError(f"reading {uri}: {s3client.describe(error)}") from error


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
        paginator = s3client.client().get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
            for item in page.get("Contents", []):
                relative = item["Key"][len(location.key):].lstrip("/")
                found.append(ObjectInfo(f"s3://{location.bucket}/{item['Key']}", relative, item["Size"],
                                        etag=str(item.get("ETag", "")).strip('"') or None))
        return sorted(found, key=lambda info: info.relative)

    return s3client.with_retries(f"list {uri}", list_all)


# ------------------------------------------------------------------------------------------ writing


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object at once (local files atomically: temp file + rename)."""
    location = parse(uri)
    if location.scheme == "file":
        _atomic_local_write(location.path, data)
        return
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    s3client.with_retries(
        f"write {uri}",
        lambda: s3client.client().put_object(
            Bucket=location.bucket, Key=location.key, Body=data, ChecksumSHA256=digest
        ),
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
            s3client.client().put_object(Bucket=location.bucket, Key=location.key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    return s3client.with_retries(f"conditional write {uri}", put)


def delete(uri: str) -> None:
    """Delete one object (missing is fine)."""
    location = parse(uri)
    if location.scheme == "file":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(location.path)
        return
    s3client.with_retries(
        f"delete {uri}", lambda: s3client.client().delete_object(Bucket=location.bucket, Key=location.key)
    )


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
            delete = {"Objects": batch, "Quiet": True}
            return s3client.client().delete_objects(Bucket=location.bucket, Delete=delete)

        s3client.with_retries(f"delete {uri}", delete_batch)
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
