"""The process's one S3 client and the retry policy every S3 call goes through, with the settings both
read: endpoint, region, addressing, and the part size and parallelism (transfer.py's, which also size
the client's connection pool). storage.py and transfer.py build on it, so they talk to one endpoint
under one policy without either reaching into the other's private names.

Endpoint from `configure(endpoint=...)` or `AWS_ENDPOINT_URL`; keys from `AWS_ACCESS_KEY_ID`/
`AWS_SECRET_ACCESS_KEY` (or the pod's cloud identity through the SDK's chain); region from
`configure(region=...)` or `AWS_DEFAULT_REGION`/`AWS_REGION`; path-style addressing by default.
Credentials are never logged or put into an error message. `with_retries` retries transient errors
(connection refused/reset, timeouts, 5xx, throttling) with backoff for `MMALIGN_STORAGE_RETRY_SECONDS`
(default 60) in total; then, and for any other error, it raises `StorageError` (storage's error,
defined here because this loop raises it) — `StoragePermanentError` at once for the refusals no retry
changes (403 access denied / bad keys, 404 no such bucket).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Multipart: parts of this size, this many in flight per file. S3 allows at most 10,000 parts, so the
# chunk grows for files over 10,000 x 16 MiB (see transfer._chunk_size_for). They are set here, by
# configure(), because the S3 client's connection pool is sized from the concurrency too.
# Why 16 MiB x 8 (was 64 MiB x 8; bench/checkpoint.py, docs/benchmarks.md "Checkpoints"): in the sweep
# a plain boto3 upload to the local SeaweedFS was fastest at 16 MiB parts with 8 in flight (22 MB/s; 64
# MiB: 13, 4 or 16 in flight: 10-12; one run on a loaded 2-core machine, so a weak signal); and the
# checksum pass (transfer._expected_s3_checksum) holds one part per file in memory, with upload_folder
# moving concurrency/2 = 4 files at once: 64 MiB per rank instead of 256. A higher-latency store may
# want more in flight (not measured here): raise `concurrency`.
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_CONCURRENCY = 8
_MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum size for every part but the last


class StorageError(Exception):
    """Storage failed after retries, or permanently (no such bucket, access denied, bad checksum)."""


class StoragePermanentError(StorageError):
    """S3 refused the request for good: access denied or bad credentials (403), no such bucket (404).
    Retrying reloads everything to fail again; failures.classify makes it ExitCode.STORAGE_PERMANENT."""

    def __init__(self, message: str, *, code: str, bucket: str) -> None:
        super().__init__(message)
        self.code = code  # S3's error code: AccessDenied, InvalidAccessKeyId, NoSuchBucket, ...
        self.bucket = bucket  # "" when no s3:// URI named it

    @property
    def no_such_bucket(self) -> bool:
        return self.code == "NoSuchBucket"


@dataclass(frozen=True)
class Settings:
    """What `configure` set. `endpoint`/`region` None: from the AWS_* environment at each `client()`."""

    endpoint: str | None = None
    region: str | None = None
    path_style: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    concurrency: int = DEFAULT_CONCURRENCY


_settings = Settings()
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
    parallelism. `chunk_bytes`/`concurrency` left None keep their current values."""
    global _client, _settings
    with _client_lock:
        chunk = _settings.chunk_bytes if chunk_bytes is None else max(int(chunk_bytes), _MIN_PART_BYTES)
        parallel = _settings.concurrency if concurrency is None else max(1, int(concurrency))
        _settings = Settings(endpoint=endpoint, region=region, path_style=path_style, chunk_bytes=chunk,
                             concurrency=parallel)
        _client = None


def settings() -> Settings:
    """The current settings: a snapshot, since `configure` replaces the object rather than changing it."""
    return _settings


def client() -> Any:
    """The process's S3 client, rebuilt whenever the endpoint/region it would use changes: `configure`
    or the AWS_* environment may change after a first call (tests, the demo), and a client cached
    with an old endpoint would silently talk to a server that is gone."""
    global _client, _client_key
    current = _settings
    endpoint = current.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = current.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    key = (endpoint, region, current.path_style, current.concurrency)
    with _client_lock:
        if _client is None or _client_key != key:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": "path" if current.path_style else "virtual"},
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=max(16, 2 * current.concurrency),
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported",
            )
            # Keys come from the environment / the SDK's provider chain; they never pass through here.
            _client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
            _client_key = key
        return _client


def forget_client() -> None:
    """Drop the process's client (and its lock) without touching them: for a process forked from one
    that may hold both (a DataLoader worker, prefetch.py). boto3 clients are not fork-safe (their
    connection pool's sockets and locks are shared with the parent), and another thread of the parent
    may have held the lock at the fork; the next `client()` builds the worker's own."""
    global _client, _client_key, _client_lock
    _client_lock = threading.Lock()
    _client, _client_key = None, None


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


# Refusals that no retry changes: the keys, the bucket policy or the bucket itself must be fixed first.
_PERMANENT_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "NoSuchBucket"}


def permanent_code(error: BaseException) -> str:
    """S3's error code when `error` (or what it wraps) is a permanent refusal, else ""."""
    from botocore.exceptions import ClientError

    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        if isinstance(current, ClientError):
            code = str(current.response.get("Error", {}).get("Code", ""))
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code or str(status) if code in _PERMANENT_CODES or status == 403 else ""
        current = current.__cause__ or current.__context__
        seen += 1
    return ""


def _bucket_of(what: str, error: BaseException) -> str:
    """The bucket the failed call named: S3's own BucketName, else the first s3:// URI in `what`."""
    response = getattr(error, "response", None) or {}
    bucket = str(response.get("Error", {}).get("BucketName", "") or "")
    if not bucket and "s3://" in what:
        bucket = what.split("s3://", 1)[1].split("/", 1)[0].split()[0]
    return bucket


def _retry_seconds() -> float:
    return float(os.environ.get("MMALIGN_STORAGE_RETRY_SECONDS", "60"))


def with_retries(what: str, fn: Callable[[], T]) -> T:
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
            code = permanent_code(error)
            if code:
                raise StoragePermanentError(f"{what}: {describe(error)}", code=code,
                                            bucket=_bucket_of(what, error)) from error
            if not _is_transient(error) or time.monotonic() + delay > deadline:
                raise StorageError(f"{what}: {describe(error)}") from error
            log.warning("storage: %s failed (%s), retry %d in %.1fs", what, describe(error), attempt, delay)
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            delay = min(delay * 2, 10.0)


def describe(error: BaseException) -> str:
    """`Type: message` for our errors: botocore's messages name the operation and code, never the keys."""
    return f"{type(error).__name__}: {error}"


def is_not_found(error: BaseException) -> bool:
    """The object (or key) does not exist: a ClientError with code 404/NoSuchKey/NotFound."""
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")
    return False
