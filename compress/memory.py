"""The memory planner: predicted bytes of every pipeline stage, from the model's config alone.

Running out of memory is the first thing users of compression tools hit. `compress plan pipeline.yaml`
answers "does every stage fit on this device?" before any weight is loaded: the model's parameters are
counted exactly on a meta-device model (`torch.device("meta")`, no storage), and each stage's peak is
the sum of documented terms (weights by dtype and format, gradients, AdamW states, activations, GPTQ
Hessians and calibration buffers, logits, KV cache). Every StagePlan carries its terms in `breakdown`,
so a wrong prediction can be traced to one term.

The numbers (B = batch, S = sequence length, h = hidden, I = MLP intermediate, kvd = kv_heads * head_dim,
V = vocab, L = layers, a = bytes of the activation dtype, P = parameters):

  weights     plain: P * dtype bytes. GPTQ (HF/AutoGPTQ layout) per quantized linear [out, in], group g:
              qweight in*out*bits/8 + qzeros (in/g)*out*bits/8 + scales (in/g)*out*2 + g_idx 4*in; the
              rest (embeddings, norms, lm_head) stays in the model dtype. bnb int8: 1 byte per linear
              weight + fp32 row scale (SCB) per output row; the rest 16/32-bit.
  training    as compress/train.py trains: torch AdamW, whose m and v take the parameters' dtype, gradients
              in the parameters' dtype, no master copy: fp32 weights 4 + grads 4 + m, v 8 = 16 bytes/param,
              bf16 weights 2 + 2 + 4 = 8. With bf16 autocast (mixed_precision bf16, or auto on CUDA) the fp32
              weights stay and a 16-bit copy of every linear is cached. The README table uses the usual
              mixed-precision recipe instead: bf16 weights and grads + fp32 master + fp32 m, v = 16 bytes/param.
  activations saved for backward, per token per Llama-style decoder layer (HF eager RMSNorm, SDPA, SwiGLU):
                attention  norm output h, q h, rotate_half(q) h, q_rope h, k/rot(k)/k_rope/v 4*kvd,
                           SDPA output h, o_proj input (the transpose-reshape copy) h     = a*(6h + 4kvd)
                MLP        norm output h, gate I, silu(gate) I, up I, silu*up I            = a*(h + 4I)
                2 RMSNorms input upcast to fp32 4h + normalised (input dtype) a*h each  = 2*(4h + a*h)
              = a*(9h + 4kvd + 4I) + 8h bytes; with eager attention (no SDPA kernel) add the attention
              probabilities heads*S*(4 + a) (fp32 softmax, then cast). A 2-matrix MLP (BERT) has a*(h + 2I).
              So activations = B*S*L*h*f with the per-layer factor f = that / h (`activation_factor`):
              SmolLM2-135M in fp32: f = 92 bytes.
  logits      training (HF loss over labels=): logits a + fp32 copy 4 (a < 4) + log-softmax 4 + its grad 4 +
              grad of the logits 4 = B*S*V*(a + 12). Evaluation (compress/evaluate.py, no grad, use_cache
              off): logits a + logits[:, :-1].float() 4 (a copy when a < 4 or B > 1) + log-softmax 4.
  KV cache    B*T*L*2*kvd*a: the decode-speed generate, the int8 outlier pass (HF default use_cache).
  GPTQ        compress/stages/gptq.py, one decoder block at a time in fp32: the block's inputs and outputs for
              all n*S calibration tokens 2*n*S*h*4, the true-sequential passes' kept inputs of o_proj and
              down_proj (self_attn and mlp replay as one matmul on them) n*S*4*(h + I), one forward of
              batch_size sequences or the solver of the largest linear group, the larger (stacked W [R, C]:
              ~8 R*C*4 for W, its clone, W^T, Q^T, codes^T and error terms; H and its copies and Cholesky
              inverse ~5 C^2*4), the block's results (Q fp32 + codes: 5 bytes per weight), an fp32 copy of the
              block when the model is 16-bit; the packed output (qweight/qzeros/scales/g_idx) accumulates; at
              the end everything unquantized is cast to `dtype` (fp16 default). On CPU the memory-mapped input's
              replaced weights are paged out block by block (page_out_mapped), so the first block is the peak.
  int8        compress/stages/int8.py: int8 weights + fp32 row scales of every linear, an fp16 copy of the
              largest one, the rest cast to `dtype`, then `calibration_samples` outlier forward passes.
  cast        a full copy of every floating parameter in the target dtype (the input stays resident).
  distill     a student of `layers` layers (new weights) trained as above, plus the teacher's logits and
              hidden states of every layer, one teacher layer's transient, and the soft-target KL at
              temperature T (fp32 copies, scaling, (log-)softmax of both: ~6 * B*S*V*4); the teacher's
              weights when it is not the stage's input.
  prune       training of the full-size model plus hard-concrete mask activations a*(3h + I) per token per
              layer, then the pruned model (target-shape weights) is materialised.

What is measured, and what `growth_bytes` means. The pipeline measures a stage with its input model
already loaded: on CPU, the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS right
before the stage; on CUDA, torch.cuda.max_memory_allocated() after a reset, with the input on the GPU.
So `growth_bytes` is the extra memory on top of the resident input model, assuming the input stays
resident for the whole stage (true when it was loaded from safetensors, which memory-maps it: a tensor
replaced by the stage does not free its pages until the whole file is unmapped, unless the stage pages them
out, as GPTQ and RTN do). `allocated_bytes`
(= on-device input + growth) is what CUDA max_allocated reports; `peak_bytes` adds the fixed overhead
of the process (a torch + transformers CPU process; or the CUDA context) and is what must fit on the
device. `PeakMemory` below measures exactly this definition.

Not modelled: glibc heap retention (freed chunks below the top of the heap stay in RSS: a stage that
interleaves many temporaries with persistent outputs, like int8, can grow 2-3x its live bytes;
`PeakMemory` gives free heap back before measuring, and `fixed_mmap_threshold` / `mmap_threshold` keep it
small in a run),
paging in kernel code on first use and oneDNN scratch (RSS_NOISE_BYTES: a few MiB, which is all a tiny
model uses), DeepSpeed/FSDP sharding (divide weights, grads and states by the number of ranks yourself),
gradient checkpointing and LoRA in the pipeline's stages (the README table models a frozen base),
8-bit optimizers, architectures other than decoder-only Llama-style and BERT-style encoders (their
parameters are still counted exactly; activations use the Llama derivation).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import dataclasses
import gc
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from compress.errors import CompressError

KiB, MiB, GiB = 2**10, 2**20, 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32", "torch.float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp16": "float16", "half": "float16", "float16": "float16", "torch.float16": "float16",
}

# Fixed overheads that are not tensors. Measured on torch 2.13 CPU + transformers 5.23: importing both
# and building a model leaves the process at ~400 MiB RSS before any weight is touched.
CPU_PROCESS_BYTES = 400 * MiB
# The CUDA context (kernels, cuBLAS/cuDNN handles): 0.3-1 GiB depending on GPU and CUDA version.
CUDA_CONTEXT_BYTES = 512 * MiB
# RSS noise of one CPU measurement: lazily paged-in kernel code and oneDNN scratch on first use of an op,
# malloc arenas. Measured 4-12 MiB for a 190k-parameter model; compare predictions to measurements with
# this floor (see `compare`).
RSS_NOISE_BYTES = 16 * MiB
# Importing bitsandbytes 0.50 (its native library, triton stubs) into a process that already runs a model:
# +43.5 MiB RSS, measured twice on torch 2.13 CPU. Host memory only: nothing on a CUDA device.
BNB_IMPORT_BYTES = 44 * MiB


@dataclass(frozen=True)
class Device:
    name: str    # "cpu", "h100-80gb", or the size spec given by the user
    kind: str    # "cpu" or "cuda": decides the fixed overhead and what is measured
    bytes: int   # total memory


def _cpu_device() -> Device:
    import psutil

    return Device("cpu", "cpu", int(psutil.virtual_memory().total))


# Total memory as nvidia-smi reports it (MiB * 2**20).
DEVICES = {
    "rtx4090": Device("rtx4090", "cuda", 24564 * MiB),
    "a100-40gb": Device("a100-40gb", "cuda", 40960 * MiB),
    "a100-80gb": Device("a100-80gb", "cuda", 81920 * MiB),
    "h100-80gb": Device("h100-80gb", "cuda", 81559 * MiB),
    "h200-141gb": Device("h200-141gb", "cuda", 143771 * MiB),
    "cpu": None,  # this machine's RAM, read with psutil when asked for (see `resolve_device`)
}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40, "k": KiB, "m": MiB, "g": GiB, "t": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Bytes from '24GB' (10**9), '80GiB' (2**30), '512MiB', '1.5 TB' or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise CompressError(f"memory size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CompressError(f"cannot read memory size {text!r}; write e.g. 24GB, 80GiB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_device(spec: str | int | Device | None) -> Device | None:
    """A Device from a name in DEVICES ('cpu' is this machine's RAM), 'cpu:64GB', a size ('24GB': a GPU of
    that size) or a byte count; None stays None (plan without a fit check)."""
    if spec is None or isinstance(spec, Device):
        return spec
    if isinstance(spec, (int, float)):
        return Device(f"{parse_memory(spec)} bytes", "cuda", parse_memory(spec))
    key = str(spec).strip().lower()
    if key == "cpu":
        return _cpu_device()
    if key in DEVICES:
        return DEVICES[key]
    if key.startswith("cpu:"):
        return Device(key, "cpu", parse_memory(key[4:]))
    if key.startswith("cuda:"):
        key = key[5:]
    try:
        return Device(str(spec), "cuda", parse_memory(key))
    except CompressError:
        raise CompressError(
            f"unknown device {spec!r}; use one of {', '.join(DEVICES)}, a size like 24GB, or cpu:64GB"
        ) from None


def dtype_name(dtype: Any) -> str:
    """Canonical dtype name ('float32', 'bfloat16', 'float16') from a string or torch.dtype."""
    key = str(dtype).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise CompressError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPE_ALIASES[key]


def fmt_bytes(n: int | float | None) -> str:
    """Human bytes in binary units: 1.50 GiB, 312.4 MiB."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


