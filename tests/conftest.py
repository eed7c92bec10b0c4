"""Shared fixtures: the embedded SmolLM2 model loaded once per session by slimlm and by transformers."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SLIMLM_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm_path():
    from slimlm.loading import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' own GGUF loader: the reference for logits and generations."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def smollm():
    """slimlm's load of the embedded default (fp32), shared by every test that only reads it."""
    from slimlm.loading import load

    return load(None, dtype="float32", progress=False)
