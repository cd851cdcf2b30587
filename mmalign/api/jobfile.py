"""The job document: what the operator hands the trainer (ConfigMap `<job>-config`, key `job.yaml`).

    document = jobfile.job_document(name, namespace, spec, operator_version)   # the operator
    text = jobfile.dump(document)
    manifest = jobfile.load_job("/etc/mmalign/job.yaml")                       # the trainer

The spec in it is FULLY DEFAULTED: every value the operator validated and shows (β, w, k, learning
rate, ...) is written out, so a trainer image of another version cannot silently run other defaults.
The document carries the operator's version and the job-file format; a trainer refuses, with a clear
error, a document of another API version or a newer format, and names both versions when the spec
holds fields it does not know. A user's own YAML (`mmalign run --local`, `mmalign train`) has neither
annotation and is read as written, its defaults filled in from the same models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mmalign import __version__
from mmalign.api.exit_codes import ExitCode
from mmalign.api.groupversion import API_VERSION_FULL, KIND
from mmalign.api.keys import ANNOTATION_JOB_FILE_FORMAT, ANNOTATION_OPERATOR_VERSION
from mmalign.api.spec import AlignmentJobManifest, AlignmentJobSpec

JOB_FILE_FORMAT = 1  # raise when the document's shape changes in a way an older trainer cannot read


class JobFileError(ValueError):
    """The job file cannot be read by this trainer (another API version, a newer format): permanent."""

    exit_code = ExitCode.CONFIG_ERROR


def spec_document(spec: AlignmentJobSpec) -> dict[str, Any]:
    """The spec as the job file holds it: camelCase, every field written out (the one serialization of a
    spec the operator uses: for the ConfigMap, and to compare the spec in use with a changed one)."""
    document: dict[str, Any] = spec.model_dump(by_alias=True, mode="json")
    return document


def job_document(name: str, namespace: str, spec: AlignmentJobSpec,
                 operator_version: str = __version__) -> dict[str, Any]:
    """The whole AlignmentJob as the trainer reads it: fully defaulted spec, no status, no server fields."""
    return {
        "apiVersion": API_VERSION_FULL,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {
                ANNOTATION_OPERATOR_VERSION: operator_version,
                ANNOTATION_JOB_FILE_FORMAT: str(JOB_FILE_FORMAT),
            },
        },
        "spec": spec_document(spec),
    }


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def parse(document: Any, source: str = "job file") -> AlignmentJobManifest:
    """A job document (already parsed YAML) -> the validated manifest, or a clear error."""
    if not isinstance(document, dict):
        raise JobFileError(f"{source}: expected an AlignmentJob document (a YAML mapping)")
    if document.get("apiVersion") != API_VERSION_FULL:
        raise JobFileError(
            f"{source}: apiVersion {document.get('apiVersion')!r}, but this trainer (mmalign {__version__}) "
            f"reads {API_VERSION_FULL}: run a trainer image that matches the operator (chart value "
            "trainer.image, or spec.image)")
    annotations = (document.get("metadata") or {}).get("annotations") or {}
    written_by = annotations.get(ANNOTATION_OPERATOR_VERSION)
    file_format = annotations.get(ANNOTATION_JOB_FILE_FORMAT)
    if file_format is not None and int(file_format) > JOB_FILE_FORMAT:
        raise JobFileError(
            f"{source}: written by operator {written_by} in job-file format {file_format}; this trainer "
            f"(mmalign {__version__}) reads format {JOB_FILE_FORMAT}: run a trainer image that matches the "
            "operator (chart value trainer.image, or spec.image)")
    try:
        return AlignmentJobManifest.model_validate(document)
    except ValidationError as error:
        if written_by and written_by != __version__:
            raise JobFileError(
                f"{source}: written by operator {written_by}, which this trainer (mmalign {__version__}) "
                f"cannot read: run a trainer image that matches the operator. {error}") from error
        raise


def spec_of(text: str) -> AlignmentJobSpec | None:
    """The spec in a job file's text (the operator reads back the ConfigMap it wrote), or None when the
    text is not a job file this version reads."""
    try:
        return parse(yaml.safe_load(text)).spec
    except (JobFileError, ValidationError, yaml.YAMLError):
        return None


def load_job(path: str | Path) -> AlignmentJobManifest:
    """Read the job file the trainer is given (`--job FILE`): a whole AlignmentJob document.

    Raises JobFileError or pydantic.ValidationError; `mmalign validate` turns the latter into file:line
    reports."""
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    return parse(document, str(path))
