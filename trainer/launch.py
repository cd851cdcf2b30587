"""`mmalign launch --job JOB.yaml --stage NAME [--storage URI]`: the trainer pod's command.

The operator injects the torchrun conventions (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT, and MASTER_ADDR/MASTER_PORT). This command

1. waits until the master address resolves (the headless Service's DNS record appears only once the
   node-0 pod exists; Kubeflow's PyTorchJob crashes on "host not found" instead) — retrying with a
   log line every ~10 s for up to MMALIGN_DNS_WAIT_SECONDS (default 600), then exit 6
   (RENDEZVOUS_ERROR);
2. runs torchrun IN THIS PROCESS (torch.distributed.run) with a static rendezvous on the master:
   `torchrun --nnodes N --nproc-per-node P --node-rank R --master-addr A --master-port PORT
   --max-restarts 0 -m mmalign.cli train --job JOB --stage NAME`;
   The static rendezvous waits MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS (default: torch's 600) for every node;
   when the gang does not assemble in time (a pod still Pending, waiting for a node or quota) it exits
   10 (RENDEZVOUS_TIMEOUT, retryable) with a line saying so, instead of torchrun's exit 1;
3. exits with the root-cause worker's own exit code (torchrun alone exits 1, which would hide the
   NaN / data / storage codes the operator's failure policy reads); a worker killed by signal S gives
   128+S, and it wins over peers that died of the broken collective in the same instant.

The operator restarts the whole gang on retryable failures; torchrun itself never restarts workers.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from mmalign.api import keys
from mmalign.api.exit_codes import ExitCode
from mmalign.trainer.failures import report_failure
from mmalign.trainer.train import add_storage_argument


def _log(message: str) -> None:
    print(f"[mmalign launch] {message}", file=sys.stderr, flush=True)


def torchrun_env() -> dict[str, str | int]:
    """nnodes, nproc_per_node, node_rank, master_addr, master_port from PET_* (else MASTER_*/defaults)."""
    env = os.environ
    return {
        "nnodes": int(env.get(keys.ENV_NNODES, "1")),
        "nproc_per_node": int(env.get(keys.ENV_NPROC_PER_NODE, "1")),
        "node_rank": int(env.get(keys.ENV_NODE_RANK, env.get("NODE_RANK", "0"))),
        "master_addr": env.get(keys.ENV_MASTER_ADDR) or env.get(keys.ENV_TORCH_MASTER_ADDR) or "127.0.0.1",
        "master_port": int(env.get(keys.ENV_MASTER_PORT) or env.get(keys.ENV_TORCH_MASTER_PORT) or "29500"),
    }


def wait_for_dns(host: str, port: int, timeout: float, interval: float = 2.0) -> bool:
    """Retry name resolution of `host` until it works or `timeout` seconds passed; log every ~10 s."""
    started = time.monotonic()
    last_log = -1e9
    attempt = 0
    while True:
        attempt += 1
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if attempt > 1:
                _log(f"{host} resolves after {time.monotonic() - started:.0f}s")
            return True
        except (socket.gaierror, UnicodeError) as error:
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                _log(f"giving up: {host} did not resolve within {timeout:.0f}s ({error})")
                return False
            if elapsed - last_log >= 10:
                _log(f"waiting for DNS of master {host} (attempt {attempt}, {elapsed:.0f}s): {error}")
                last_log = elapsed
            time.sleep(interval)


# A stop request, not a crash: torchrun itself and the kubelet stop workers with these.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def root_failure(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """(rank, failure) that most likely caused the others, from torchrun's {rank: ProcessFailure}.

    Earliest first; among failures seen together, a worker killed by a signal (SIGKILL from the OOM
    killer, SIGSEGV) beats one that exited: when a rank dies, its peers fail their next collective
    ("Connection reset by peer", exit 1) and torchrun records both in the same poll, where its own
    get_first_failure() picks the lowest rank. torchrun stamps a failure with whole seconds taken when
    it polls, so stamps one second apart can still be one poll. The operator applies the same rule
    to pods (policy._failure_order).
    """
    earliest = min(float(getattr(f, "timestamp", 0)) for f in failures.values())

    def order(item: tuple[int, Any]) -> tuple[int, int, int, int]:
        rank, failure = item
        code = int(failure.exitcode)
        together = float(getattr(failure, "timestamp", 0)) <= earliest + 1
        crashed_by_signal = code < 0 and -code not in _STOP_SIGNALS
        # a broken collective (exit 9) is how peers see another rank's failure: never the cause when
        # a rank failed otherwise in the same instant
        consequence = code == ExitCode.COMMUNICATION_ERROR
        return (0 if together else 1, 0 if crashed_by_signal else 1, 1 if consequence else 0, rank)

    return min(failures.items(), key=order)


def worker_exit_code(failure: Any) -> int:
    """A worker's exit status as a shell reports it: a signal S becomes 128+S, 0 (impossible) 1."""
    code = int(failure.exitcode)
    if code < 0:
        return 128 + (-code)
    return code or 1


