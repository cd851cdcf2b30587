"""`mmalign launch` / `mmalign train`: DNS wait, and every failure class reaching the operator as its own
exit code with one line on stderr (torchrun alone would turn them all into 1)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from mmalign.api.exit_codes import ExitCode
from mmalign.trainer import launch
from tests.trainer import jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wait_for_dns() -> None:
    assert launch.wait_for_dns("localhost", 29500, timeout=5)
    started = time.monotonic()
    assert not launch.wait_for_dns("no-such-host.invalid", 29500, timeout=1, interval=0.2)
    assert time.monotonic() - started < 10


def test_launch_waits_for_dns_then_gives_up_with_its_own_code(tmp_path: Path) -> None:
    job = jobs.write_job(tmp_path / "job.yaml", data_uri="builtin://synthetic-colors",
                         storage_uri=(tmp_path / "s").as_uri() + "/", stages={"dpo": {}})
    env = jobs.run_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1",
                        "PET_MASTER_ADDR": "tiny-cpu-dpo-0.tiny-cpu.invalid", "PET_MASTER_PORT": "29500",
                        "MMALIGN_DNS_WAIT_SECONDS": "3"})
    result = jobs.mmalign("launch", "--job", str(job), "--stage", "dpo", env=env, timeout=60)
    assert result.returncode == ExitCode.RENDEZVOUS_ERROR, result.stderr
    assert "waiting for DNS of master tiny-cpu-dpo-0.tiny-cpu.invalid" in result.stderr


def test_launch_rendezvous_timeout_is_its_own_retryable_code(tmp_path: Path) -> None:
    """Node 0 of a 2-node gang whose node 1 never starts (a Pending pod): the static rendezvous times
    out and `mmalign launch` exits RENDEZVOUS_TIMEOUT (retryable) with a line saying why, not 1."""
    job = jobs.write_job(tmp_path / "job.yaml", data_uri="builtin://synthetic-colors",
                         storage_uri=(tmp_path / "s").as_uri() + "/", stages={"dpo": {}})
    env = jobs.run_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0",
                        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
                        "MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS": "3"})
    started = time.monotonic()
    result = jobs.mmalign("launch", "--job", str(job), "--stage", "dpo", env=env, timeout=60)
    assert result.returncode == ExitCode.RENDEZVOUS_TIMEOUT, result.stderr[-3000:]
    assert "mmalign: RENDEZVOUS_TIMEOUT (exit 10): the gang did not assemble" in result.stderr
    assert "1/2 clients joined" in result.stderr
    assert time.monotonic() - started < 60


def test_launch_exits_with_the_workers_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"id": "q_0", "prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    job = jobs.write_job(tmp_path / "job.yaml", data_uri=str(bad), storage_uri=(tmp_path / "s").as_uri() + "/",
                         stages={"reward": {"critique": False}})
    env = jobs.run_env({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
                        "PET_MASTER_ADDR": "localhost", "PET_MASTER_PORT": str(_free_port())})
    result = jobs.mmalign("launch", "--job", str(job), "--stage", "reward", env=env, timeout=200)
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    assert f"mmalign: DATA_ERROR (exit 3): {bad}:2: not valid JSON" in result.stderr


def test_train_exit_codes(tmp_path: Path) -> None:
    """One process without torchrun (world of one): config, storage and NaN failures."""
    env = jobs.run_env(scratch=tmp_path / "scratch")
    # config: a field that does not exist -> 2, with the field named
    job = tmp_path / "bad.yaml"
    jobs.write_job(job, data_uri="builtin://synthetic-colors", storage_uri="file:///tmp/x/",
                   stages={"reward": {"learningRateTypo": 1}})
    result = jobs.mmalign("train", "--job", str(job), "--stage", "reward", env=env, timeout=120)
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "CONFIG_ERROR (exit 2)" in result.stderr and "learningRateTypo" in result.stderr

    # a GPU-shaped job (procPerNode GPUs by default) on a machine without CUDA -> 2, saying what to write
    job = jobs.write_job(tmp_path / "gpu.yaml", data_uri="builtin://synthetic-colors", storage_uri="file:///tmp/x/",
                         procs=1, gpus=None, stages={"reward": {"critique": False}})
    result = jobs.mmalign("train", "--job", str(job), "--stage", "reward", timeout=120,
                          env={k: v for k, v in env.items() if k != "MMALIGN_ALLOW_CPU"})
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    assert ("CONFIG_ERROR (exit 2): the job asks for GPUs (1 nvidia.com/gpu per pod (= procPerNode)) but this "
            "process sees no CUDA device") in result.stderr
    assert "nvidia.com/gpu: 0" in result.stderr and "MMALIGN_ALLOW_CPU=1" in result.stderr

    # storage: an S3 endpoint that refuses connections -> retried, then 5 (retryable)
    job = jobs.write_job(tmp_path / "s3.yaml", data_uri="builtin://synthetic-colors",
                         storage_uri="s3://bucket/run/", stages={"reward": {"critique": False}})
    result = jobs.mmalign("train", "--job", str(job), "--stage", "reward", timeout=120,
                          env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                               "AWS_SECRET_ACCESS_KEY": "very-secret-value", "MMALIGN_STORAGE_RETRY_SECONDS": "1"})
    assert result.returncode == ExitCode.STORAGE_ERROR, result.stderr[-3000:]
    assert "STORAGE_ERROR (exit 5)" in result.stderr and "very-secret-value" not in result.stderr

    # NaN: an absurd learning rate blows the weights up after one step -> 4
    job = jobs.write_job(tmp_path / "nan.yaml", data_uri="builtin://synthetic-colors",
                         storage_uri=(tmp_path / "nan").as_uri() + "/",
                         stages={"reward": {"critique": False, "learningRate": 1e30, "maxSteps": 4,
                                            "microBatchSize": 2, "warmupRatio": 0.0, "maxGradNorm": 1e30}})
    result = jobs.mmalign("train", "--job", str(job), "--stage", "reward", env=env, timeout=200)
    assert result.returncode == ExitCode.NAN_LOSS, result.stderr[-3000:]
    assert "NAN_LOSS (exit 4): loss is not finite at step" in result.stderr
