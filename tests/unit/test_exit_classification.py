"""Failures classified by their cause (issue 14 item 4): the worker's `classify`/`failure_message`
(trainer/train.py) and `mmalign launch`'s rendezvous mapping (trainer/launch.py). The operator side
(retryable or not, OOMKilled with the limit) is tests/unit/test_operator_policy.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed
from botocore.exceptions import ClientError

from mmalign.api.conditions import exit_reason
from mmalign.api.exit_codes import ExitCode
from mmalign.api.jobfile import load_job
from mmalign.api.runtime import RunPolicy
from mmalign.api.stages import RewardStage, ScoreStage
from mmalign.trainer import launch, s3client, storage
from mmalign.trainer.failures import classify, failure_message

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "tiny-cpu.yaml"


def _client_error(code: str, status: int, bucket: str = "") -> ClientError:
    error: dict[str, Any] = {"Code": code, "Message": "refused"}
    if bucket:
        error["BucketName"] = bucket
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _raise(error: BaseException) -> Any:
    raise error


def _manifest(reward_micro_batch: int = 4, score_batch: int = 8) -> Any:
    manifest = load_job(EXAMPLE)
    manifest.spec.storage.credentials_secret = "s3-keys"
    stages = manifest.spec.stages
    stages.reward = stages.reward or RewardStage()
    stages.score = stages.score or ScoreStage()
    stages.reward.micro_batch_size, stages.score.batch_size = reward_micro_batch, score_batch
    return manifest


def test_new_codes_have_their_reasons_and_retry_defaults() -> None:
    assert exit_reason(ExitCode.STORAGE_PERMANENT) == "StoragePermanent"
    assert exit_reason(ExitCode.OUT_OF_MEMORY) == "OutOfMemory"
    assert exit_reason(ExitCode.COMMUNICATION_ERROR) == "CommunicationError"
    assert exit_reason(ExitCode.RENDEZVOUS_TIMEOUT) == "RendezvousTimeout"
    retryable = set(RunPolicy().retryable_exit_codes)
    assert {ExitCode.STORAGE_ERROR, ExitCode.RENDEZVOUS_ERROR, ExitCode.COMMUNICATION_ERROR,
            ExitCode.RENDEZVOUS_TIMEOUT} == retryable
    assert not {ExitCode.STORAGE_PERMANENT, ExitCode.OUT_OF_MEMORY} & retryable


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("InvalidAccessKeyId", 403),
                                         ("SignatureDoesNotMatch", 403), ("403", 403), ("NoSuchBucket", 404)])
def test_permanent_s3_errors_are_not_retried_and_name_bucket_and_action(code: str, status: int) -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise _client_error(code, status)

    with pytest.raises(storage.StoragePermanentError) as caught:
        s3client.with_retries("read s3://data-bucket/pairs.jsonl", refused)
    assert len(calls) == 1 and caught.value.bucket == "data-bucket"
    manifest = _manifest()
    exit_code, kind = classify(caught.value, manifest, "reward")
    assert (exit_code, kind) == (ExitCode.STORAGE_PERMANENT, "STORAGE_PERMANENT")
    message = failure_message(exit_code, caught.value, manifest, "reward")
    assert "'data-bucket'" in message
    if code == "NoSuchBucket":
        assert "does not exist (read s3://data-bucket/pairs.jsonl): create it" in message
    else:
        assert "Secret 's3-keys' (spec.storage.credentialsSecret)" in message


def test_permanent_error_wrapped_by_a_caller_stays_permanent() -> None:
    try:
        try:
            s3client.with_retries("upload /x -> s3://b/ckpt/x", lambda: _raise(_client_error("AccessDenied", 403)))
        except storage.StorageError as inner:
            raise storage.StorageError(f"checkpoint upload failed: {inner}") from inner
    except storage.StorageError as outer:
        assert classify(outer)[0] == ExitCode.STORAGE_PERMANENT
        assert "name a Secret with working keys" in failure_message(ExitCode.STORAGE_PERMANENT, outer)


def test_transient_s3_errors_stay_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_STORAGE_RETRY_SECONDS", "0")
    with pytest.raises(storage.StorageError) as caught:
        s3client.with_retries("read s3://b/k", lambda: _raise(_client_error("SlowDown", 503)))
    assert not isinstance(caught.value, storage.StoragePermanentError)
    assert classify(caught.value) == (ExitCode.STORAGE_ERROR, "STORAGE_ERROR")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 80 GiB"),
    RuntimeError("CUDA error: out of memory"),
])
def test_cuda_out_of_memory_names_the_batch_size(error: BaseException) -> None:
    manifest = _manifest(reward_micro_batch=4, score_batch=8)
    assert classify(error, manifest, "reward") == (ExitCode.OUT_OF_MEMORY, "OUT_OF_MEMORY")
    message = failure_message(ExitCode.OUT_OF_MEMORY, error, manifest, "reward")
    assert message.startswith("CUDA out of memory at microBatchSize 4 (spec.stages.reward.microBatchSize)")
    for hint in ("gradientAccumulation", "gradientCheckpointing: true", "zeroStage: 3"):
        assert hint in message
    assert ("(Tried to allocate 2.00 GiB)" in message) == isinstance(error, torch.OutOfMemoryError)
    score = failure_message(ExitCode.OUT_OF_MEMORY, error, manifest, "score")
    assert "batchSize 8 (spec.stages.score.batchSize)" in score


@pytest.mark.parametrize("error", [
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled system error"),
    torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1"),
    RuntimeError("Connection reset by peer"),
    RuntimeError("NCCL communicator was aborted: remote process exited or there was a network error"),
])
def test_communication_errors_are_retryable(error: BaseException) -> None:
    code, kind = classify(error)
    assert (code, kind) == (ExitCode.COMMUNICATION_ERROR, "COMMUNICATION_ERROR")
    assert code in RunPolicy().retryable_exit_codes


def test_other_crashes_stay_exit_1() -> None:
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == (1, "ERROR")
    assert classify(KeyError("x")) == (1, "ERROR")


def test_rendezvous_timeout_and_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    node0 = torch.distributed.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")
    code, message = launch.rendezvous_failure(node0, "600")
    assert code == ExitCode.RENDEZVOUS_TIMEOUT and "did not assemble" in message and "Pending" in message
    other = torch.distributed.DistNetworkError("The client socket has timed out after 600000ms while trying "
                                               "to connect to (job-dpo-0-0.job, 29500).")
    assert launch.rendezvous_failure(other, "600")[0] == ExitCode.RENDEZVOUS_TIMEOUT
    assert launch.rendezvous_failure(torch.distributed.DistError("boom"), "600")[0] == ExitCode.COMMUNICATION_ERROR
    monkeypatch.delenv("MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS", raising=False)
    assert launch.rendezvous_conf() == []
    monkeypatch.setenv("MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS", "1800")
    assert launch.rendezvous_conf() == ["--rdzv-conf=timeout=1800"]


def test_waiting_for_a_pending_masters_dns_is_bounded_by_the_startup_timeout(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # node 0's pod Pending: its name has no address; node 1 waits startupTimeoutSeconds, then exits 10
    monkeypatch.delenv("MMALIGN_DNS_WAIT_SECONDS", raising=False)
    monkeypatch.setenv("MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("MMALIGN_TERMINATION_LOG", str(tmp_path / "not-in-a-pod"))
    assert launch.dns_wait("job-reward-0-0.job.invalid", 29500) == ExitCode.RENDEZVOUS_TIMEOUT
    monkeypatch.setenv("MMALIGN_DNS_WAIT_SECONDS", "1")  # set by the user: its own code, as before
    assert launch.dns_wait("job-reward-0-0.job.invalid", 29500) == ExitCode.RENDEZVOUS_ERROR
    assert launch.dns_wait("localhost", 29500) is None


def test_a_broken_collective_is_never_the_root_cause() -> None:
    class Failure:
        def __init__(self, code: int, timestamp: int = 1000) -> None:
            self.exitcode, self.timestamp = code, timestamp

    # rank 0 saw the collective break (9) in the same poll as rank 1's data error (3): 3 explains it
    rank, failure = launch.root_failure({0: Failure(int(ExitCode.COMMUNICATION_ERROR)), 1: Failure(3)})
    assert (rank, failure.exitcode) == (1, 3)
    # alone, it is the cause
    assert launch.root_failure({0: Failure(9)})[0] == 0
