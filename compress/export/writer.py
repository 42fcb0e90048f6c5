"""HF causal LM (plain float, or with GPTQ QuantLinear modules) + tokenizer -> one .gguf file for llama.cpp / Ollama.

    stats = write_gguf(model, tokenizer, "model.q4_0.gguf", type="q4_0")

`type` is the file's weight type: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 (compress/export/ggml.py). Which tensor
gets which type follows llama.cpp's converter (convert_hf_to_gguf.py) and quantizer (llama-quant.cpp):
- 1-D tensors and norms stay f32;
- from a float model, matrices are rounded to nearest into `type` with llama.cpp's reference quantizers
  (gguf.quants); a matrix whose rows are not a multiple of 32 falls back to f16, as in llama-quantize;
- the output matrix (lm_head, or the token embeddings when they are tied and serve as output) is q8_0 for every
  quantized type. llama-quantize uses Q6_K there when rows are a multiple of 256 (else Q8_0); gguf-py has no Q6_K
  quantizer, and q8_0 is the larger, more precise choice. Untied token embeddings take `type`;
- GPTQ QuantLinear layers are re-encoded from their own integer codes and fp16 scales (ggml.encode_quantlinear),
  never rounded again; a checkpoint whose grid has no exact encoding in `type` is refused before any file is
  written (ggml.GPTQ_MATCHING says which settings match); with a float `type` they are dequantized.
Weights of q_proj / k_proj get llama.cpp's RoPE row order (compress/export/arch.py) before encoding; tied
embeddings are written once (llama.cpp uses token_embd as output when there is no output.weight).

Memory: the GGUF header needs every tensor's name, type and size first, so the plan is made from shapes alone; then
tensors are converted and written one at a time (gguf.GGUFWriter's add_tensor_info / write_tensor_data), so RAM holds
the model plus one tensor's conversion. The file is written under a temporary name and renamed when complete.

Not supported: models other than the families in arch.ARCHS, GPTQ 2/3-bit into quantized types, k-quants.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from compress.errors import CompressError
from compress.export import arch as archs
from compress.export import ggml, vocab

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that also writes empty arrays (GGUF allows length 0; gguf-py refuses it). A byte vocabulary
    without merges needs `tokenizer.ggml.merges` present and empty: llama.cpp's BPE loader requires the key."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass
class Planned:
    """One GGUF tensor: where it comes from and how it is made (produce() runs only while writing)."""

    name: str                         # GGUF name, e.g. blk.0.attn_q.weight
    hf_name: str                      # the model's state_dict name (…q_proj.weight for a QuantLinear too)
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]            # element shape, numpy order (rows, K)
    source: str                       # "float" | "gptq" (codes re-encoded) | "gptq-dequantized"
    produce: Callable[[], np.ndarray]


def _quantlinears(model) -> dict:
    from compress.algorithms.gptq import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _sources(model):
    """(hf_name, tensor or QuantLinear) in state_dict order; tied duplicates of the embeddings left out."""
    quant = _quantlinears(model)
    emb = model.get_input_embeddings().weight
    emb_name = None
    for name, t in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        if module in quant:
            if leaf == "qweight":
                yield module + ".weight", quant[module]
            elif leaf == "bias" and t is not None:
                yield name, t
            continue  # qzeros, scales, g_idx belong to the weight
        if t.data_ptr() == emb.data_ptr() and t.shape == emb.shape:
            if emb_name is not None:
                continue  # the tied output: llama.cpp reuses token_embd
            emb_name = name
        yield name, t


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def tensor_type(kind: gguf.MODEL_TENSOR, name: str, shape: tuple[int, ...], type: str, tied: bool):
    """The GGML type of one tensor in a file of `type` (rules in the module docstring)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if type not in ggml.QUANTIZED:
        return ggml.TYPES[type]
    if shape[-1] % ggml.BLOCK:
        return gguf.GGMLQuantizationType.F16
    if kind == gguf.MODEL_TENSOR.OUTPUT or (tied and kind == gguf.MODEL_TENSOR.TOKEN_EMBD):
        return gguf.GGMLQuantizationType.Q8_0
    return ggml.TYPES[type]


