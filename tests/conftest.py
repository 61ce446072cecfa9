"""Shared fixtures: tiny tokenizers, models and data that the tests build themselves (no hub)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-cache-"))  # never the user's cache

import tiny


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_base_tokenizer_dir(tmp_path_factory) -> Path:
    """A base model's tokenizer: no ChatML tokens, no chat template (what data.add_special_tokens is for)."""
    return tiny.build_tokenizer(tmp_path_factory.mktemp("base-tokenizer"), base=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """tiny_model_dir(family) -> a saved random model of that family, built once per session."""
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = tiny.build_model(family, tmp_path_factory.mktemp(family), tiny_tokenizer_dir)
        return built[family]

    return get


@pytest.fixture(scope="session")
def serving_runs(tmp_path_factory, tiny_model_dir):
    """The quickstart run and the yes/no/other-base adapters of tests/support/serving.py, trained once per session."""
    import serving

    return serving.build(tmp_path_factory.mktemp("serving"), tiny_model_dir("llama"))
