"""Moving whole files and folders to and from storage: `upload_file`/`upload_folder` and
`download_file`/`download_prefix`, used for checkpoints, models, datasets and the stages' output
shards. Large files go up as multipart parts in parallel, folders move several files at once, and a
local target appears only when complete (temp file + rename). This is apart from `storage` (URIs,
small objects) because part sizes, thread pools and checksum forms matter only to code that moves
files; like storage it uses s3client's client, retry loop and the sizes set by
`s3client.configure(chunk_bytes=, concurrency=)`, so both modules talk to one endpoint under one policy.

    from mmalign.trainer import transfer
    transfer.upload_file("/tmp/shard.pt", "s3://bucket/run/ckpt/step-5/shard.pt")  # -> ObjectInfo
    transfer.upload_folder("/tmp/model", "s3://bucket/run/reward/model/")
    transfer.download_prefix("s3://bucket/run/reward/model/", "/tmp/rm")

Integrity: uploads send SHA-256 checksums (the server rejects a corrupted part) and, afterwards, the
object's size and the checksum the server stored are compared with the local file (the composite
"sha-of-part-shas-N" form for multipart uploads). Every upload returns the file's whole-file SHA-256,
which callers record (the checkpoint marker does) and `download_file(..., sha256=)` verifies.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import s3client, storage

T = TypeVar("T")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunk_size_for(size: int) -> int:
    chunk = s3client.settings().chunk_bytes
    while size > chunk * 10_000:
        chunk *= 2
    return chunk


def _expected_s3_checksum(path: str, size: int, chunk: int) -> tuple[str, str]:
    """(whole-file sha256 hex, the ChecksumSHA256 S3 stores: base64, composite "-N" when multipart)."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    with open(path, "rb") as f:
        while block := f.read(chunk):
            whole.update(block)
            parts.append(hashlib.sha256(block).digest())
    if size >= chunk and len(parts) > 1:
        composite = hashlib.sha256(b"".join(parts)).digest()
        return whole.hexdigest(), f"{base64.b64encode(composite).decode()}-{len(parts)}"
    return whole.hexdigest(), base64.b64encode(whole.digest()).decode()


def upload_file(path: str | os.PathLike[str], uri: str) -> storage.ObjectInfo:
    """Upload a local file (parallel multipart for large files) and verify size + checksum.

    Returns its storage.ObjectInfo with the whole-file sha256. A failure after retries raises storage.StorageError.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    location = storage.parse(uri)
    if location.scheme == "file":
        sha = file_sha256(path)
        os.makedirs(os.path.dirname(location.path) or ".", exist_ok=True)
        tmp = location.path + f".tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, location.path)
        return storage.ObjectInfo(uri, os.path.basename(location.path), size, sha)

    from boto3.s3.transfer import TransferConfig

    chunk = _chunk_size_for(size)
    sha, expected = _expected_s3_checksum(path, size, chunk)
    transfer = TransferConfig(
        multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=s3client.settings().concurrency
    )

    def upload() -> None:
        s3client.client().upload_file(
            path, location.bucket, location.key, Config=transfer, ExtraArgs={"ChecksumAlgorithm": "SHA256"}
        )

    s3client.with_retries(f"upload {path} -> {uri}", upload)
    head = s3client.with_retries(
        f"verify {uri}",
        lambda: s3client.client().head_object(
            Bucket=location.bucket, Key=location.key, ChecksumMode="ENABLED"
        ),
    )
    if head["ContentLength"] != size:
        raise storage.StorageError(f"upload {uri}: stored size {head['ContentLength']} != local size {size}")
    stored = head.get("ChecksumSHA256")
    if stored is not None and stored != expected:
        raise storage.StorageError(f"upload {uri}: stored SHA-256 {stored} != local {expected}")
    return storage.ObjectInfo(uri, os.path.basename(location.key), size, sha)


def upload_folder(folder: str | os.PathLike[str], uri: str) -> list[storage.ObjectInfo]:
    """Upload every file below `folder` to `uri/<relative path>`, files in parallel."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        return []
    concurrency = s3client.settings().concurrency
    workers = min(len(files), max(1, concurrency // 2)) if storage.is_remote(uri) else 1
    infos = _parallel(workers, [(upload_file, (p, storage.join(uri, p.relative_to(root).as_posix()))) for p in files])
    return [
        storage.ObjectInfo(info.uri, p.relative_to(root).as_posix(), info.size, info.sha256)
        for p, info in zip(files, infos, strict=True)
    ]


def download_file(uri: str, path: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """Download one object to a local path (atomically); verify its sha256 when given."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    location = storage.parse(uri)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        if location.scheme == "file":
            if not os.path.exists(location.path):
                raise FileNotFoundError(uri)
            shutil.copyfile(location.path, tmp)
        else:
            from boto3.s3.transfer import TransferConfig

            sizes = s3client.settings()
            transfer = TransferConfig(
                multipart_threshold=sizes.chunk_bytes,
                multipart_chunksize=sizes.chunk_bytes,
                max_concurrency=sizes.concurrency,
            )

            def download() -> None:
                try:
                    s3client.client().download_file(location.bucket, location.key, str(tmp), Config=transfer)
                except Exception as error:
                    if s3client.is_not_found(error):
                        raise FileNotFoundError(uri) from error
                    raise

            try:
                s3client.with_retries(f"download {uri}", download)
            except storage.StorageError as error:
                if isinstance(error.__cause__, FileNotFoundError):
                    raise error.__cause__ from None
                raise
        if sha256 is not None:
            actual = file_sha256(tmp)
            if actual != sha256:
                raise storage.StorageError(f"download {uri}: sha256 {actual} != expected {sha256}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def download_prefix(
    uri: str, folder: str | os.PathLike[str], checksums: dict[str, str] | None = None
) -> list[Path]:
    """Download every object below `uri` into `folder` (same relative layout), files in parallel.

    `checksums` maps relative name -> sha256 to verify. Returns the local paths.
    """
    objects = storage.list_prefix(uri if uri.endswith("/") or not storage.is_remote(uri) else uri + "/")
    root = Path(folder)
    checksums = checksums or {}
    workers = min(len(objects), s3client.settings().concurrency) if objects else 1
    return _parallel(max(1, workers), [(download_file, (info.uri, root / info.relative,
                                                        checksums.get(info.relative))) for info in objects])


def _parallel(workers: int, calls: list[tuple[Callable[..., T], tuple[Any, ...]]]) -> list[T]:
    """Run calls on a thread pool, results in order; the first failure cancels the calls not started
    (a dead server then fails the transfer once, not once per remaining file)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(fn, *args) for fn, args in calls]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