# ----------------------------------------------------------------------------------------------------
# Model shape: exact counts from a meta-device model


@dataclass
class ModelShape:
    """What the planner needs to know about an architecture; counts are exact (meta-device model)."""
    config: dict                 # the config dict it was built from (to derive pruned/student shapes)
    model_type: str
    params: int                  # unique parameters (tied embeddings counted once)
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool                   # lm_head shares the input embedding
    gated_mlp: bool              # SwiGLU (gate, up, down) vs 2-matrix MLP
    eager_attention: bool        # attention probabilities materialised (no SDPA/flash kernel)
    linears: tuple               # ((name, in_features, out_features), ...) of ONE decoder layer
    layer_params: int            # parameters of one decoder layer
    largest_tensor: int          # numel of the largest parameter (transient copies scale with it)
    float_buffers: int           # numel of persistent floating buffers (saved and cast with the weights)
    logits: bool = True          # an LM head makes [batch, seq, vocab] logits; a bare encoder (BertModel) has none

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linears: what GPTQ and int8 quantize."""
        return self.layers * sum(i * o for _, i, o in self.linears)

    @property
    def linear_out_features(self) -> int:
        return self.layers * sum(o for _, _, o in self.linears)

    def with_changes(self, **config_changes) -> "ModelShape":
        """The shape of the same architecture with some config fields changed (pruned, fewer layers)."""
        return describe({**self.config, **config_changes})


def _config_dict(model_config: Any) -> dict:
    if isinstance(model_config, dict):
        return dict(model_config)
    if isinstance(model_config, (str, Path)):
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CompressError(f"no model config at {model_config}; give a config.json or a model folder")
        return json.loads(path.read_text())
    if hasattr(model_config, "to_dict"):
        d = model_config.to_dict()
        d.setdefault("model_type", getattr(model_config, "model_type", None))
        return d
    raise CompressError(f"cannot read a model config from {type(model_config).__name__}")


def describe(model_config: Any) -> ModelShape:
    """ModelShape from a config dict, a transformers config, a config.json / model folder, or an nn.Module
    (a meta-device or real model: parameters are counted from it directly)."""
    import torch

    if isinstance(model_config, torch.nn.Module):
        return _shape_from_model(model_config, _config_dict(model_config.config))
    return _describe_cached(json.dumps(_config_dict(model_config), sort_keys=True, default=str))


@lru_cache(maxsize=64)
def _describe_cached(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    raw = json.loads(config_json)
    if not raw.get("model_type"):
        raise CompressError("model config has no 'model_type'; give the model's config.json")
    clean = {k: v for k, v in raw.items() if k not in ("quantization_config", "transformers_version")}
    try:
        config = AutoConfig.for_model(**clean)
    except (ValueError, KeyError) as e:
        raise CompressError(f"transformers cannot build a config of type {raw['model_type']!r}: {e}") from None
    arch = (raw.get("architectures") or [""])[0]
    auto = AutoModelForCausalLM if arch.endswith("ForCausalLM") else (
        AutoModelForMaskedLM if arch.endswith("ForMaskedLM") else (
            AutoModelForCausalLM if config.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma") else AutoModel))
    with torch.device("meta"):  # no storage: exact shapes at no memory cost
        model = auto.from_config(config)
    return _shape_from_model(model, raw)


def _decoder_layers(model) -> Any:
    """The ModuleList of transformer blocks (the longest ModuleList in the model)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise CompressError(f"{type(model).__name__} has no list of layers; the planner needs a transformer")
    return max(lists, key=len)


def _shape_from_model(model, raw: dict) -> ModelShape:
    import torch

    cfg = model.config
    layers = _decoder_layers(model)
    block = layers[0]
    linears = tuple((n, m.in_features, m.out_features) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear))
    params = list(model.parameters())  # unique tensors: tied weights once
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    impl = getattr(cfg, "_attn_implementation", None) or raw.get("attn_implementation") or "sdpa"
    names = {n.split(".")[-1] for n, *_ in linears}
    return ModelShape(
        config=raw,
        model_type=cfg.model_type,
        params=sum(p.numel() for p in params),
        vocab=cfg.vocab_size,
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", 4 * hidden),
        layers=len(layers),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)) and _is_tied(model),
        gated_mlp="gate_proj" in names,
        eager_attention=impl == "eager",
        linears=linears,
        layer_params=sum(p.numel() for p in block.parameters()),
        largest_tensor=max(p.numel() for p in params),
        float_buffers=sum(b.numel() for m in model.modules() for n, b in m.named_buffers(recurse=False)
                          if b is not None and b.is_floating_point() and n not in m._non_persistent_buffers_set),
        logits=model.get_output_embeddings() is not None,
    )


def _is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


# ----------------------------------------------------------------------------------------------------
# Model state: what the weights look like as they flow through the stages


@dataclass
class ModelState:
    shape: ModelShape
    dtype: str = "float32"        # dtype of the floating (non-quantized) tensors
    format: str = "plain"         # plain | gptq | bnb-int8
    bits: int | None = None       # gptq: bits per quantized weight
    group_size: int = 128         # gptq: input features per scale (-1: one group per row)
    skip: tuple = ()              # names of decoder linears left unquantized (int8 `skip`)

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def quantized_linears(self) -> list:
        """(name, in, out) of the linears of one decoder layer that the format quantizes."""
        return [l for l in self.shape.linears if l[0].split(".")[-1] not in self.skip and l[0] not in self.skip]

    def float_numel(self) -> int:
        """Elements of the floating tensors (all but quantized linears), which a cast converts."""
        if self.format == "plain":
            return self.shape.params + self.shape.float_buffers
        lin = self.quantized_linears()
        return self.shape.params + self.shape.float_buffers - self.shape.layers * sum(i * o for _, i, o in lin)

    def weights_bytes(self) -> int:
        """Bytes of all weights in this state (what sits in memory once the model is loaded)."""
        s, a = self.shape, self.act_bytes
        plain = (s.params + s.float_buffers) * a
        if self.format == "plain":
            return plain
        lin = self.quantized_linears()
        n_lin = s.layers * sum(i * o for _, i, o in lin)
        if self.format == "gptq":
            return plain - n_lin * a + gptq_linear_bytes(lin, s.layers, self.bits or 4, self.group_size)
        if self.format == "bnb-int8":
            return plain - n_lin * a + n_lin + 4 * s.layers * sum(o for _, _, o in lin)
        raise CompressError(f"unknown weights format {self.format!r}")


def gptq_linear_bytes(linears: list, layers: int, bits: int, group_size: int) -> int:
    """Packed GPTQ tensors of `linears` (name, in, out) in each of `layers` layers: qweight, qzeros,
    scales (fp16), g_idx (int32)."""
    total = 0
    for _, n_in, n_out in linears:
        groups = 1 if group_size in (-1, 0, None) else math.ceil(n_in / group_size)
        total += n_in * n_out * bits // 8          # qweight int32 [in*bits/32, out]
        total += groups * n_out * bits // 8        # qzeros int32 [groups, out*bits/32]
        total += groups * n_out * 2                # scales fp16 [groups, out]
        total += 4 * n_in                          # g_idx int32 [in]
    return total * layers


