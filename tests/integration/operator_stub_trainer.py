"""A stand-in for `mmalign launch` in the operator's integration tests (started with --trainer-command).

It checks what a real trainer relies on, prints it for the tests to read with `kubectl logs`, then
pretends to train, printing `mmalign-progress` lines on rank 0 like the real trainer. Behaviour comes
from the pod's env (set through the job's podTemplate.env):

  STUB_STEPS (3), STUB_STEP_SECONDS (0.2)       how long a stage "trains"
  STUB_FAIL_CODE, STUB_FAIL_RANK (0), STUB_FAIL_STAGE (any), STUB_FAIL_ATTEMPTS (all)
      exit with STUB_FAIL_CODE at step 2 on that rank, in attempts below STUB_FAIL_ATTEMPTS
      (codes >= 128 are raised as the real signal: 137 is SIGKILL). Codes below 128 end the way the
      real trainer ends: its own `report_failure` prints `mmalign: NAN_LOSS (exit 4): loss is nan at
      step 2` (code 4; other codes `mmalign: <KIND> (exit N): stub failure at step 2`) on stderr and
      writes it to the termination-message file.
  STUB_CHECKPOINT_DIR                           a checkpoint: rank 0 writes the step it finished to
      DIR/<job>-<stage> after every step and names it in its progress lines (`checkpoint`); every rank
      starts after the step found there (`stub-resume <step>` in the log; rank 0 also appends
      `<attempt> <step>` to DIR/<job>-<stage>.resumes), as the real trainer resumes from `latest`. Every
      step is committed, so a SIGTERM (exit 143) loses none.

On the real node (MMALIGN_NODE=real) it runs in containers of the project's slim operator image, from a
ConfigMap mounted at /stub (tests/integration/test_operator_lifecycle.py, `StubTrainer`).

Like the real trainer it never prints a secret: the credentials it checks are shown as a digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time

# mmalign is imported inside the functions: the SIGTERM handler must be in place first. In a container
# the stub is PID 1, and PID 1 ignores a SIGTERM it has no handler for, so a pod deleted while the stub
# was still importing would wait its whole terminationGracePeriodSeconds.


def digest(value: str | None) -> str | None:
    """Enough to check a credential arrived, without writing it to the log (or a status message)."""
    return hashlib.sha256(value.encode()).hexdigest()[:12] if value is not None else None


def fail(code: int, step: int) -> int:
    """End like the real trainer (trainer/train.py): one line on stderr and in the termination log."""
    from mmalign.api.exit_codes import ExitCode
    from mmalign.trainer.failures import report_failure

    try:
        kind = ExitCode(code).name
    except ValueError:
        kind = "ERROR"
    why = f"loss is nan at step {step}" if code == ExitCode.NAN_LOSS else f"stub failure at step {step}"
    report_failure(code, kind, RuntimeError(why))
    return code


def main(argv: list[str]) -> int:
    from mmalign.api.jobfile import load_job

    job_file = argv[argv.index("--job") + 1]
    stage = argv[argv.index("--stage") + 1]
    env = os.environ
    names = ["PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
             "MASTER_ADDR", "MASTER_PORT", "MMALIGN_ATTEMPT", "MMALIGN_STAGE"]
    shown = {name: env.get(name) for name in names}
    shown["AWS_ACCESS_KEY_ID_sha256"] = digest(env.get("AWS_ACCESS_KEY_ID"))
    print("stub-env " + json.dumps(shown), flush=True)
    job = load_job(job_file)
    assert stage in job.spec.stages.enabled(), (stage, job.spec.stages.enabled())
    deadline = time.monotonic() + 30
    while True:  # like `mmalign launch`: wait for the master's DNS instead of failing on it
        try:
            address = socket.getaddrinfo(env["MASTER_ADDR"], int(env["MASTER_PORT"]))[0][4][0]
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"stub-dns-failed {env['MASTER_ADDR']}", flush=True)
                return 6
            time.sleep(0.2)
    print(f"stub-dns {env['MASTER_ADDR']} {address}", flush=True)

    rank, attempt = int(env["PET_NODE_RANK"]), int(env["MMALIGN_ATTEMPT"])
    steps, pause = int(env.get("STUB_STEPS", "3")), float(env.get("STUB_STEP_SECONDS", "0.2"))
    fail_code = int(env.get("STUB_FAIL_CODE", "0"))
    fails = (fail_code and rank == int(env.get("STUB_FAIL_RANK", "0"))
             and env.get("STUB_FAIL_STAGE", stage) == stage
             and attempt < int(env.get("STUB_FAIL_ATTEMPTS", "1000")))
    checkpoint = (os.path.join(env["STUB_CHECKPOINT_DIR"], f"{job.metadata['name']}-{stage}")
                  if env.get("STUB_CHECKPOINT_DIR") else None)
    first = 1
    if checkpoint and os.path.exists(checkpoint):
        with open(checkpoint) as saved:
            first = int(saved.read()) + 1
        print(f"stub-resume {first - 1}", flush=True)
        if rank == 0:
            with open(checkpoint + ".resumes", "a") as resumes:
                resumes.write(f"{attempt} {first - 1}\n")
    started = time.monotonic()
    for step in range(first, steps + 1):
        time.sleep(pause)
        if fails and step == 2:
            if fail_code >= 128:
                os.kill(os.getpid(), fail_code - 128)
            return fail(fail_code, step)
        if rank == 0:
            if checkpoint:  # written whole, then renamed: a reader never sees half a number
                with open(checkpoint + ".tmp", "w") as out:
                    out.write(str(step))
                os.replace(checkpoint + ".tmp", checkpoint)
            eta = (time.monotonic() - started) / (step - first + 1) * (steps - step)
            print("mmalign-progress " + json.dumps({
                "stage": stage, "step": step, "total": steps, "loss": 1.0 / step, "eta_seconds": eta,
                "epoch": 0, "metrics": {"reward_accuracy": 0.5 + step / (2 * steps)},
                **({"checkpoint": f"file://{checkpoint}/step-{step}"} if checkpoint else {}),
            }), flush=True)
    return 0


def supervise() -> int | None:
    """In a container the stub is PID 1, and the kernel delivers no signal to PID 1 that it has no
    handler for, SIGKILL included: a stub "killed" with STUB_FAIL_CODE=137 would live on. So PID 1 runs
    the stub as its child (None: this is the child), passes SIGTERM on and exits as a shell does, 128 + N
    for a child killed by signal N, the code the kubelet reports for a killed container."""
    child = os.fork()
    if child == 0:
        return None
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # first: the child inherits it
    if os.getpid() == 1 and (exit_code := supervise()) is not None:
        sys.exit(exit_code)
    sys.exit(main(sys.argv[1:]))
