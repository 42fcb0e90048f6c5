"""Shared fixtures: tiny seeded models built from configs/models/*.json, no network, all output in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and the suite's tests are many small forwards: avoid the
# thread-pool overhead (and oversubscription when other jobs share the cores).
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# what artifacts/ held before any test ran (a user's own runs, e.g. the demo): tests must add nothing to it
ARTIFACTS_AT_START = {q.name for q in (REPO / "artifacts").iterdir()} if (REPO / "artifacts").is_dir() else set()
TINY_LLAMA = REPO / "configs" / "models" / "tiny-llama.json"
TINY_BERT = REPO / "configs" / "models" / "tiny-bert.json"

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n\n"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every cache the code writes (token blocks, zoo conversions) goes under a temp dir, never ~/.cache."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "compress-cache"))


@pytest.fixture
def tiny_llama():
    from compress.tiny import build

    return build(TINY_LLAMA, seed=0)


@pytest.fixture
def tiny_bert():
    from compress.tiny import build

    return build(TINY_BERT, seed=0)


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small local .txt corpus (paragraphs separated by blank lines), about 40 KB."""
    p = tmp_path / "corpus.txt"
    paras = [f"Chapter {i}. " + TEXT.replace("man", f"man number {i}") for i in range(100)]
    p.write_text("".join(paras))
    return p
