"""Shared fixtures: tiny seeded models built from configs/models/*.json, no network, all output in tmp_path.

A guard at the end of the session fails the run when any test left a file in the repository (everything a test
writes belongs under its tmp_path)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "configs" / "models" / "tiny-llama.json"
TINY_BERT = REPO / "configs" / "models" / "tiny-bert.json"

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n\n"
)


SMOKE = f"""
name: smoke
model: tiny:{TINY_LLAMA}
seed: 0
stages:
  - cast: {{dtype: bfloat16}}
  - cast: {{dtype: float16, from: base, name: fp16}}
"""


def write_pipeline(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def cli(*args):
    """Invoke the command line in-process; an exception that escapes is a test failure, not an exit code."""
    from click.testing import CliRunner

    from compress.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------------------ isolation


def _repo_files() -> dict[str, int]:
    """Every file under the repository (not .git, caches or installed-package metadata) -> its mtime in ns."""
    skip = {".git", "__pycache__", ".pytest_cache"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for f in filenames:
            path = os.path.join(dirpath, f)
            try:
                out[os.path.relpath(path, REPO)] = os.stat(path).st_mtime_ns
            except OSError:
                continue
    return out


def pytest_sessionstart(session):
    session.config._repo_files_at_start = _repo_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test left files in the repository or changed one (tests write under tmp_path only)."""
    before = getattr(session.config, "_repo_files_at_start", None)
    if before is None:
        return
    after = _repo_files()
    stray = sorted(p for p in after if p not in before or after[p] != before[p])
    if stray:
        print(f"\nerror: tests left or changed {len(stray)} file(s) in the repository (write under tmp_path): "
              + ", ".join(stray[:10]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the suite is many small forwards: no thread-pool overhead, no
    oversubscription when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