def rendezvous_failure(error: BaseException, timeout: str) -> tuple[ExitCode, str]:
    """(code, message) for a c10d store error escaping torchrun: the static rendezvous before any worker.

    On timeout node 0's store raises DistStoreError ("Timed out after 601 seconds waiting for clients.
    1/2 clients joined."), another node's DistNetworkError ("The client socket has timed out after
    600000ms while trying to connect to (addr, port)."); anything else is a communication error.
    """
    text = " ".join(str(error).split()).split("Exception raised from")[0].strip()
    if "timed out" not in text.lower():
        return ExitCode.COMMUNICATION_ERROR, f"torchrun's rendezvous failed: {type(error).__name__}: {text}"
    # short: the operator keeps the termination message's last 300 characters
    return ExitCode.RENDEZVOUS_TIMEOUT, (
        f"the gang did not assemble within {timeout}s: {text[:110]} Some pods Pending (no node with room, "
        "quota)? See `kubectl get pods` and their events.")


def run_torchrun(torchrun_args: list[str]) -> int:
    """torch.distributed.run in this process; 0 or the first failing worker's own exit code."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
        return 0
    except DistError as error:  # the rendezvous store (workers' own errors arrive as ChildFailedError)
        rendezvous_code, message = rendezvous_failure(error, str(rendezvous_timeout() or 600))
        _log(f"{message}; exiting {int(rendezvous_code)}")
        report_failure(int(rendezvous_code), rendezvous_code.name, message)
        return int(rendezvous_code)
    except SignalException as error:  # SIGTERM/SIGINT to this process (pod deletion): workers stopped
        _log(f"stopped by signal {error.sigval.name}")
        return 128 + int(error.sigval)
    except ChildFailedError as error:
        if not error.failures:
            _log("torchrun failed without a worker failure; exiting 1")
            return 1
        rank, failure = root_failure(error.failures)
        code = worker_exit_code(failure)
        others = {r: f.exitcode for r, f in error.failures.items() if r != rank}
        _log(f"worker rank {rank} failed first (exit {failure.exitcode}); exiting {code}"
             + (f"; also failed: {others}" if others else ""))
        return code


def rendezvous_timeout() -> int | None:
    """MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS, or None (unset: torch's default, 600 s)."""
    seconds = os.environ.get("MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS", "").strip()
    return int(float(seconds)) if seconds else None


def rendezvous_conf() -> list[str]:
    """`--rdzv-conf=timeout=N` when a rendezvous timeout is set (rendezvous_timeout)."""
    timeout = rendezvous_timeout()
    return [f"--rdzv-conf=timeout={timeout}"] if timeout is not None else []


def train_command(job: str, stage: str, storage: str | None) -> list[str]:
    """The worker's command as torchrun arguments: `-m mmalign.cli train ...` (same interpreter)."""
    command = ["-m", "mmalign.cli", "train", "--job", job, "--stage", stage]
    if storage:
        command += ["--storage", storage]
    return command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmalign launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, help="AlignmentJob YAML file (mounted from a ConfigMap)")
    parser.add_argument("--stage", required=True, choices=("reward", "score", "dpo"))
    add_storage_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = torchrun_env()
    timeout = float(os.environ.get("MMALIGN_DNS_WAIT_SECONDS", "600"))
    if not wait_for_dns(str(env["master_addr"]), int(env["master_port"]), timeout):
        return int(ExitCode.RENDEZVOUS_ERROR)
    torchrun_args = [
        f"--nnodes={env['nnodes']}",
        f"--nproc-per-node={env['nproc_per_node']}",
        f"--node-rank={env['node_rank']}",
        f"--master-addr={env['master_addr']}",
        f"--master-port={env['master_port']}",
        "--rdzv-backend=static",
        *rendezvous_conf(),
        "--max-restarts=0",
        *train_command(args.job, args.stage, args.storage),
    ]
    _log(f"torchrun {' '.join(torchrun_args)}")
    return run_torchrun(torchrun_args)


if __name__ == "__main__":
    sys.exit(main())