def check_model(model, type: str) -> None:
    """Everything that can refuse an export, from config and GPTQ buffers only (no conversion work)."""
    ggml.ggml_type(type)
    archs.arch_of(model.config)
    quant = _quantlinears(model)
    if not quant or type not in ggml.QUANTIZED:
        return
    qc = getattr(model.config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc:
        ggml.check_gptq(type, int(qc.get("bits", 0)), bool(qc.get("sym", True)), int(qc.get("group_size", -1)),
                        bool(qc.get("desc_act", False)), bool(qc.get("static_groups", False)))
    want_bits, want_zero = ggml.GPTQ_GRID[type]
    for name, m in quant.items():  # the buffers must agree with what the config says
        if m.bits != want_bits:
            ggml.check_gptq(type, m.bits, True, -1)
        ggml.block_groups(m.g_idx)
        if want_zero is not None and not bool((m.zeros() == want_zero).all()):
            raise CompressError(f"{name}: GGUF {type} needs every GPTQ zero point == {want_zero} (sym: true); "
                                f"exact matches: {ggml.GPTQ_MATCHING}")


def plan(model, type: str, offset_errors: list | None = None) -> list[Planned]:
    """The tensors of the file in writing order; `offset_errors` collects q4_1 re-encoding errors (in steps)."""
    config = model.config
    arch = archs.arch_of(config)
    names = archs.Names(arch, int(config.num_hidden_layers))
    tied = is_tied(model)
    out = []
    for hf_name, src in _sources(model):
        name, kind = names(hf_name)
        rows = names.rope_rows(hf_name, config)
        if isinstance(src, torch.Tensor):
            shape = tuple(src.shape)
            qtype = tensor_type(kind, name, shape, type, tied)
            out.append(Planned(name, hf_name, qtype, shape, "float", _float_producer(src, rows, qtype)))
            continue
        shape = (src.out_features, src.in_features)
        if type in ggml.QUANTIZED:
            qtype = ggml.TYPES[type]
            out.append(Planned(name, hf_name, qtype, shape, "gptq", _gptq_producer(src, rows, type, offset_errors)))
        else:
            qtype = tensor_type(kind, name, shape, type, tied)
            out.append(Planned(name, hf_name, qtype, shape, "gptq-dequantized",
                               _float_producer(src, rows, qtype, dequantize=True)))
    return out


def _float_producer(t, rows, qtype, dequantize: bool = False):
    def produce() -> np.ndarray:
        w = t.dequantize(torch.float32) if dequantize else t.detach()
        if rows is not None:
            w = w[rows]
        return ggml.quantize(w, qtype)

    return produce


def _gptq_producer(layer, rows, type: str, offset_errors: list | None):
    def produce() -> np.ndarray:
        if offset_errors is not None and type == "q4_1":
            offset_errors.append(ggml.gptq_offset_error(layer.scales, layer.zeros()).flatten())
        return ggml.encode_quantlinear(layer, type, rows=rows)

    return produce


def write_gguf(model, tokenizer, path: str | Path, type: str = "f16", name: str | None = None) -> dict:
    """Write `model` + `tokenizer` as one GGUF file at `path`; return what was written (sizes, types, sources).

    Refuses (CompressError, one line) before writing anything when the architecture, tokenizer or a GPTQ grid
    has no faithful GGUF form.
    """
    t0 = time.perf_counter()
    path = Path(path)
    check_model(model, type)
    config = model.config
    arch = archs.arch_of(config)
    voc = vocab.describe(tokenizer, int(config.vocab_size))
    offset_errors: list[torch.Tensor] = []
    tensors = plan(model, type, offset_errors)

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    w = _Writer(tmp, arch.name)
    try:
        w.add_type("model")
        w.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
        arch.metadata(config, w)
        w.add_file_type(int(FILE_TYPES[type]))
        if type in ggml.QUANTIZED:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_quantized_by("compress")
        vocab.add_to_writer(w, voc)
        for p in tensors:
            shape = ggml.byte_shape(p.shape, p.qtype)
            dtype = ggml.storage_dtype(p.qtype)
            w.add_tensor_info(p.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with torch.no_grad():
            for p in tensors:
                data = p.produce()
                if data.shape != ggml.byte_shape(p.shape, p.qtype):
                    raise AssertionError(f"{p.name}: produced {data.shape}, planned {ggml.byte_shape(p.shape, p.qtype)}")
                w.write_tensor_data(data)
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    stats = {
        "path": str(path), "type": type, "arch": arch.name, "bytes": path.stat().st_size,
        "tensors": dict(Counter(p.qtype.name for p in tensors)),
        "sources": dict(Counter(p.source for p in tensors)),
        "tokenizer_pre": voc["pre"], "seconds": round(time.perf_counter() - t0, 3),
    }
    if offset_errors:
        e = torch.cat(offset_errors)
        stats["q4_1_offset_error_steps"] = {
            "max": float(e.max()), "mean": float(e.mean()), "exact_fraction": float((e == 0).float().mean()),
            "groups": int(e.numel()),
        }
    return stats
