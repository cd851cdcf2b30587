"""How a stage's end becomes an exit code and one line a user reads.

    code, kind = classify(error, manifest, stage)          # ExitCode (mmalign/api/exit_codes.py), its name
    report_failure(code, kind, failure_message(code, error, manifest, stage))

The line `mmalign: <KIND> (exit N): <reason>` goes to stderr and, in a pod, to the termination log
(Kubernetes' termination message), where the operator's failure policy reads it into the job's
conditions and events. The exit code decides retryable or permanent there (runPolicy.retryableExitCodes).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from mmalign.api import conditions, keys
from mmalign.api.exit_codes import ExitCode

TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath


def termination_log_path() -> str:
    # A process cannot have /dev/termination-log of its own: the dev cluster's process node gives each
    # container start a file and names it in keys.ENV_TERMINATION_LOG (devcluster/podspec.py).
    return os.environ.get(keys.ENV_TERMINATION_LOG) or TERMINATION_LOG


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what it wraps (__cause__/__context__), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# gloo's and NCCL's words for a peer or the network breaking a collective (a restart can cure them);
# not NCCL's "invalid usage" or a CUDA error, which a restart repeats.
_COMMUNICATION_WORDS = ("connection reset by peer", "connection closed by peer", "connection refused",
                        "broken pipe", "unhandled system error", "remote process exited", "ncclremoteerror",
                        "ncclsystemerror", "socket timeout", "gloo/transport")


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported: not a torch error (and classify stays cheap)
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return any((oom_type is not None and isinstance(e, oom_type))
               or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()) for e in _chain(error))


def is_communication_error(error: BaseException) -> bool:
    distributed = sys.modules.get("torch.distributed")
    dist_error = getattr(distributed, "DistError", None) if distributed is not None else None
    return any((dist_error is not None and isinstance(e, dist_error))
               or (isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COMMUNICATION_WORDS))
               for e in _chain(error))


def storage_permanent_message(error: Any, spec: Any) -> str:
    """What to do about a permanent S3 refusal: the bucket and the Secret to fix. Never the keys."""
    # short (a condition message keeps conditions.MESSAGE_LIMIT characters): the action, then the call
    bucket = f"bucket {error.bucket!r}" if error.bucket else "the bucket"
    what = str(error).split(": ", 1)[0][:90]  # "read s3://bucket/key", from with_retries
    if error.no_such_bucket:
        return f"{bucket} does not exist ({what}): create it, or fix the s3:// URI in the spec"
    secret = getattr(getattr(spec, "storage", None), "credentials_secret", None)
    keys = (f"fix the keys in the Secret {secret!r} (spec.storage.credentialsSecret)" if secret
            else "name a Secret with working keys in spec.storage.credentialsSecret (or fix the pod's "
            "cloud identity)")
    return f"S3 refused access to {bucket} ({error.code} on {what}): {keys}, and let them access the bucket"


def out_of_memory_message(error: BaseException, manifest: Any, stage: str | None) -> str:
    """CUDA OOM, with the batch size that caused it and what to try."""
    config = getattr(getattr(getattr(manifest, "spec", None), "stages", None), stage or "", None)
    if stage == "score" and config is not None:
        size = f"batchSize {config.batch_size} (spec.stages.score.batchSize)"
        tries = "lower spec.stages.score.batchSize"
    elif config is not None and hasattr(config, "micro_batch_size"):
        size = f"microBatchSize {config.micro_batch_size} (spec.stages.{stage}.microBatchSize)"
        tries = ("lower it and raise gradientAccumulation, or set deepspeed.gradientCheckpointing: true, "
                 "or deepspeed.zeroStage: 3")
    else:
        size, tries = "this batch size", "lower the batch size"
    tried = re.search(r"tried to allocate [0-9.]+ \w+", str(error), re.IGNORECASE)
    return f"CUDA out of memory at {size}{f' ({tried.group(0)})' if tried else ''}: {tries}"


def classify(error: BaseException, manifest: Any = None, stage: str | None = None) -> tuple[ExitCode | int, str]:
    """(exit code, kind) for an exception that ended a stage; `manifest`/`stage` (when loaded) let
    `failure_message` name the setting to change."""
    from pydantic import ValidationError

    from mmalign.trainer.storage import StorageError, StoragePermanentError

    code = getattr(error, "exit_code", None)
    if code is not None:
        return ExitCode(code), ExitCode(code).name
    if any(isinstance(e, StoragePermanentError) for e in _chain(error)):
        return ExitCode.STORAGE_PERMANENT, "STORAGE_PERMANENT"
    if isinstance(error, StorageError):
        return ExitCode.STORAGE_ERROR, "STORAGE_ERROR"
    if isinstance(error, ValidationError | FileNotFoundError) or type(error).__name__ == "YAMLError":
        return ExitCode.CONFIG_ERROR, "CONFIG_ERROR"
    if is_out_of_memory(error):
        return ExitCode.OUT_OF_MEMORY, "OUT_OF_MEMORY"
    if is_communication_error(error):
        return ExitCode.COMMUNICATION_ERROR, "COMMUNICATION_ERROR"
    return 1, "ERROR"


def failure_message(code: int, error: BaseException, manifest: Any = None, stage: str | None = None) -> str:
    """The failure's one line: the error's own text, or for STORAGE_PERMANENT/OUT_OF_MEMORY what to do."""
    if code == ExitCode.STORAGE_PERMANENT:
        from mmalign.trainer.storage import StoragePermanentError

        permanent = next(e for e in _chain(error) if isinstance(e, StoragePermanentError))
        return one_line(storage_permanent_message(permanent, getattr(manifest, "spec", None)))
    if code == ExitCode.OUT_OF_MEMORY:
        return one_line(out_of_memory_message(error, manifest, stage))
    if code == ExitCode.COMMUNICATION_ERROR:
        return one_line(f"a collective failed (NCCL/gloo: a peer or the network; retryable): {error}")
    return one_line(error)


def one_line(error: BaseException | str) -> str:
    """The error's text on one line, cut in the middle when long (conditions.shorten: the reason at its
    head and the advice at its tail survive; the operator cuts the same way)."""
    return conditions.shorten(str(error)) or type(error).__name__


def report_failure(code: int, kind: str, error: BaseException | str) -> None:
    """Print `mmalign: KIND (exit N): message` and write it to the termination log (a str is the message)."""
    line = f"mmalign: {kind} (exit {code}): {one_line(error)}"
    print(line, file=sys.stderr, flush=True)
    path = termination_log_path()
    if os.path.exists(path) and os.access(path, os.W_OK):  # in a pod; elsewhere stderr is enough
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass
