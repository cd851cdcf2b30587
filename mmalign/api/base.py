"""The base of the AlignmentJob's pydantic models (mmalign/api/spec.py, runtime.py, stages.py): camelCase
aliases, unknown fields refused, and the CEL rules' schema extra."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


def rules(*pairs: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the CRD: (rule, message) pairs -> the `x-kubernetes-validations` schema extra."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in pairs]}


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields are errors (nothing a user wrote is silently dropped)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=False
    )
