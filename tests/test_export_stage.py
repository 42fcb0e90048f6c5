"""The export stage in a pipeline: a GGUF that llama.cpp / Ollama serve at once (a gptq stage's own codes), a
compressed-tensors folder for vLLM, their manifests, and refusals before any file is written."""

from __future__ import annotations

import gguf
import pytest

from compress import config, manifest, pipeline
from compress.errors import CompressError
from compress.export import llamacpp

from conftest import TINY_LLAMA, write_pipeline


def _run(tmp_path, text_file, stages: str, name="ex"):
    p = write_pipeline(tmp_path, f"""
name: {name}
model: tiny:{TINY_LLAMA}
data: {{calibration: {text_file}}}
eval: {{perplexity: [{text_file}], seq_len: 64, max_tokens: 256, speed: false}}
stages:
{stages}
""")
    return pipeline.run(config.load(p), out_root=tmp_path / "runs", log=lambda m: None, quiet=True)


def test_gguf_export_of_a_gptq_stage_is_its_own_codes(tmp_path, text_file):
    res = _run(tmp_path, text_file, """
  - gptq: {method: rtn, group_size: 32}
  - export: {format: gguf}
""")
    m = res[-1].manifest
    folder = tmp_path / "runs" / "ex" / "02-export"
    assert m["format"] == "gguf-q4_0" and m["stats"]["written"]["type"] == "q4_0"  # auto: the gptq grid's type
    assert (folder / "Modelfile").read_text() == "FROM ./model.gguf\n"
    reader = gguf.GGUFReader(folder / "model.gguf")
    assert m["size"]["disk_bytes"] == (folder / "model.gguf").stat().st_size
    assert m["size"]["bits_per_weight"] < 8 and m["output_hash"] != res[1].manifest["output_hash"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    if llamacpp.available():  # the runtime checked its own file under the pipeline's protocol
        ppl = m["accuracy"]["perplexity"][str(text_file)]
        assert m["stats"]["runtime_check"] == "loaded in llama.cpp" and ppl["protocol"]["runtime"] == "llama.cpp"
        assert ppl["value"] > 1 and 0 <= ppl["top1"] <= 1 and ppl["kl"] >= 0
        assert m["speed"]["decode_tokens_per_s"] > 0
    else:
        assert m["stats"]["runtime_check"].startswith("not checked: llama-cpp-python is not installed")
    again = _run(tmp_path, text_file, """
  - gptq: {method: rtn, group_size: 32}
  - export: {format: gguf}
""")
    assert [r.status for r in again] == ["skipped"] * 3


def test_gguf_grid_that_does_not_match_is_refused_before_work(tmp_path, text_file):
    with pytest.raises(CompressError, match="export type q4_0 needs a gptq stage with bits 4 and a group size that is"):
        _run(tmp_path, text_file, """
  - gptq: {method: rtn, bits: 8, group_size: 32}
  - export: {format: gguf, type: q4_0}
""")
    assert not (tmp_path / "runs" / "ex").exists()


def test_compressed_tensors_export_decompresses_to_our_logits(tmp_path, text_file):
    pytest.importorskip("compressed_tensors", reason="the compressed-tensors library is an optional extra ([ct])")
    res = _run(tmp_path, text_file, """
  - gptq: {method: rtn, group_size: 32}
  - export: {format: compressed-tensors}
""", name="ct")
    m = res[-1].manifest
    folder = tmp_path / "runs" / "ct" / "02-export"
    assert m["format"] == "compressed-tensors" and m["stats"]["runtime_check"] == "decompressed by compressed-tensors"
    assert m["stats"]["decompressed_max_rel_error"] <= 1e-3
    cfg = manifest.json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


def test_compressed_tensors_needs_a_gptq_input(tmp_path, text_file):
    with pytest.raises(CompressError, match="compressed-tensors takes a gptq stage"):
        _run(tmp_path, text_file, "  - export: {format: compressed-tensors}\n")