# ----------------------------------------------------------------------------------------------------
# Terms


def activation_bytes_per_token_layer(shape: ModelShape, a: int, seq_len: int) -> int:
    """Bytes saved for backward by one decoder layer per token (see the module docstring)."""
    h, kvd, i = shape.hidden, shape.kvd, shape.intermediate
    mlp = a * (h + 4 * i) if shape.gated_mlp else a * (h + 2 * i)
    attn = a * (6 * h + 4 * kvd)
    norms = 2 * (4 * h + a * h)
    scores = shape.heads * seq_len * (4 + a) if shape.eager_attention else 0
    return attn + mlp + norms + scores


def activation_factor(shape: ModelShape, dtype: str = "float32", seq_len: int = 2048) -> float:
    """Per-layer factor f in activations = B * S * h * L * f (bytes)."""
    return activation_bytes_per_token_layer(shape, DTYPE_BYTES[dtype_name(dtype)], seq_len) / shape.hidden


def training_activation_bytes(shape: ModelShape, a: int, batch: int, seq: int, checkpointing: bool = False) -> int:
    per_layer = activation_bytes_per_token_layer(shape, a, seq) * batch * seq
    if checkpointing:  # layer inputs kept, one layer recomputed at a time
        return shape.layers * batch * seq * shape.hidden * a + per_layer
    return shape.layers * per_layer


def inference_layer_bytes(shape: ModelShape, a: int, batch: int, seq: int) -> int:
    """Peak transient inside one decoder layer without grad: residual + hidden in/out + the larger of
    attention (q, k, v, their rotated copies, output and its reshaped copy) and MLP (3 of gate/up/act/prod
    alive at once)."""
    h, kvd, i = shape.hidden, shape.kvd, shape.intermediate
    mlp = (3 * i if shape.gated_mlp else 2 * i)
    attn = 5 * h + 3 * kvd
    scores = shape.heads * seq * (4 + 2 * a) // a if shape.eager_attention else 0  # per token, in units of a
    return batch * seq * a * (2 * h + max(mlp, attn + scores))


def kv_cache_bytes(shape: ModelShape, a: int, batch: int, tokens: int) -> int:
    return batch * tokens * shape.layers * 2 * shape.kvd * a


def eval_logits_bytes(shape: ModelShape, a: int, batch: int, seq: int) -> int:
    n = batch * seq * shape.vocab
    return n * (a + (4 if a < 4 else 0) + 4)


def train_logits_bytes(shape: ModelShape, a: int, batch: int, seq: int) -> int:
    return batch * seq * shape.vocab * (a + 12)


# ----------------------------------------------------------------------------------------------------
# Stage plans


