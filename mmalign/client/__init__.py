"""`mmalign.client`: drive AlignmentJobs from Python (a notebook, a script), as `mmalign jobs` does.

    from mmalign.client import Client

    jobs = Client()                                  # the kubeconfig's current context and namespace
    name = jobs.create("manifests/examples/tiny-cpu.yaml")   # or a dict; validated like `mmalign validate`
    status = jobs.wait(name)                         # a progress bar (tqdm if installed), raises JobFailed
    jobs.metrics(name)                               # {"reward": {"loss": 0.41, ...}, "dpo": {...}}
    jobs.artifacts(name)                             # {"reward": "s3://.../reward/final", ...}
    for line in jobs.logs(name, follow=True):        # the current stage's rank-0 pod, across restarts
        print(line.text)

Needs the `kubernetes` package (`pip install 'mmalign[client]'`); tqdm is optional.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from mmalign.api.groupversion import API_GROUP, API_VERSION, KIND, PLURAL
from mmalign.api.status import JOB_OVER, AlignmentJobStatus
from mmalign.client import tables
from mmalign.client.logs import LogLine, follow_logs, read_logs

__all__ = ["Client", "InvalidJob", "JobFailed", "LogLine"]


class InvalidJob(ValueError):
    """The document is not a valid AlignmentJob; `problems` are `FILE:LINE: field.path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the AlignmentJob is not valid:\n  " + "\n  ".join(problems))
        self.problems = problems


class JobFailed(RuntimeError):
    """`Client.wait` saw the job end Failed; `status` is its final status."""

    def __init__(self, name: str, status: AlignmentJobStatus) -> None:
        super().__init__(f"AlignmentJob {name} failed: {status.message or 'no message'}")
        self.status = status


def load_document(job: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A job from a dict or a YAML file, checked exactly as `mmalign validate` checks files (every
    problem with its field path and line; a dict's lines are those of its YAML dump)."""
    from mmalign.operator.validate import validate_text

    if isinstance(job, dict):
        source, text = "<dict>", yaml.safe_dump(job, sort_keys=False)
    else:
        source, text = str(job), Path(job).read_text(encoding="utf-8")
    problems = validate_text(source, text)
    if problems:
        raise InvalidJob([str(p) for p in problems])
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(documents) != 1:
        raise InvalidJob([f"{source}: expected one AlignmentJob document, found {len(documents)}"])
    document: dict[str, Any] = documents[0]
    return document


class Client:
    """AlignmentJobs in one namespace of one cluster.

    kubeconfig/context: as kubectl reads them (KUBECONFIG, ~/.kube/config; in a pod without either, the
    pod's ServiceAccount). namespace: the context's namespace when not given, else `default`.
    """

    def __init__(
        self, namespace: str | None = None, *, kubeconfig: str | None = None, context: str | None = None
    ) -> None:
        from mmalign.client.connection import connect

        self.api_client, default_namespace = connect(kubeconfig, context)
        self.namespace = namespace or default_namespace
        from kubernetes import client

        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    # ------------------------------------------------------------------------------ objects

    def create(self, job: dict[str, Any] | str | Path) -> str:
        """Create the job (a dict or a YAML file's path) after validating it; returns its name."""
        document = load_document(job)
        namespace = (document.get("metadata") or {}).get("namespace") or self.namespace
        created = self.custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, document
        )
        return str(cast(dict[str, Any], created)["metadata"]["name"])

    def get(self, name: str) -> dict[str, Any]:
        """The AlignmentJob object as the API server returns it."""
        job = self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name)
        return cast(dict[str, Any], job)

    def status(self, name: str) -> AlignmentJobStatus:
        return tables.status_of(self.get(name))

    def list(self, all_namespaces: bool = False) -> builtins.list[dict[str, Any]]:
        if all_namespaces:
            found = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
        else:
            found = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL)
        items: builtins.list[dict[str, Any]] = cast(dict[str, Any], found).get("items", [])
        return sorted(items, key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"]))

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
        )

    def events(self, name: str) -> builtins.list[dict[str, Any]]:
        """The job's Events (core/v1, as the operator posts them), oldest first."""
        selector = f"involvedObject.name={name},involvedObject.kind={KIND}"
        found = self.core.list_namespaced_event(self.namespace, field_selector=selector)
        events: builtins.list[dict[str, Any]] = [
            self.api_client.sanitize_for_serialization(e) for e in found.items
        ]
        return sorted(events, key=tables.event_time)

    # ------------------------------------------------------------------------------ results

    def metrics(self, name: str) -> dict[str, dict[str, float]]:
        """Each stage's latest metrics (its final numbers once it ended), from the status."""
        return {stage: dict(entry.metrics) for stage, entry in tables.stages_of(self.status(name))}

    def artifacts(self, name: str) -> dict[str, str]:
        """Each finished stage's output URI (the final model, the scored pairs), from the status."""
        return {
            stage: entry.artifact for stage, entry in tables.stages_of(self.status(name)) if entry.artifact
        }

    # ------------------------------------------------------------------------------ waiting

    def wait(
        self,
        name: str,
        timeout: float | None = None,
        *,
        progress: bool | Callable[[AlignmentJobStatus], None] = True,
        poll_seconds: float = 2.0,
        raise_on_failure: bool = True,
    ) -> AlignmentJobStatus:
        """Until the job is Succeeded or Failed; returns the final status.

        progress: True shows the active stage's steps (a tqdm bar when tqdm is installed, else one line
        per change on stdout); a callable gets every new status instead. Raises JobFailed when the job
        failed (unless raise_on_failure=False) and TimeoutError after `timeout` seconds.
        """
        show = progress if callable(progress) else ProgressDisplay() if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                status = self.status(name)
                if show is not None:
                    show(status)
                if status.phase in JOB_OVER:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"AlignmentJob {name} still {status.phase} after {timeout:g}s "
                        f"(stage {status.stage or '-'}, {status.progress or 'no progress yet'})"
                    )
                time.sleep(
                    poll_seconds
                    if deadline is None
                    else max(min(poll_seconds, deadline - time.monotonic()), 0)
                )
        finally:
            if isinstance(show, ProgressDisplay):
                show.close()
        if status.phase == "Failed" and raise_on_failure:
            raise JobFailed(name, status)
        return status

    # ------------------------------------------------------------------------------ logs

    def logs(
        self,
        name: str,
        stage: str | None = None,
        follow: bool = False,
        waiting: Callable[[str], None] | None = None,
    ) -> Iterator[LogLine]:
        """The log of the stage's rank-0 pod (the current stage when not given). follow: keep streaming,
        across gang restarts (the next attempt's pod) and, without a stage, into the next stages, until the
        stage (or the job) ends; `waiting` hears what it waits for between pods."""
        if follow:
            return follow_logs(
                self.core, lambda: self.status(name), self.namespace, name, stage, waiting=waiting
            )
        return read_logs(self.core, self.status(name), self.namespace, name, stage)


class ProgressDisplay:
    """The active stage's progress: a tqdm bar per stage when tqdm is installed, else a line per change."""

    def __init__(self, out: TextIO | None = None, bar: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tqdm: Any = None
        if bar is not False:
            try:  # (tqdm.auto: the notebook widget in Jupyter, text in a terminal)
                self.tqdm = importlib.import_module("tqdm.auto").tqdm
            except ImportError:
                self.tqdm = None
        self.bar: Any = None
        self.bar_stage = ""
        self.last = ""

    def __call__(self, status: AlignmentJobStatus) -> None:
        entry = tables.current_stage(status)
        step, total = (entry.progress.step, entry.progress.total) if entry and entry.progress else (0, 0)
        loss = entry.metrics.get("loss") if entry else None
        if self.tqdm is not None:
            if status.stage and status.stage != self.bar_stage:
                self.close()
                self.bar, self.bar_stage = (
                    self.tqdm(desc=status.stage, total=total or None, unit="step"),
                    status.stage,
                )
            if self.bar is not None:
                if total and self.bar.total != total:
                    self.bar.total = total
                self.bar.n = step
                self.bar.set_postfix_str(
                    f"{status.phase}" + (f" loss={tables.number(loss)}" if loss is not None else "")
                )
            return
        line = f"{status.phase}: stage {status.stage or '-'} {tables.step_total(entry)}"
        line += f" loss={tables.number(loss)}" if loss is not None else ""
        if line != self.last:
            print(line, file=self.out, flush=True)
            self.last = line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
