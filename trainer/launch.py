"""`mmalign launch --job JOB.yaml --stage NAME [--storage URI]`: the trainer pod's command.

The operator injects the torchrun conventions (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT, and MASTER_ADDR/MASTER_PORT). This command

1. waits until the master address resolves (the headless Service's DNS record appears only once the
   node-0 pod exists; Kubeflow's PyTorchJob crashes on "host not found" instead) — retrying with a
   log line every ~10 s for up to MMALIGN_DNS_WAIT_SECONDS (default 600), then exit 6
   (RENDEZVOUS_ERROR); unset, with a rendezvous timeout, for that timeout, then exit 10 (dns_wait);
2. runs torchrun IN THIS PROCESS (torch.distributed.run) with a static rendezvous on the master:
   `torchrun --nnodes N --nproc-per-node P --node-rank R --master-addr A --master-port PORT
   --max-restarts 0 -m mmalign.cli train --job JOB --stage NAME`;
   The static rendezvous waits MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS (default: torch's 600) for every node;
   when the gang does not assemble in time (a pod still Pending, waiting for a node or quota) it exits
   10 (RENDEZVOUS_TIMEOUT, retryable) with a line saying so, instead of torchrun's exit 1;
3. exits with the root-cause worker's own exit code (torchrun alone exits 1, which would hide the
   NaN / data / storage codes the operator's failure policy reads); a worker killed by signal S gives
   128+S, and it wins over peers that died of the broken collective in the same instant.

SIGTERM (the kubelet sends it to this process, PID 1 of the container, on suspend, preemption, drain or
pod deletion): torchrun forwards it to every worker, which finish their step and commit a checkpoint of
it (trainer/loop.py), and waits `--shutdown-timeout` for them before SIGKILL: the pod's grace period
(spec.podTemplate.terminationGracePeriodSeconds) less a few seconds, not torchrun's default 30 s.
Exit 143. Before torchrun starts (waiting for DNS), SIGTERM exits 143 at once: nothing to save yet.

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
    # short: a condition message keeps conditions.MESSAGE_LIMIT characters (its head and tail)
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


# torchrun and this process need a moment to exit after the workers, before the kubelet's SIGKILL.
EXIT_MARGIN_SECONDS = 5


def shutdown_timeout(grace_seconds: int) -> list[str]:
    """torchrun's `--shutdown-timeout`: how long its workers get between SIGTERM and SIGKILL."""
    return [f"--shutdown-timeout={max(1, grace_seconds - EXIT_MARGIN_SECONDS)}"]


def grace_period(job: str) -> int:
    """spec.podTemplate.terminationGracePeriodSeconds of the job file; its default when the file does not
    load (the worker then reports why, with its exit code)."""
    from mmalign.api.jobfile import load_job
    from mmalign.api.runtime import PodTemplate

    try:
        return int(load_job(job).spec.pod_template.termination_grace_period_seconds)
    except Exception:  # noqa: BLE001 - the worker reads the same file and names the problem
        return int(PodTemplate().termination_grace_period_seconds)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def rendezvous_timeout() -> int | None:
    """MMALIGN_RENDEZVOUS_TIMEOUT_SECONDS, or None (unset: torch's default, 600 s)."""
    seconds = os.environ.get(keys.ENV_RENDEZVOUS_TIMEOUT, "").strip()
    return int(float(seconds)) if seconds else None


def rendezvous_conf() -> list[str]:
    """`--rdzv-conf=timeout=N` when a rendezvous timeout is set (rendezvous_timeout)."""
    timeout = rendezvous_timeout()
    return [f"--rdzv-conf=timeout={timeout}"] if timeout is not None else []


def dns_wait(host: str, port: int) -> int | None:
    """Wait for the master's name; None once it resolves, else the exit code.

    Node 0's name has no address while node 0's pod is Pending, so this wait is part of the gang's start:
    with a rendezvous timeout (the operator's runPolicy.startupTimeoutSeconds) and no
    MMALIGN_DNS_WAIT_SECONDS, it is bounded by that timeout and ends as RENDEZVOUS_TIMEOUT, as the
    store's wait does when another node is the Pending one (before: 600 s, then RENDEZVOUS_ERROR)."""
    explicit = os.environ.get("MMALIGN_DNS_WAIT_SECONDS", "").strip()
    startup = rendezvous_timeout()
    timeout = float(explicit) if explicit else float(startup if startup is not None else 600)
    if wait_for_dns(host, port, timeout):
        return None
    if explicit or startup is None:
        return int(ExitCode.RENDEZVOUS_ERROR)
    message = (f"the gang did not assemble within {startup}s: the master {host} (node 0's pod) has no address "
               "yet. Pending (no node with room, quota)? See `kubectl get pods` and their events.")
    _log(f"{message}; exiting {int(ExitCode.RENDEZVOUS_TIMEOUT)}")
    report_failure(int(ExitCode.RENDEZVOUS_TIMEOUT), ExitCode.RENDEZVOUS_TIMEOUT.name, message)
    return int(ExitCode.RENDEZVOUS_TIMEOUT)


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
    # PID 1 of a container ignores a signal it has no handler for: without this, a SIGTERM while waiting
    # for DNS would cost the whole grace period. torchrun installs its own handler once workers start.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    env = torchrun_env()
    code = dns_wait(str(env["master_addr"]), int(env["master_port"]))
    if code is not None:
        return code
    torchrun_args = [
        f"--nnodes={env['nnodes']}",
        f"--nproc-per-node={env['nproc_per_node']}",
        f"--node-rank={env['node_rank']}",
        f"--master-addr={env['master_addr']}",
        f"--master-port={env['master_port']}",
        "--rdzv-backend=static",
        *rendezvous_conf(),
        "--max-restarts=0",
        *shutdown_timeout(grace_period(args.job)),
        *train_command(args.job, args.stage, args.storage),
    ]
    _log(f"torchrun {' '.join(torchrun_args)}")
    return run_torchrun(torchrun_args)


if __name__ == "__main__":
    sys.exit(main())