@dataclass
class StagePlan:
    stage: str                    # stage type: base, cast, gptq, int8, train, prune, distill, eval
    name: str                     # the stage's name in the pipeline (folder NN-name)
    weights_bytes: int            # input model's weights (resident before the stage starts)
    peak_bytes: int               # everything on the device at the peak, incl. fixed process/context overhead: must fit
    growth_bytes: int             # extra over the resident input: comparable to the CPU "rss-growth" measurement
    breakdown: dict               # term -> bytes, the terms of growth (plus "input weights", "overhead")
    fits: bool | None = None      # peak_bytes <= device bytes (None: no device given)
    advice: list = field(default_factory=list)   # what to change when it does not fit, with the saving
    index: int = 0                # NN of the stage folder
    device_kind: str = "cpu"      # cpu | cuda
    allocated_bytes: int = 0      # on-device tensors at the peak: comparable to "cuda-max-allocated"
    output_weights_bytes: int = 0 # the stage's output model
    eval_growth_bytes: int | None = None   # evaluating the output (pipeline eval block), over its weights
    eval_peak_bytes: int | None = None
    output_state: "ModelState | None" = field(default=None, repr=False, compare=False)  # flows into the next stage

    def comparable_bytes(self, method: str) -> int:
        """The prediction to compare with a manifest's measured_peak_bytes for its memory.method."""
        if method == "rss-growth":
            return self.growth_bytes
        if method == "cuda-max-allocated":
            return self.allocated_bytes
        raise CompressError(f"unknown memory measurement method {method!r}")

    def to_dict(self) -> dict:
        """JSON-able: every field but output_state."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "output_state"}


@dataclass
class _Parts:
    """growth terms plus the input bytes that live on the device during the stage."""
    terms: dict
    on_device_input: int
    out: ModelState
    notes: list = field(default_factory=list)


@dataclass
class _Where:
    """What a stage model needs to know beyond its config and input."""
    kind: str = "cpu"                 # cpu | cuda
    device_bytes: int | None = None
    states: dict = field(default_factory=dict)   # earlier stage names (and 'base') -> ModelState
    input: ModelState | None = None
    data: dict = field(default_factory=dict)     # the pipeline's data block (calibration, train)
    loaded: set = field(default_factory=set)     # libraries already imported by an earlier stage of this process


def _get(cfg: dict, key: str, default):
    v = cfg.get(key) if cfg else None
    return default if v is None else v


def stage_defaults(stage_type: str) -> dict:
    """Field defaults of the stage's Config (compress/stages/<type>.py; eval: evaluate.EvalConfig), so the
    planner reads the same numbers the stage runs with; {} when the module is not there."""
    import importlib

    try:
        if stage_type == "eval":
            from compress.evaluate import EvalConfig as cls
        elif stage_type in STAGE_MODELS:
            cls = importlib.import_module(f"compress.stages.{stage_type}").Config
        else:
            return {}
    except (ImportError, AttributeError):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _autocast(cfg: dict, kind: str) -> bool:
    """compress/train.py: bf16 autocast with mixed_precision bf16, or auto on CUDA; none on CPU."""
    mp = str(_get(cfg, "mixed_precision", "auto"))
    return mp == "bf16" or (mp == "auto" and kind == "cuda")


def _training_terms(shape: ModelShape, w: int, batch: int, seq: int, autocast: bool, checkpointing: bool = False,
                    new_weights: bool = False, master_weights: bool = False) -> dict:
    """Gradients, AdamW states, activations and logits of full training of `shape` with w-byte weights.

    As compress/train.py trains: torch.optim.AdamW, whose m and v take the parameters' dtype, gradients in
    the parameters' dtype, no master copy; autocast keeps w = 4 weights and caches 16-bit copies of the
    linears. master_weights (the usual bf16 recipe: bf16 weights and grads, fp32 master + fp32 m, v) is
    used for the README table only. new_weights: the trained model is a new copy (a distillation student)."""
    P = shape.params
    a = 2 if autocast else w
    terms = {}
    if new_weights:
        terms["weights"] = P * w
    terms["gradients"] = P * w
    if master_weights:
        terms["fp32 master weights"] = P * 4
    terms["AdamW states (m, v)"] = 2 * P * (4 if master_weights else w)
    if autocast and w > 2:
        terms["autocast 16-bit weight copies"] = shape.linear_params * 2
    terms["activations"] = training_activation_bytes(shape, a, batch, seq, checkpointing)
    if shape.logits:
        terms["logits + loss"] = train_logits_bytes(shape, a, batch, seq)
    return terms


def _eval_terms(state: ModelState, cfg: dict, kind: str = "cpu", reference: ModelState | None = None) -> dict:
    """compress/evaluate.py: perplexity windows of seq_len in batches of batch_size with use_cache=False, NLL
    from logits[:, :-1].float() (a copy: bf16 upcast, or the non-contiguous slice when batch > 1) and its
    log-softmax; decode speed: one greedy generate at batch 1 (KV cache of prompt + decode_tokens). On a CPU a
    float16 model (plain or GPTQ) is computed in float32 (evaluate.upcast_float16_on_cpu): a float32 copy of
    its floating tensors, float32 activations. Agreement (bare encoders, or `agreement:` sources): batches of
    evaluate.AGREEMENT_BATCH sentences with every layer's hidden states; `reference` is the base model an
    encoder other than the base is compared with (loaded for the evaluation)."""
    shape, a = state.shape, state.act_bytes
    seq = int(_get(cfg, "seq_len", 512))
    batch = int(_get(cfg, "batch_size", 4))
    max_tokens = _get(cfg, "max_tokens", None)
    if max_tokens and not _get(cfg, "stride", None):
        batch = max(1, min(batch, int(max_tokens) // seq))  # at most max_tokens // seq_len windows per source
    n = batch * seq * shape.vocab
    upcast = {}
    if kind == "cpu" and state.dtype == "float16" and state.format in ("plain", "gptq"):
        upcast["float32 copy (float16 computed in float32 on CPU)"] = state.float_numel() * 4
        a = 4
    specs = _get(cfg, "perplexity", None) or []
    agree = _get(cfg, "agreement", None) or ([] if shape.logits else specs)  # bare encoders: agreement by default
    ppl_specs = specs if shape.logits else []
    terms = {**upcast}
    # the two kinds of forwards run one after the other: the larger working set is the peak
    phases = {}
    if ppl_specs:  # perplexity windows
        phases["perplexity"] = (batch, {
            "logits": n * a,
            "fp32 logits (upcast or shifted copy)": n * 4 if (a < 4 or batch > 1) else 0,
            "log-softmax": n * 4,
            "layer transient": inference_layer_bytes(shape, a, batch, seq),
        })
    if agree:  # agreement: AGREEMENT_BATCH sentences of <= seq_len tokens, output_hidden_states, fp32 mean pool
        B = AGREEMENT_BATCH
        phases["agreement"] = (B, {
            "hidden states of every layer": (shape.layers + 1) * B * seq * shape.hidden * a,
            "fp32 last hidden state and masked copy": 2 * B * seq * shape.hidden * 4,
            "logits": B * seq * shape.vocab * a if shape.logits else 0,
            "layer transient": inference_layer_bytes(shape, a, B, seq),
        })
        if reference is not None:  # the base model, compared against, is read in during the evaluation
            phases["agreement"][1]["reference (base) model weights"] = reference.weights_bytes()
    rows = 0
    if phases:
        rows, peak = max(phases.values(), key=lambda p: sum(p[1].values()))
        terms.update(peak)
    if _get(cfg, "speed", True) and _get(cfg, "decode_tokens", 0) and shape.logits:
        decode = int(_get(cfg, "decode_tokens", 32))
        terms["decode kv cache"] = kv_cache_bytes(shape, a, 1, 64 + decode)
    if state.format == "gptq":  # QuantLinear caches each dequantized weight in the activation dtype
        terms["dequantized weight cache"] = state.shape.layers * sum(i * o for _, i, o in state.quantized_linears()) * a
    elif state.format == "bnb-int8" and rows:  # LLM.int8 matmul of the largest linear: fp16 x, int8 x, int32 out
        i, o = max(((i, o) for _, i, o in state.quantized_linears()), key=lambda t: t[0] * t[1])
        terms["int8 matmul buffers"] = rows * seq * (3 * i + 4 * o)
    if specs or agree:  # one source at a time: the largest test split
        terms["eval text"] = max(data_bytes(shape, [(sp, "test")]) for sp in [*specs, *agree])
    return {k: v for k, v in terms.items() if v}


@lru_cache(maxsize=32)
def _corpus_chars(spec: str) -> tuple[int, dict]:
    """(characters of the whole source, {split: characters}) through compress.data; (0, {}) when unavailable."""
    try:
        from compress import data

        docs = data.load_documents(spec)
        splits = data.split_documents(docs)
    except (ImportError, CompressError, OSError):
        return 0, {}
    return sum(map(len, docs)), {k: sum(map(len, v)) for k, v in splits.items()}


AGREEMENT_BATCH = 32  # sentences per forward of compress.evaluate.embed (evaluate.AGREEMENT_BATCH)


def data_bytes(shape: ModelShape, reads: list[tuple[str, str]]) -> int:
    """Peak bytes of loading text streams with compress.data (token cache warm): every call loads the whole
    source's documents (~2.5 bytes per character with its chunks) and one split's token stream as int32
    (.npy) then int64: 12 bytes per token while loading, 8 held. Tokens per character: 1 for byte-level
    vocabularies (<= 512), 0.27 for BPE (SmolLM2 on Austen/Shakespeare: 0.23-0.31). A cold cache
    (first tokenization) costs several times more: warm it before measuring."""
    ratio = 1.0 if shape.vocab <= 512 else 0.27
    held = peak = 0
    for spec, split in reads:
        total, splits = _corpus_chars(spec)
        tokens = int(splits.get(split, 0) * ratio)
        peak = max(peak, held + int(2.5 * total) + 12 * tokens)
        held += 8 * tokens
    return peak


def _domains(value, fallback) -> list[str]:
    v = value if value else fallback
    if not v:
        return []
    return [v] if isinstance(v, str) else list(v)



def _linear_groups(shape: ModelShape) -> list[list[tuple]]:
    """Linears of a block that read the same input (GPTQ shares one Hessian per group and stacks them):
    Llama: [q, k, v], [o], [gate, up], [down]; otherwise every linear alone."""
    by_name = {n.split(".")[-1]: l for l in shape.linears for n in [l[0]]}
    llama = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    if all(n in by_name for g in llama for n in g):
        return [[by_name[n] for n in g] for g in llama]
    return [[l] for l in shape.linears]


def _gptq(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/gptq.py: calibration hidden states in fp32, one block at a time in fp32, true-sequential
    passes that replay recorded sub-module outputs, one GPTQ solver per linear group; everything not quantized
    ends in `dtype` (float16 by default). On CPU the input is memory-mapped (a stage's input is loaded from its
    safetensors checkpoint) and each finished block's replaced weights are paged out (page_out_mapped), so the
    input's resident bytes fall block by block: the peak is then the first block's, not the last one's."""
    shape = state.shape
    bits, g = int(_get(cfg, "bits", 4)), int(_get(cfg, "group_size", 128))
    n, seq, batch = int(_get(cfg, "nsamples", 128)), int(_get(cfg, "seq_len", 512)), int(_get(cfg, "batch_size", 8))
    out_dtype = dtype_name(_get(cfg, "dtype", "float16"))
    skip = tuple(_get(cfg, "skip", ["lm_head"]))
    out = dataclasses.replace(state, format="gptq", bits=bits, group_size=g, dtype=out_dtype, skip=skip)
    lin = out.quantized_linears()
    h = shape.hidden
    groups = _linear_groups(shape)
    results = sum(i * o for _, i, o in lin) * 5                     # one block's Q (fp32) + codes (int8)
    packed = gptq_linear_bytes(lin, shape.layers, bits, g)          # accumulates: all of it by the last block
    cast = out.float_numel() * DTYPE_BYTES[out_dtype] if out_dtype != state.dtype else 0  # at the very end
    block_copy = shape.layer_params * 4 if state.dtype != "float32" else 0  # the block computed in fp32
    # replaced weights of every block but the last, paged out by the last block (CPU: memory-mapped input)
    per_block = sum(i * o for _, i, o in lin) * DTYPE_BYTES.get(state.dtype, 4) if where.kind == "cpu" else 0
    released = -per_block * (shape.layers - 1)
    first_packed = packed // max(shape.layers, 1)
    if str(_get(cfg, "method", "gptq")).lower() == "rtn":
        work = {"RTN transients (largest linear)": max(i * o for _, i, o in lin) * 4 * 4,  # W fp32, codes, Q, error
                "block results (Q fp32 + codes)": results}
        if block_copy:
            work["fp32 copy of one block"] = block_copy
        phases = {"first block": {**work, "packed output (one block)": first_packed},
                  "last block": {**work, "packed output": packed, "input blocks paged out": released},
                  "end": {"packed output": packed, f"unquantized weights in {out_dtype}": cast,
                          "input blocks paged out": released - per_block}}
        return _phased(phases, state, out)
    # GPTQ. Phases, each with what is alive in it (the input model stays resident, less what is paged out):
    #   start: the calibration text is read and tokenized, block 0's inputs captured;
    #   first / last block: block inputs + outputs, the replayed sub-module outputs of the block, the solver of
    #     its largest group (or, without replay, a full block forward), its results, the packed output so far;
    #   end: the packed output, everything unquantized cast to `dtype`.
    tokens = n * seq
    spec = _get(cfg, "calibration", None) or where.data.get("calibration")
    io = 2 * tokens * h * 4
    replay = 0
    if len(groups) == 4 and _get(cfg, "true_sequential", True):
        # what the passes keep, fp32: the inputs of o and down, whose modules (self_attn, mlp) return their output
        # unchanged, so they replay as one matmul (_Tail); the stage checks the free memory for the recorded
        # outputs the general scheme would keep (q,k,v + attention, then gate,up)
        need = sum(o for grp in groups[:-1] for _, _, o in grp) * tokens * 4
        if where.device_bytes is None or need <= where.device_bytes // 4:
            replay = tokens * 4 * (groups[1][0][1] + groups[3][0][1])
    # stacked W [R, C] and H [C, C]; quantize(): W clone, W^T, Q^T, codes^T, error terms ~ 8 R*C; H, its
    # scaled and raw copies, Cholesky inverse ~ 5 C^2 (compress/algorithms/gptq.py)
    solver = max((8 * sum(o for _, _, o in grp) * grp[0][1] + 5 * grp[0][1] ** 2) * 4 for grp in groups)
    forward = inference_layer_bytes(shape, 4, batch, seq)
    main = {"block inputs + outputs (fp32)": io}
    if replay:
        main["replayed sub-module inputs (fp32)"] = replay
        main["GPTQ solver or batch forward (fp32), the larger"] = max(solver, forward)
    else:
        main["GPTQ solver or block forward (fp32), the larger"] = max(solver, forward)
    main["block results (Q fp32 + codes)"] = results
    if block_copy:
        main["fp32 copy of one block"] = block_copy
    phases = {
        "start": {"calibration text": data_bytes(shape, [(spec, "train")]) if spec else 0,
                  "calibration tokens": tokens * 8, "block 0 inputs (fp32)": tokens * h * 4},
        "first block": {**main, "packed output (one block)": first_packed},
        "last block": {**main, "packed output": packed, "input blocks paged out": released},
        "end": {"packed output": packed, f"unquantized weights in {out_dtype}": cast,
                "input blocks paged out": released - per_block},
    }
    return _phased(phases, state, out)


