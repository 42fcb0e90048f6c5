"""Runtime memory control and measurement (compress/measure.py): a measured peak means growth over what was
resident, the mmap threshold is read from the environment, and paging out mapped weights keeps their values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compress import measure
from compress.errors import CompressError

TINY_LLAMA = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.json"


def test_peak_memory_measures_growth():
    with measure.PeakMemory("cpu") as m:
        x = torch.ones(16 * 2**20)  # 64 MiB
        del x
    assert m.method == "rss-growth"
    assert 60 * 2**20 <= m.measured_bytes <= 80 * 2**20
    assert measure.compare(64 * 2**20, m.measured_bytes)[1]
    assert not measure.compare(10 * 2**20, 200 * 2**20)[1]


def _mid_model(tmp_path, vocab=8192, hidden=512, layers=4):
    from compress.tiny import build

    cfg = json.loads(TINY_LLAMA.read_text()) | {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                                               "intermediate_size": 4 * hidden, "num_attention_heads": 8, "head_dim": 64}
    path = tmp_path / "mid.json"
    path.write_text(json.dumps(cfg))
    return build(path, seed=0)[0]


def test_mmap_threshold_setting_reads_the_environment(monkeypatch):
    monkeypatch.setenv(measure.MMAP_THRESHOLD_ENV, "0")
    assert measure.fixed_mmap_threshold() == 0                      # 0: glibc's own behaviour, nothing set
    monkeypatch.setenv(measure.MMAP_THRESHOLD_ENV, "lots")
    with pytest.raises(CompressError, match="COMPRESS_MMAP_THRESHOLD"):
        measure.fixed_mmap_threshold()


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_PAGEOUT) is Linux's")
def test_page_out_mapped_releases_pages_and_keeps_values(tmp_path):
    """Weights loaded from safetensors are views of a file mapping: paging them out hands their pages back
    (the GPTQ/RTN stages do it block by block) and never changes what they hold; other tensors are ignored."""
    from transformers import AutoModelForCausalLM

    model = _mid_model(tmp_path, layers=2)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    weights = [m.weight for m in loaded.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    before = [w.detach().clone() for w in weights]
    advised = measure.page_out_mapped(weights)
    assert advised > 0.9 * sum(w.numel() * 4 for w in weights)  # all but partial pages at the ends
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # read back from the file
    assert measure.page_out_mapped([torch.ones(2**20), weights[0].t()]) == 0  # anonymous memory; a transposed view
