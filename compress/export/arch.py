"""Per-architecture facts a GGUF file needs: llama.cpp's architecture, its hyperparameter keys, tensor names, and
the weight rewrites llama.cpp expects, in one small table (ARCHS, keyed by the HF config's model_type).

Tensor names come from gguf-py's own mapping (`gguf.get_tensor_name_map`: HF name -> MODEL_TENSOR -> "blk.N.attn_q"),
and every name is checked against `gguf.MODEL_TENSORS[arch]`, the tensors llama.cpp's loader knows for that
architecture; an HF tensor without a GGUF name is an error, never silently dropped.

Llama (model_type "llama" -> llama.cpp "llama"):
- hyperparameters `llama.*`: context_length, embedding_length, block_count, feed_forward_length, head_count,
  head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon, rope.dimension_count (= head_dim), and
  attention.key_length / value_length when head_dim != hidden / heads, vocab_size;
- Q/K rows: HF Llama rotates the pair (i, i + head_dim/2) of each head (`rotate_half`); llama.cpp's "llama"
  architecture uses ggml's normal RoPE, which rotates (2i, 2i + 1). Rotary embedding commutes with relabelling
  rows, so the q_proj / k_proj output rows of each head are reordered (row 2i + j <- row j * head_dim/2 + i, j in
  {0, 1}); attention scores are unchanged because q and k get the same order. It is a pure row reorder, so GPTQ
  codes and per-row scales move with their rows and stay exact.

Adding a family: one `Arch` entry (llama.cpp architecture, a metadata function, which HF tensors get the RoPE
row reorder and with which head count). Not supported: rope scaling (llama3 / yarn / linear: needs rope_freqs or
scaling keys), MoE experts, any model_type without an entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gguf
import torch

from compress.errors import CompressError


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH                            # llama.cpp architecture
    metadata: Callable[[object, gguf.GGUFWriter], None]  # (HF config, writer): the `<arch>.*` hyperparameters
    rope_rows: dict[str, str] = field(default_factory=dict)  # HF name suffix -> config key of its head count

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_theta(config) -> float:
    """RoPE base; refuses scaled RoPE (transformers 5 keeps both in config.rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    kind = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind != "default":
        raise CompressError(f"GGUF export does not support rope scaling {kind!r} yet (only unscaled RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise CompressError("the model config has no rope_theta")
    return float(theta)


def _llama_metadata(config, w: gguf.GGUFWriter) -> None:
    hd = head_dim(config)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(hd)
    if hd != config.hidden_size // config.num_attention_heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_vocab_size(int(config.vocab_size))


ARCHS = {
    "llama": Arch(
        gguf.MODEL_ARCH.LLAMA, _llama_metadata,
        rope_rows={"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"},
    ),
}


def arch_of(config) -> Arch:
    """The table entry for an HF config, or a one-line CompressError naming the supported model types."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise CompressError(f"GGUF export supports model_type {', '.join(ARCHS)}; this model is {kind!r}")
    return ARCHS[kind]


def rope_row_order(n_heads: int, hd: int) -> torch.Tensor:
    """Row order [n_heads * hd] that turns HF's rotate-half pairs into adjacent pairs (see the module docstring).

    new row h*hd + 2i + j takes old row h*hd + j*hd/2 + i.
    """
    if hd % 2:
        raise CompressError(f"head_dim {hd} is odd: RoPE needs pairs")
    half = hd // 2
    i = torch.arange(half).view(half, 1)
    j = torch.arange(2).view(1, 2)
    within = (j * half + i).reshape(hd)                                  # (hd,): new 2i+j -> old j*half+i
    return (torch.arange(n_heads).view(n_heads, 1) * hd + within.view(1, hd)).reshape(-1)


class Names:
    """HF tensor name -> (GGUF name, MODEL_TENSOR) for one architecture and depth, checked against llama.cpp's list."""

    def __init__(self, arch: Arch, n_blocks: int):
        self.arch = arch
        self.map = gguf.get_tensor_name_map(arch.gguf_arch, n_blocks)
        self.known = set(gguf.MODEL_TENSORS[arch.gguf_arch])

    def __call__(self, hf_name: str) -> tuple[str, gguf.MODEL_TENSOR]:
        found = self.map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in self.known:
            raise CompressError(f"tensor {hf_name!r} has no GGUF name in llama.cpp's {self.arch.name!r} architecture")
        kind, name = found
        return name, kind

    def rope_rows(self, hf_name: str, config) -> torch.Tensor | None:
        """The RoPE row order for this tensor (q/k projections), or None."""
        module = hf_name.rsplit(".", 1)[0]
        for suffix, key in self.arch.rope_rows.items():
            if module.endswith(suffix):
                heads = int(getattr(config, key, None) or config.num_attention_heads)
                return rope_row_order(heads, head_dim(config))
        return None