def _phased(phases: dict, state: ModelState, out: ModelState) -> _Parts:
    """The peak phase's terms as the stage's growth, with a note on the others."""
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    terms = {k: v for k, v in phases[peak].items() if v}
    notes = [f"peak in the {peak} phase; " + ", ".join(f"{k} phase {fmt_bytes(sum(v.values()))}"
                                                      for k, v in phases.items() if k != peak)]
    return _Parts(terms, state.weights_bytes(), out, notes)


def _int8(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/int8.py: each linear quantized from an fp16 copy (bitsandbytes), the rest cast to
    `dtype`, then `calibration_samples` forward passes of seq_len tokens for outlier statistics."""
    shape = state.shape
    out_dtype = dtype_name(_get(cfg, "dtype", "bfloat16"))
    out = dataclasses.replace(state, format="bnb-int8", dtype=out_dtype, skip=tuple(_get(cfg, "skip", ["lm_head"])))
    lin = out.quantized_linears()
    i_max, o_max = max(((i, o) for _, i, o in lin), key=lambda t: t[0] * t[1])
    terms = {
        "int8 weights + row scales": shape.layers * sum(i * o + 4 * o for _, i, o in lin),
        "fp16 copy of one linear + quantize temporaries": i_max * o_max * (2 + 2 + 1),
    }
    if out_dtype != state.dtype:
        terms[f"unquantized weights in {out_dtype}"] = out.float_numel() * DTYPE_BYTES[out_dtype]
    if where.kind == "cpu" and "bitsandbytes" not in where.loaded:
        terms["bitsandbytes library (first import)"] = BNB_IMPORT_BYTES
    if int(_get(cfg, "calibration_samples", 4)) > 0 and where.data.get("calibration"):
        seq, a = int(_get(cfg, "seq_len", 512)), DTYPE_BYTES[out_dtype]
        terms["calibration text"] = data_bytes(shape, [(where.data["calibration"], "train")])
        terms["outlier pass: logits"] = seq * shape.vocab * a
        terms["outlier pass: layer + int8 matmul"] = inference_layer_bytes(shape, a, 1, seq) + seq * (3 * i_max + 4 * o_max)
    return _Parts(terms, state.weights_bytes(), out)


def _train(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    batch, seq = int(_get(cfg, "batch_size", 8)), int(_get(cfg, "seq_len", 512))
    terms = _training_terms(state.shape, state.act_bytes, batch, seq, _autocast(cfg, where.kind))
    domains = _domains(_get(cfg, "domains", None), where.data.get("train"))
    terms["training text"] = data_bytes(state.shape, [(d, sp) for sp in ("train", "validation") for d in domains])
    ref = str(_get(cfg, "reference_model", "input"))
    if ref != "input" and ref in where.states and where.states[ref] is not where.input:
        terms["reference model"] = where.states[ref].weights_bytes()
    return _Parts(terms, state.weights_bytes(), state)


def _prune(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/prune.py: the full model's weights train with hard-concrete masks (applied by hooks to
    head outputs, the MLP intermediate and every hidden-state write), then the pruned model is materialised."""
    shape, a = state.shape, state.act_bytes
    batch, seq = int(_get(cfg, "batch_size", 8)), int(_get(cfg, "seq_len", 512))
    terms = _training_terms(shape, a, batch, seq, _autocast(cfg, where.kind))
    terms["mask activations"] = batch * seq * shape.layers * a * (3 * shape.hidden + shape.intermediate)
    domains = _domains(_get(cfg, "data", None), where.data.get("train"))
    terms["training text"] = data_bytes(shape, [(d, "train") for d in domains])
    pruned = _prune_target(shape, _get(cfg, "target", 0.5))
    terms["pruned model"] = (pruned.params + pruned.float_buffers) * a
    return _Parts(terms, state.weights_bytes(), dataclasses.replace(state, shape=pruned))


def _distill(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/distill.py: a student of `layers` layers (new weights) trained on the teacher's softened
    logits (KL at temperature T: fp32 copies, scaling and (log-)softmax of both, ~6 x B*S*V*4), its own LM
    loss, and the cosine of hidden states (teacher's hidden states of every layer kept, no grad)."""
    shape, a = state.shape, state.act_bytes
    batch, seq = int(_get(cfg, "batch_size", 8)), int(_get(cfg, "seq_len", 512))
    teacher_ref = _get(cfg, "teacher", None)
    teacher = where.states.get(str(teacher_ref), state) if teacher_ref is not None else state
    layers = int(_get(cfg, "layers", max(1, teacher.shape.layers // 2)))
    student = shape.with_changes(num_hidden_layers=layers) if layers != shape.layers else shape
    terms = _training_terms(student, a, batch, seq, _autocast(cfg, where.kind), new_weights=True)
    if teacher_ref is not None and teacher is not where.input:
        terms["teacher weights"] = teacher.weights_bytes()
    t_a = 2 if _autocast(cfg, where.kind) else teacher.act_bytes
    hidden_states = (teacher.shape.layers + 1) * batch * seq * teacher.shape.hidden * t_a
    if teacher.shape.logits and shape.logits:
        n = batch * seq * shape.vocab
        terms["teacher logits + hidden states"] = n * t_a + hidden_states
        terms["soft targets + KL"] = 6 * n * 4
    else:  # bare encoders: embedding distillation, no logits (compress/stages/distill.py)
        terms["teacher hidden states"] = hidden_states
    terms["teacher forward (one layer)"] = inference_layer_bytes(teacher.shape, t_a, batch, seq)
    domains = _domains(_get(cfg, "data", None), where.data.get("train"))
    terms["training text"] = data_bytes(shape, [(d, sp) for sp in ("train", "validation") for d in domains])
    return _Parts(terms, state.weights_bytes(), dataclasses.replace(state, shape=student))


def _cast(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/cast.py: every floating parameter converted (p.data = p.data.to(dtype)); the input
    stays resident, so the peak holds both copies."""
    target = dtype_name(_get(cfg, "dtype", "bfloat16"))
    out = dataclasses.replace(state, dtype=target)
    terms = {} if target == state.dtype else {f"{target} copy of weights": out.float_numel() * out.act_bytes}
    return _Parts(terms, state.weights_bytes(), out)


def _eval(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    base = where.states.get("base")
    ref = base if base is not None and base is not where.input and not state.shape.logits else None
    return _Parts(_eval_terms(state, cfg, where.kind, ref), state.weights_bytes(), state)


def _lora(cfg: dict, state: ModelState, where: _Where) -> _Parts:
    """compress/stages/lora.py's own predict_memory (the stage module holds its memory model)."""
    from compress.stages import lora

    return lora.predict_memory(lora.Config(**cfg), state, where)


STAGE_MODELS = {"cast": _cast, "gptq": _gptq, "int8": _int8, "train": _train, "prune": _prune,
                "distill": _distill, "lora": _lora, "eval": _eval}


def _stage_parts(stage_type: str, cfg: dict, state: ModelState, where: _Where) -> _Parts:
    if stage_type == "base":
        return _Parts({"load weights": state.weights_bytes()}, 0, state)
    if stage_type not in STAGE_MODELS:
        raise CompressError(f"the memory planner knows no stage {stage_type!r}; known: base, {', '.join(STAGE_MODELS)}")
    if stage_type in ("train", "prune", "distill", "gptq", "int8", "cast") and state.format != "plain":
        raise CompressError(f"a {stage_type} stage needs a plain (unquantized) input model, but it gets a "
                            f"{state.format} one; move the {stage_type} stage before quantization or use `from:`")
    return STAGE_MODELS[stage_type]({**stage_defaults(stage_type), **cfg}, state, where)


def _prune_target(shape: ModelShape, target) -> ModelShape:
    """The pruned shape as compress/algorithms/shear.py resolves a target: a dict of layers/hidden/heads/
    kv_heads/intermediate (missing = kept), or a parameter count (<1: a fraction of the model's)."""
    try:
        from compress.algorithms import shear
    except ImportError:
        shear = None
    if shear is None:
        if not isinstance(target, dict):
            raise CompressError("a parameter-count prune target needs compress.algorithms.shear; give a shape dict")
        return _pruned_shape(shape, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in shape.config.items() if k != "quantization_config"})
    if isinstance(target, dict):
        t = shear.resolve_target(shear.Shape.of(config), target)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        t = shear.derive_shape(model, int(target * shape.params) if target < 1 else int(target))
    return _pruned_shape(shape, dataclasses.asdict(t))


def _pruned_shape(shape: ModelShape, target: dict) -> ModelShape:
    changes = {}
    if "layers" in target:
        changes["num_hidden_layers"] = int(target["layers"])
    if "hidden" in target:
        changes["hidden_size"] = int(target["hidden"])
    if "intermediate" in target:
        changes["intermediate_size"] = int(target["intermediate"])
    if "heads" in target:
        heads = int(target["heads"])
        changes["num_attention_heads"] = heads
        changes["num_key_value_heads"] = int(target.get("kv_heads", min(shape.kv_heads, heads)))
    if changes and "head_dim" not in shape.config and shape.model_type != "bert":
        changes["head_dim"] = shape.head_dim   # pruning heads keeps each head's size
    return shape.with_changes(**changes) if changes else shape


def _overhead(device_kind: str) -> int:
    return CUDA_CONTEXT_BYTES if device_kind == "cuda" else CPU_PROCESS_BYTES


def predict_stage(stage_type: str, stage_cfg: dict | None, model_config: Any, state: ModelState | None = None, *,
                  name: str | None = None, index: int = 0, device: Any = None, states: dict | None = None,
                  eval_cfg: dict | None = None, data: dict | None = None, loaded: set | None = None) -> StagePlan:
    """Predict one stage's memory. `state` is the input model's state (default: `model_config` in its
    config dtype, plain); `states` maps earlier stage names (and 'base') to states, for a distill teacher;
    `eval_cfg` (the pipeline's eval block) adds the evaluation of the output; `data` (the pipeline's data
    block) adds the text the stage loads; `loaded`: libraries an earlier stage already imported."""
    dev = resolve_device(device)
    kind = dev.kind if dev else "cpu"
    if state is None:
        shape = describe(model_config)
        state = ModelState(shape, dtype=dtype_name(shape.config.get("torch_dtype") or shape.config.get("dtype") or "float32"))
    states = dict(states or {})
    cfg = dict(stage_cfg or {})
    where = _Where(kind, dev.bytes if dev else None, states, state, dict(data or {}), set(loaded or ()))
    parts = _stage_parts(stage_type, cfg, state, where)
    growth = int(sum(parts.terms.values()))
    W = state.weights_bytes() if stage_type != "base" else 0
    overhead = _overhead(kind)
    allocated = parts.on_device_input + growth
    peak = allocated + overhead
    breakdown = {"input weights": W, **parts.terms, "process overhead" if kind == "cpu" else "CUDA context": overhead}
    for note in parts.notes:
        breakdown.setdefault("notes", []).append(note)
    plan = StagePlan(stage=stage_type, name=name or stage_type, weights_bytes=W, peak_bytes=peak, growth_bytes=growth,
                     breakdown=breakdown, index=index, device_kind=kind, allocated_bytes=allocated,
                     output_weights_bytes=parts.out.weights_bytes(), output_state=parts.out)
    if eval_cfg is not None and stage_type != "eval":
        ref = states.get("base") if stage_type != "base" and not parts.out.shape.logits else None
        ev = int(sum(_eval_terms(parts.out, {**stage_defaults("eval"), **eval_cfg}, kind, ref).values()))
        plan.eval_growth_bytes = ev
        plan.eval_peak_bytes = plan.output_weights_bytes + ev + overhead
    if dev is not None:
        worst = max(plan.peak_bytes, plan.eval_peak_bytes or 0)
        plan.fits = worst <= dev.bytes
        if not plan.fits:
            plan.advice = _advice(stage_type, cfg, state, states, dev, plan, eval_cfg)
    return plan


def _saving(stage_type: str, cfg: dict, state: ModelState, states: dict, **changes) -> int:
    """Predicted peak of the stage as configured minus its peak with `changes` applied."""
    alt = predict_stage(stage_type, {**cfg, **changes}, None, state, states=states)
    now = predict_stage(stage_type, cfg, None, state, states=states)
    return now.peak_bytes - alt.peak_bytes


def _largest_fitting(stage_type, cfg, state, states, dev, key: str, value: int) -> int | None:
    """The largest of value/2, value/4, ... >= 1 with which the stage's peak fits on `dev`, or None."""
    v = value // 2
    while v >= 1:
        if predict_stage(stage_type, {**cfg, key: v}, None, state, states=states, device=dev).peak_bytes <= dev.bytes:
            return v
        v //= 2
    return None


def _advice(stage_type, cfg, state, states, dev, plan, eval_cfg) -> list[str]:
    """What to change, with the predicted saving of each change (re-planned, not guessed)."""
    worst = max(plan.peak_bytes, plan.eval_peak_bytes or 0)
    tips = [f"needs {fmt_bytes(worst)} but {dev.name} has {fmt_bytes(dev.bytes)} ({fmt_bytes(worst - dev.bytes)} short)"]
    cfg = {**stage_defaults(stage_type), **cfg}

    def tip(text, **changes):
        s = _saving(stage_type, cfg, state, states, **changes)
        if s > 0:
            tips.append(f"{text}: saves {fmt_bytes(s)}")

    if plan.peak_bytes > dev.bytes:
        b, seq = int(_get(cfg, "batch_size", 8)), int(_get(cfg, "seq_len", 512))
        if stage_type == "gptq" and str(_get(cfg, "method", "gptq")) == "gptq":
            n = int(_get(cfg, "nsamples", 128))
            if n > 8:
                tip(f"nsamples: {n // 2} (fewer calibration samples)", nsamples=n // 2)
            if seq > 128:
                tip(f"seq_len: {seq // 2} (shorter calibration samples)", seq_len=seq // 2)
            if b > 1:
                tip(f"batch_size: {max(1, b // 4)} (sequences per block forward)", batch_size=max(1, b // 4))
            tip("method: rtn (no calibration, lower accuracy)", method="rtn")
        if stage_type in ("train", "prune", "distill"):
            if b > 1:
                fit = _largest_fitting(stage_type, cfg, state, states, dev, "batch_size", b)
                if fit:
                    tip(f"batch_size: {fit} with grad_accum x{b // fit} (same tokens per step) fits", batch_size=fit)
                else:
                    tip(f"batch_size: 1 with grad_accum x{b} (same tokens per step)", batch_size=1)
            if seq > 128:
                tip(f"seq_len: {seq // 2}", seq_len=seq // 2)
            if state.dtype == "float32" and not _autocast(cfg, dev.kind):
                tip("mixed_precision: bf16 (16-bit activations)", mixed_precision="bf16")
        if stage_type == "int8" and int(_get(cfg, "calibration_samples", 4)) > 0:
            tip("calibration_samples: 0 (no outlier statistics)", calibration_samples=0)
        if stage_type == "eval":
            if b > 1:
                tip(f"batch_size: {b // 2}", batch_size=b // 2)
            if seq > 128:
                tip(f"seq_len: {seq // 2}", seq_len=seq // 2)
        if state.dtype == "float32" and stage_type != "cast":
            tips.append(f"add a `cast: {{dtype: bfloat16}}` stage before it: halves the weights "
                        f"({fmt_bytes(state.weights_bytes() // 2)} saved, more in activations)")
    if eval_cfg is not None and (plan.eval_peak_bytes or 0) > dev.bytes:
        ecfg = {**stage_defaults("eval"), **eval_cfg}
        b, seq = int(_get(ecfg, "batch_size", 4)), int(_get(ecfg, "seq_len", 512))
        now = sum(_eval_terms(plan.output_state, ecfg, dev.kind).values())
        for key, value in (("batch_size", b // 2), ("seq_len", seq // 2)):
            if value >= (1 if key == "batch_size" else 64):
                s = now - sum(_eval_terms(plan.output_state, {**ecfg, key: value}, dev.kind).values())
                tips.append(f"eval {key}: {value}: saves {fmt_bytes(s)} in evaluation")
    return tips


def _stage_items(pipeline: dict) -> list[tuple[str, str, dict]]:
    """(type, name, config) of each stage, from the parsed YAML (one-key mappings) or the normalised form
    {type, name, config}."""
    items = []
    for i, entry in enumerate(pipeline.get("stages") or []):
        if isinstance(entry, dict) and "type" in entry:
            cfg = dict(entry.get("config") or {})
            items.append((entry["type"], entry.get("name") or cfg.get("name") or entry["type"], cfg))
        elif isinstance(entry, dict) and len(entry) == 1:
            (stype, cfg), = entry.items()
            cfg = dict(cfg or {})
            items.append((stype, cfg.get("name") or stype, cfg))
        else:
            raise CompressError(f"stage {i + 1} is not a one-key mapping like `- gptq: {{bits: 4}}`")
    return items


def plan(pipeline: dict, model_config: Any, device: Any = None) -> list[StagePlan]:
    """One StagePlan per stage, base first (index 0: loading and evaluating the input model).

    pipeline: the parsed YAML (its `stages`, `eval`); model_config: see `describe`; device: see `resolve_device`
    (a name in DEVICES, 'cpu', '24GB', a byte count, a Device, or None for no fit check)."""
    if not isinstance(pipeline, dict) and hasattr(pipeline, "resolved"):   # a compress.pipeline.Pipeline
        pipeline = pipeline.resolved()
    shape = describe(model_config)
    dtype = dtype_name(shape.config.get("torch_dtype") or shape.config.get("dtype") or "float32")
    state = ModelState(shape, dtype=dtype)
    eval_cfg = pipeline.get("eval") if isinstance(pipeline.get("eval"), dict) else None
    states = {"base": state}
    data = pipeline.get("data") if isinstance(pipeline.get("data"), dict) else {}
    plans = [predict_stage("base", {}, None, state, name="base", index=0, device=device, eval_cfg=eval_cfg)]
    prev = state
    loaded: set = set()  # libraries the stages before import into the one process (`compress run`)
    for i, (stype, sname, cfg) in enumerate(_stage_items(pipeline), start=1):
        src = cfg.get("from")
        inp = prev if src is None else states.get(str(src))
        if inp is None:
            raise CompressError(f"stage {sname!r}: `from: {src}` names no earlier stage; known: {', '.join(states)}")
        stage_cfg = {k: v for k, v in cfg.items() if k not in ("from", "name", "include")}
        p = predict_stage(stype, stage_cfg, None, inp, name=sname, index=i, device=device, states=states,
                          eval_cfg=eval_cfg if stype != "eval" else None, data=data, loaded=loaded)
        plans.append(p)
        if stype == "int8":
            loaded.add("bitsandbytes")
        prev = p.output_state
        states[sname] = prev
        states[str(i)] = prev
    return plans


def state_after(plans: list[StagePlan]) -> ModelState:
    """The model state a plan ends with."""
    return plans[-1].output_state


def format_table(plans: list[StagePlan], device: Any = None) -> str:
    """A fixed-width table for `compress plan`: one row per stage, then the advice of stages that do not fit."""
    dev = resolve_device(device)
    head = ["#", "stage", "name", "weights in", "growth", "peak", "eval peak", "weights out", "fits"]
    rows = []
    for p in plans:
        fits = "-" if p.fits is None else ("yes" if p.fits else "NO")
        rows.append([f"{p.index:02d}", p.stage, p.name, fmt_bytes(p.weights_bytes), fmt_bytes(p.growth_bytes),
                     fmt_bytes(p.peak_bytes), fmt_bytes(p.eval_peak_bytes), fmt_bytes(p.output_weights_bytes), fits])
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w) if c >= 3 else str(v).ljust(w) for c, (v, w) in enumerate(zip(r, widths)))
    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    kind = plans[0].device_kind if plans else "cpu"
    out.append("")
    out.append(f"peak = input weights + growth + {'CUDA context' if kind == 'cuda' else 'torch process'} "
               f"({fmt_bytes(_overhead(kind))}); growth = extra over the resident input model"
               + (f"; device {dev.name}: {fmt_bytes(dev.bytes)}" if dev else ""))
    for p in plans:
        if p.advice:
            out.append(f"{p.index:02d}-{p.name} does not fit:")
            out.extend(f"  - {a}" for a in p.advice)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# The README's memory arithmetic


def llama_config(size: str) -> dict:
    """Llama-like configs of real model sizes: '1b' (Llama-3.2-1B), '7b' (Llama-2-7B), '70b' (Llama-3-70B)."""
    configs = {
        "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
        "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
        "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    }
    if size.lower() not in configs:
        raise CompressError(f"no Llama-like config for {size!r}; known: {', '.join(configs)}")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **configs[size.lower()]}


def lora_params(shape: ModelShape, rank: int = 16) -> int:
    """LoRA adapters of rank r on every decoder linear: r * (in + out) each."""
    return shape.layers * sum(rank * (i + o) for _, i, o in shape.linears)


def arithmetic_rows(sizes=("1b", "7b", "70b"), batch: int = 1, seq: int = 2048) -> list[dict]:
    """Bytes for each size: inference weights in fp32/bf16/int8/4-bit (GPTQ g128), full fine-tuning with the
    usual mixed-precision recipe (bf16 weights and grads, fp32 master weights and AdamW states, activations at
    batch x seq, no checkpointing) and LoRA-style training (frozen bf16 base, rank-16 adapters trained with the
    same recipe, the same activations)."""
    rows = []
    for size in sizes:
        shape = describe(llama_config(size))
        bf16 = ModelState(shape, "bfloat16")
        full = _training_terms(shape, 2, batch, seq, autocast=False, master_weights=True)
        r = lora_params(shape)
        rows.append({
            "model": size.upper(), "params": shape.params,
            "fp32": ModelState(shape, "float32").weights_bytes(),
            "bf16": bf16.weights_bytes(),
            "int8": ModelState(shape, "bfloat16", format="bnb-int8").weights_bytes(),
            "4-bit": ModelState(shape, "bfloat16", format="gptq", bits=4, group_size=128).weights_bytes(),
            "full fine-tuning": bf16.weights_bytes() + sum(full.values()),
            "LoRA (frozen base)": bf16.weights_bytes() + r * (2 + 2 + 4 + 8) + full["activations"] + full["logits + loss"],
        })
    return rows


def arithmetic_table(sizes=("1b", "7b", "70b"), batch: int = 1, seq: int = 2048) -> str:
    """The README's memory table (markdown), computed by the planner."""
    rows = arithmetic_rows(sizes, batch, seq)
    cols = ["model", "params", "fp32", "bf16", "int8", "4-bit", "full fine-tuning", "LoRA (frozen base)"]
    gb = lambda n: f"{n / 1e9:.1f} GB"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], f"{r['params'] / 1e9:.2f}B"] + [gb(r[c]) for c in cols[2:]]) + " |")
    lines.append("")
    lines.append(f"Weights only for fp32..4-bit (int8: LLM.int8 linears, 16-bit rest; 4-bit: GPTQ group 128 with "
                 f"fp16 scales). Training: batch {batch} x {seq} tokens, bf16 weights and grads, fp32 master weights "
                 f"and AdamW states, activations without checkpointing; LoRA: rank 16 on every linear, frozen bf16 "
                 f"base. GB = 10^9 bytes.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Measuring what the planner predicts


def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (macOS, musl): nothing to tune


def release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so RSS before a measurement is live memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MADV_PAGEOUT = 21  # Linux >= 5.4 (<linux/mman.h>); Python's mmap module does not export it before 3.12


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings, from /proc/self/maps ([] elsewhere)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                # address perms offset dev inode [path]: inode 0 is anonymous memory (heap, stacks, malloc's mmaps)
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    start, end = parts[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return spans


def page_out_mapped(tensors) -> int:
    """Ask the kernel to reclaim the resident pages of CPU tensors that are views of a memory-mapped file
    (madvise MADV_PAGEOUT); return the bytes advised (0 where this is not Linux or nothing was mapped).

    Why: transformers loads a safetensors checkpoint as views of one private mapping of the file, and the
    mapping lives as long as any of its tensors does. A stage that replaces the model part by part (GPTQ/RTN
    block by block) drops its references to the old weights, but their pages, once read, stay resident and
    counted in RSS until the whole file is unmapped: 14 MiB per SmolLM2 block, 400 MiB by the last one.
    MADV_PAGEOUT never changes what the memory holds: clean pages are dropped and read again from the file
    if anyone touches them; pages a write made private (copy-on-write) are kept (no swap here) or swapped.
    So calling this on a tensor that is still in use costs a re-read, never correctness. Only the page-aligned
    interior of each tensor is advised, so a neighbouring tensor's pages are never touched."""
    if sys.platform != "linux":
        return 0
    spans = _file_mappings()
    libc = _libc()
    if not spans or libc is None or not hasattr(libc, "madvise"):
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.numel() or not t.is_contiguous():
            continue  # a non-contiguous view's bytes are not one span of its own
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        start, end = -(-start // page) * page, end // page * page
        for lo, hi in spans:
            a, b = max(start, lo), min(end, hi)
            if b > a:
                if madvise(a, b - a, MADV_PAGEOUT) != 0:
                    return advised  # EINVAL: a kernel older than 5.4; nothing else to do
                advised += b - a
    return advised


MMAP_THRESHOLD_ENV = "COMPRESS_MMAP_THRESHOLD"
DEFAULT_MMAP_THRESHOLD = 4 * MiB     # a whole CPU run (compress.pipeline.run, compress eval)
TIGHT_MMAP_THRESHOLD = 128 * KiB     # while a stage quantizes linear by linear (int8, rtn) or runs int8 kernels
_threshold = {"bytes": 0}            # what fixed_mmap_threshold last set (0: glibc's dynamic default)


def fixed_mmap_threshold(nbytes: int | None = None) -> int:
    """Serve every CPU allocation of at least `nbytes` with its own mmap, returned to the OS when freed (glibc
    mallopt M_MMAP_THRESHOLD, which also stops glibc raising the threshold to 32 MiB as big blocks are freed).

    Why: by default glibc serves freed activations of up to 32 MiB from its heap afterwards, and a heap only
    shrinks from its top, so RSS keeps the transients that sat below live tensors. Measured on SmolLM2-135M
    (1 thread; peak RSS growth, CPU user+sys seconds; GPTQ before its block page-out and tail replay):
    GPTQ (32 x 512 calibration tokens) 1.02 GiB / 148 s
    with glibc's default, 554 MiB / 168 s at 4 MiB, 449 MiB / 202 s at 128 KiB, for 442 MiB of live tensors
    (the planner's count); evaluating the int8 model 1.33 GiB / 45 s at 4 MiB, 1006 MiB / 59 s at 128 KiB
    (planner 1010 MiB); the int8 stage 635 MiB / 14 s at 4 MiB, 187 MiB / 25 s at 128 KiB. So a run uses
    4 MiB (most of the saving for 14% more CPU time on GPTQ) and the stages made of many small allocations
    tighten it while they run (`mmap_threshold`). The environment variable COMPRESS_MMAP_THRESHOLD (bytes)
    sets the run's value; 0 keeps glibc's own behaviour everywhere.
    Returns the threshold set, 0 when none was (turned off, or malloc is not glibc's)."""
    if nbytes is None:
        raw = os.environ.get(MMAP_THRESHOLD_ENV, "").strip()
        try:
            nbytes = int(raw) if raw else DEFAULT_MMAP_THRESHOLD
        except ValueError:
            raise CompressError(f"{MMAP_THRESHOLD_ENV} must be a number of bytes (0 = glibc's default), got {raw!r}") from None
    libc = _libc()
    if nbytes <= 0 or libc is None or not hasattr(libc, "mallopt"):
        return 0
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) and libc.mallopt(M_TRIM_THRESHOLD, int(nbytes))
    _threshold["bytes"] = int(nbytes) if ok else 0
    return _threshold["bytes"]


@contextlib.contextmanager
def mmap_threshold(nbytes: int = TIGHT_MMAP_THRESHOLD):
    """Within the block, a tighter mmap threshold (see fixed_mmap_threshold), then back to the run's. Does
    nothing where the run set none (COMPRESS_MMAP_THRESHOLD=0, not glibc, or outside a run: library use)."""
    before = _threshold["bytes"]
    if not before or nbytes >= before:
        yield
        return
    fixed_mmap_threshold(nbytes)
    try:
        yield
    finally:
        fixed_mmap_threshold(before)


def fault_in(model) -> None:
    """Touch every parameter and buffer so memory-mapped weights are resident (counted in RSS) before a
    measurement starts; otherwise the first stage that reads them shows the model itself as growth."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read per 4 KiB page


class PeakMemory:
    """Measure a block the way the planner predicts it:

        with PeakMemory(device, model) as m:
            model, stats = stage.run(model, ...)
        m.measured_bytes, m.method   # -> manifest memory.measured_peak_bytes / memory.method

    The input model's tensors are held (references, no copies) until the block ends, so a stage that
    replaces tensors in place (`.to()`, swapping linears for quantized ones) is measured on top of its
    resident input, whether the input was memory-mapped from safetensors or built in memory: the
    definition of StagePlan.growth_bytes.
    CPU ("rss-growth"): fault in the input model, collect garbage, give free heap back (malloc_trim), reset
    the peak RSS (VmHWM) and read RSS; after: VmHWM - RSS before. Compare with StagePlan.growth_bytes.
    CUDA ("cuda-max-allocated"): reset peak stats; after: torch.cuda.max_memory_allocated() (the input model
    on the GPU included). Compare with StagePlan.allocated_bytes."""

    def __init__(self, device: Any = "cpu", model=None, pin: bool = True):
        import torch

        self.device = torch.device(device)
        self.model = model
        self.pin = pin
        self.method = "cuda-max-allocated" if self.device.type == "cuda" else "rss-growth"
        self.before = self.peak = self.measured_bytes = None
        self._pinned: list = []

    def __enter__(self):
        import torch

        if self.model is not None and self.pin:
            self._pinned = list(self.model.state_dict().values())
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        if self.model is not None:
            fault_in(self.model)
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            raise CompressError("cannot reset peak RSS (/proc/self/clear_refs): CPU memory is measured on Linux only") from None
        self.before = _read_status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.measured_bytes = self.peak
        else:
            self.peak = _read_status("VmHWM")
            self.measured_bytes = max(0, self.peak - self.before)
        self._pinned = []
        return False


def compare(predicted: int, measured: int, rel: float = 0.25, floor: int = RSS_NOISE_BYTES) -> tuple[float, bool]:
    """(relative error, ok): ok when |predicted - measured| <= max(rel * measured, floor). The floor is the
    measurement noise of a CPU process (see RSS_NOISE_BYTES); tiny models live entirely below it."""
    err = abs(predicted - measured)
    return (err / measured if measured else math.inf), err <= max(rel * measured, floor)


# ----------------------------------------------------------------------------------------------------
# The pipeline's hooks


def state_from_model(model) -> ModelState:
    """The ModelState of a loaded model: shape from its config (meta-device count), dtype of its floating
    weights, format from config.quantization_config."""
    cfg = model.config.to_dict()
    qc = cfg.pop("quantization_config", None) or {}
    shape = describe(cfg)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = dtype_name(str(floats[0]) if floats else "float32")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method == "gptq":
        skip = tuple(qc.get("modules_to_not_convert") or ())
        return ModelState(shape, dtype, "gptq", bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)),
                          skip=skip)
    if method == "bitsandbytes":
        return ModelState(shape, dtype, "bnb-int8", skip=tuple(qc.get("llm_int8_skip_modules") or ("lm_head",)))
    return ModelState(shape, dtype)


def machine(device) -> Device:
    """The Device this process computes on: a CUDA device's total memory, or this machine's RAM."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return Device(str(dev), "cuda", int(total))
    return _cpu_device()


def predict_for_run(pipe, spec, model) -> int:
    """Predicted growth of one pipeline stage (compress.pipeline calls this with the loaded input model), the
    number to store as the manifest's memory.predicted_peak_bytes next to the measured growth. A distillation
    teacher other than the input is taken to be the size of the input (its config is not at hand here)."""
    state = state_from_model(model)
    cfg = dataclasses.asdict(spec.config) if dataclasses.is_dataclass(spec.config) else dict(spec.config or {})
    states = {spec.source: state, "base": state}
    data = getattr(pipe, "data", None) or {}
    loaded = {lib for lib in ("bitsandbytes",) if lib in sys.modules}
    return predict_stage(spec.type, cfg, None, state, device=machine(next(model.parameters()).device), states=states,
                         data=data, loaded=loaded).growth_bytes


def predict_eval_for_run(eval_cfg, model, reference=None) -> int:
    """Predicted growth of evaluating `model` under the pipeline's eval block (EvalConfig or dict), against
    `reference` (the base model a bare encoder is compared with, loaded for it; None: itself): compare with
    memory.eval_measured_peak_bytes."""
    cfg = dataclasses.asdict(eval_cfg) if dataclasses.is_dataclass(eval_cfg) else dict(eval_cfg or {})
    kind = next(model.parameters()).device.type
    ref = None if reference is None or reference is model else state_from_model(reference)
    return int(sum(_eval_terms(state_from_model(model), {**stage_defaults("eval"), **cfg}, kind, ref).values()))
