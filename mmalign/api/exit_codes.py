"""The trainer's exit codes: `mmalign train`/`mmalign launch` end with one of them, the operator's failure
policy (operator/policy.py) turns them into retryable or permanent failures and condition reasons."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    CONFIG_ERROR = 2  # the job spec cannot run as written: permanent
    DATA_ERROR = 3  # a malformed line, missing media, empty dataset: permanent
    NAN_LOSS = 4  # the loss became NaN/inf: permanent (restarting would repeat it)
    STORAGE_ERROR = 5  # S3 unreachable after retries: retryable
    RENDEZVOUS_ERROR = 6  # `mmalign launch`: the master address never resolved (MMALIGN_DNS_WAIT_SECONDS)
    STORAGE_PERMANENT = 7  # S3 refused for good (403 access denied / bad keys, 404 no such bucket): permanent
    OUT_OF_MEMORY = 8  # CUDA out of memory (the message names the micro-batch size): permanent
    COMMUNICATION_ERROR = 9  # NCCL/gloo: a peer or the network broke a collective: retryable
    RENDEZVOUS_TIMEOUT = 10  # `mmalign launch`: the gang did not assemble in time (a pod pending?): retryable
    # SIGTERM (suspend, preemption, drain, pod deletion): every rank committed the checkpoint of the step it
    # reached, then stopped. 128 + SIGTERM, what a process killed by it shows: retryable (>= 128), no work lost.
    STOPPED = 143
