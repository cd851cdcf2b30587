"""The job document the operator hands the trainer: the spec it validated, written out in full, and a
trainer that refuses a document it cannot read instead of running something else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mmalign import __version__
from mmalign.api import jobfile, runtime, stages
from mmalign.api.keys import ANNOTATION_JOB_FILE_FORMAT, ANNOTATION_OPERATOR_VERSION
from mmalign.operator.builders import JOB_FILE_KEY, JobRef, build_config_map

REPO = Path(__file__).resolve().parents[2]


def _config_map_document(example: str = "tiny-cpu") -> dict:
    manifest = jobfile.load_job(REPO / "manifests/examples" / f"{example}.yaml")
    job = JobRef(name="j", namespace="ns", uid="u", spec=manifest.spec)
    return yaml.safe_load(build_config_map(job)["data"][JOB_FILE_KEY])


def test_the_config_map_carries_every_default_the_operator_validated() -> None:
    document = _config_map_document()
    dpo = document["spec"]["stages"]["dpo"]
    # values the user never wrote are there, so another trainer version cannot pick its own
    defaults = stages.DpoStage()
    assert dpo["learningRate"] == 1.0e-3  # the user's value
    assert dpo["warmupRatio"] == defaults.warmup_ratio and dpo["maxGradNorm"] == defaults.max_grad_norm
    assert document["spec"]["checkpoint"]["asyncUpload"] == runtime.CheckpointSpec().async_upload
    assert document["spec"]["runPolicy"]["retryableExitCodes"] == [5, 6, 9, 10]
    annotations = document["metadata"]["annotations"]
    assert annotations[ANNOTATION_OPERATOR_VERSION] == __version__
    assert annotations[ANNOTATION_JOB_FILE_FORMAT] == str(jobfile.JOB_FILE_FORMAT)
    # and it reads back to exactly the spec the operator holds
    again = jobfile.parse(document)
    assert again.spec == jobfile.load_job(REPO / "manifests/examples/tiny-cpu.yaml").spec


def _keys(value: object, path: str = "") -> set[str]:
    if isinstance(value, dict):
        return {path} | {k for key, item in value.items() for k in _keys(item, f"{path}.{key}")}
    return {path}


def test_every_field_is_written_out() -> None:
    # Every field of every model, defaulted or not, is in the document: a trainer with other defaults
    # has nothing left to fill in.
    document = _config_map_document("llava-ov-7b")
    full = jobfile.parse(document).spec.model_dump(by_alias=True, mode="json")
    assert _keys(document["spec"]) == _keys(full)
    assert "spec.stages.dpo.dynamicRewardScaling.k" in {"spec" + k for k in _keys(document["spec"])}


def test_another_api_version_is_refused_with_what_to_do() -> None:
    document = _config_map_document()
    document["apiVersion"] = "mmalign.io/v1beta9"
    with pytest.raises(jobfile.JobFileError, match=r"v1beta9.*reads mmalign.io/v1alpha1.*trainer image"):
        jobfile.parse(document, "/etc/mmalign/job.yaml")


def test_a_newer_job_file_format_is_refused() -> None:
    document = _config_map_document()
    document["metadata"]["annotations"][ANNOTATION_OPERATOR_VERSION] = "9.0.0"
    document["metadata"]["annotations"][ANNOTATION_JOB_FILE_FORMAT] = str(jobfile.JOB_FILE_FORMAT + 1)
    with pytest.raises(jobfile.JobFileError, match=r"operator 9.0.0 .*format 2.*reads format 1"):
        jobfile.parse(document, "job.yaml")


def test_fields_of_a_newer_operator_name_both_versions() -> None:
    document = _config_map_document()
    document["metadata"]["annotations"][ANNOTATION_OPERATOR_VERSION] = "9.0.0"
    document["spec"]["stages"]["dpo"]["someFutureKnob"] = 3
    with pytest.raises(jobfile.JobFileError, match=r"(?s)operator 9.0.0.*mmalign .*someFutureKnob"):
        jobfile.parse(document, "job.yaml")
    document["metadata"]["annotations"][ANNOTATION_OPERATOR_VERSION] = __version__
    with pytest.raises(ValidationError, match="someFutureKnob"):  # same version: the plain field error
        jobfile.parse(document, "job.yaml")


def test_a_users_own_sparse_file_still_reads() -> None:
    manifest = jobfile.load_job(REPO / "manifests/examples/tiny-cpu.yaml")
    assert manifest.spec.stages.enabled() == ["reward", "score", "dpo"]
