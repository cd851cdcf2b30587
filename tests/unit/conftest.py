"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mmalign.trainer import models, s3client, tiny
from tests.s3_server import S3Server, require_weed


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`s3://<bucket>` on a real S3 server (SeaweedFS) of the module's own, with the trainer's S3 client
    pointed at it for the module's tests; the environment is restored afterwards."""
    require_weed()
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3client.configure()
    yield f"s3://{server.bucket}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3client.configure()
    server.stop()


# The model families prefix sharing and packing must match the plain path for (test_prefix_sharing.py,
# test_packing.py).
FAMILIES = ("tiny-text", "tiny-llama", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision")


def _llama() -> tuple[Any, Any]:
    """A LLaMA-architecture decoder on the tiny text tokenizer (the builtins' text LM is Qwen2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny.build_tokenizer("text")
    torch.manual_seed(0)
    config = LlamaConfig(**tiny._text_config(tokenizer, tiny.SIZES["tiny"]))
    return LlamaForCausalLM(config).float(), tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """(name, model, processor) for each family in FAMILIES, built once per module."""
    if request.param == "tiny-llama":
        model, processor = _llama()
    else:
        model, processor = models.load_model(f"builtin://{request.param}")
    return request.param, model, processor
