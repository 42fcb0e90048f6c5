"""Memory arithmetic: a model's exact shape from its config, its weights in every format, and the shared terms
that each stage's memory model (`predict_memory` in compress/stages/*.py) adds up; compress/planner.py runs them.

Running out of memory is the first thing users of compression tools hit, so `compress plan pipeline.yaml`
answers "does every stage fit on this device?" before any weight is loaded: parameters are counted exactly on
a meta-device model (`torch.device("meta")`, no storage), and each stage's peak is a sum of named terms, so a
wrong prediction can be traced to one term.

Notation: B = batch, S = sequence length, h = hidden, I = MLP intermediate, kvd = kv_heads * head_dim,
V = vocab, L = layers, a = bytes of the activation dtype, P = parameters.

  weights     plain: P * dtype bytes. GPTQ (HF/AutoGPTQ layout) per quantized linear [out, in], group g:
              qweight in*out*bits/8 + qzeros (in/g)*out*bits/8 + scales (in/g)*out*2 + g_idx 4*in; the
              rest (embeddings, norms, lm_head) stays in the model dtype. bnb int8: 1 byte per linear
              weight + fp32 row scale (SCB) per output row; the rest 16/32-bit.
  training    as compress/train.py trains: torch AdamW, whose m and v take the parameters' dtype, gradients
              in the parameters' dtype, no master copy: fp32 weights 4 + grads 4 + m, v 8 = 16 bytes/param,
              bf16 weights 2 + 2 + 4 = 8. With bf16 autocast (mixed_precision bf16, or auto on CUDA) the fp32
              weights stay and a 16-bit copy of every linear is cached.
  activations saved for backward, per token per Llama-style decoder layer (HF eager RMSNorm, SDPA, SwiGLU):
                attention  norm output h, q h, rotate_half(q) h, q_rope h, k/rot(k)/k_rope/v 4*kvd,
                           SDPA output h, o_proj input (the transpose-reshape copy) h     = a*(6h + 4kvd)
                MLP        norm output h, gate I, silu(gate) I, up I, silu*up I            = a*(h + 4I)
                2 RMSNorms input upcast to fp32 4h + normalised (input dtype) a*h each  = 2*(4h + a*h)
              = a*(9h + 4kvd + 4I) + 8h bytes; with eager attention (no SDPA kernel) add the attention
              probabilities heads*S*(4 + a) (fp32 softmax, then cast). A 2-matrix MLP (BERT) has a*(h + 2I).
              So activations = B*S*L*h*f with the per-layer factor f = that / h (`activation_factor`).
  logits      training (HF loss over labels=): logits a + fp32 copy 4 (a < 4) + log-softmax 4 + its grad 4 +
              grad of the logits 4 = B*S*V*(a + 12). Evaluation (compress/evaluate.py, no grad, use_cache
              off): logits a + logits[:, :-1].float() 4 (a copy when a < 4 or B > 1) + log-softmax 4.
  KV cache    B*T*L*2*kvd*a: the decode-speed generate, the int8 outlier pass (HF default use_cache).
  evaluation  `eval_terms`: what compress/evaluate.py holds while it scores a stage's output.

What is measured, and what `growth` means. The pipeline measures a stage with its input model already loaded
(compress/measure.py, PeakMemory): on CPU, the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the
RSS right before the stage; on CUDA, torch.cuda.max_memory_allocated() after a reset, with the input on the
GPU. So a stage's growth is the extra memory on top of the resident input model, assuming the input stays
resident for the whole stage (true when it was loaded from safetensors, which memory-maps it: a tensor the
stage replaces does not free its pages until the whole file is unmapped, unless the stage pages them out, as
GPTQ and RTN do). Allocated = on-device input + growth (what CUDA max_allocated reports); peak adds the fixed
overhead of the process (a torch + transformers CPU process, or the CUDA context): what must fit.

Not modelled: glibc heap retention (compress/measure.py keeps it small in a run), paging in kernel code on
first use and oneDNN scratch (measure.RSS_NOISE_BYTES: a few MiB, all a tiny model uses), DeepSpeed and
FSDP other than configs/accelerate/fsdp.yaml's recipe (`compress plan --fsdp N`: see training_terms), gradient
checkpointing,
8-bit optimizers, architectures other than decoder-only Llama-style and BERT-style encoders (their
parameters are still counted exactly; activations use the Llama derivation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from compress import families, measure
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


def machine(device) -> Device:
    """The Device this process computes on: a CUDA device's total memory, or this machine's RAM."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return Device(str(dev), "cuda", int(total))
    return _cpu_device()


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
        """The shape of the same architecture with some config fields changed (pruned, fewer layers); Llama key
        names go to the family's keys, per-layer lists follow a new layer count (families.changed_config)."""
        return describe(families.changed_config(self.config, **config_changes))


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
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    raw = json.loads(config_json)
    if not raw.get("model_type"):
        raise CompressError("model config has no 'model_type'; give the model's config.json")
    clean = {k: v for k, v in raw.items() if k not in ("quantization_config", "transformers_version")}
    try:
        config = AutoConfig.for_model(**clean)
    except (ValueError, KeyError) as e:
        raise CompressError(f"transformers cannot build a config of type {raw['model_type']!r}: {e}") from None
    from compress.checkpoint import auto_class

    auto = auto_class(raw)
    fam = families.find(raw)
    if auto is AutoModel and not raw.get("architectures") and (
            (fam is not None and not fam.encoder) or config.model_type == "gemma"):
        auto = AutoModelForCausalLM  # a config without architectures, of a decoder family: its causal-LM head
    with torch.device("meta"):  # no storage: exact shapes at no memory cost
        model = auto.from_config(config)
    return _shape_from_model(model, raw)


def _decoder_layers(model) -> Any:
    """The ModuleList of transformer blocks: where the family keeps them, else the longest ModuleList."""
    import torch

    fam = families.find(model)
    if fam is not None and fam.get(model, fam.layers) is not None:
        return fam.layer_list(model)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise CompressError(f"{type(model).__name__} has no list of layers; the planner needs a transformer")
    return max(lists, key=len)


def _shape_from_model(model, raw: dict) -> ModelShape:
    from compress import moe

    cfg = model.config
    fam = families.find(cfg)
    layers = _decoder_layers(model)
    block = layers[0]
    # what a weight quantizer sees: linears and Conv1D, and fused MoE experts as the per-expert linears they become
    linears = tuple((n, i, o) for n, (i, o) in moe.planned_linears(block, fam).items())
    params = list(model.parameters())  # unique tensors: tied weights once
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    impl = getattr(cfg, "_attn_implementation", None) or raw.get("attn_implementation") or "sdpa"
    names = {n.split(".")[-1] for n, *_ in linears}
    intermediate, kv_heads, gated = (fam.widths(cfg) if fam is not None else (
        getattr(cfg, "intermediate_size", None) or 4 * hidden, getattr(cfg, "num_key_value_heads", None) or heads,
        "gate_proj" in names))
    return ModelShape(
        config=raw,
        model_type=cfg.model_type,
        params=sum(p.numel() for p in params),
        vocab=cfg.vocab_size,
        hidden=hidden,
        intermediate=intermediate,
        layers=len(layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)) and _is_tied(model),
        gated_mlp=gated,
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


def training_terms(shape: ModelShape, w: int, batch: int, seq: int, autocast: bool, checkpointing: bool = False,
                    new_weights: bool = False, master_weights: bool = False, fsdp: int = 1) -> dict:
    """Gradients, AdamW states, activations and logits of full training of `shape` with w-byte weights.

    As compress/train.py trains: torch.optim.AdamW, whose m and v take the parameters' dtype, gradients in
    the parameters' dtype, no master copy; autocast keeps w = 4 weights and caches 16-bit copies of the
    linears. master_weights: the usual bf16 recipe instead (bf16 weights and grads, fp32 master + fp32 m, v),
    as the README's arithmetic table assumes. new_weights: the trained model is a new copy (a distillation student).
    fsdp > 1: one of `fsdp` processes of FSDP2 full shard as configs/accelerate/fsdp.yaml runs it (fsdp_terms)."""
    if fsdp > 1:
        return fsdp_terms(shape, batch, seq, fsdp, checkpointing)
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


def fsdp_unit_params(shape: ModelShape) -> int:
    """Parameters of the largest unit FSDP gathers at once: a decoder layer, or the embedding / LM head unit
    (accelerate wraps each decoder layer, the input embedding, and [final norm, LM head], tied ones together)."""
    return max(shape.layer_params, shape.vocab * shape.hidden + shape.hidden)


def fsdp_terms(shape: ModelShape, batch: int, seq: int, processes: int, checkpointing: bool = False) -> dict:
    """One process's training terms under FSDP2 full shard over `processes`, as compress/train.py runs
    configs/accelerate/fsdp.yaml (mixed_precision bf16): accelerate upcasts the trained parameters to fp32, so each
    process holds 1/N of fp32 weights, fp32 gradients and fp32 AdamW m, v (16 bytes/param / N); FSDP computes with
    bf16 copies of the gathered units: at the backward peak the largest unit (the LM head, kept gathered from the
    end of forward) and its unsharded bf16 gradient before the reduce-scatter, plus the next decoder layer
    prefetched. Activations and logits are per process, in bf16, as without FSDP. The input model's own tensors
    are not resident: see training_parts."""
    P, n = shape.params, processes
    terms = {
        "fp32 weight shards": -(-4 * P // n),
        "fp32 gradient shards": -(-4 * P // n),
        "AdamW states (m, v; fp32 shards)": -(-8 * P // n),
        "gathered units (bf16: largest + its gradient, next layer)": 2 * (2 * fsdp_unit_params(shape)
                                                                          + shape.layer_params),
        "activations": training_activation_bytes(shape, 2, batch, seq, checkpointing),
    }
    if shape.logits:
        terms["logits + loss"] = train_logits_bytes(shape, 2, batch, seq)
    return terms


def training_parts(terms: dict, state: ModelState, where: "Where", out: ModelState,
                   trained: ModelShape | None = None, trains_input: bool = True) -> "Parts":
    """A training stage's Parts from its `terms`: the input model resident, plus the terms. Under FSDP
    (where.fsdp > 1) a trained input (`trains_input`) is replaced by its shards (in the terms), and every process
    first holds the trained model (`trained`, default the input's shape) whole: accelerate upcasts it to fp32 and
    then shards it, so the peak is the larger of that sharding phase and training."""
    if where.fsdp <= 1:
        return Parts(terms, state.weights_bytes(), out)
    shape = trained or state.shape
    resident = 0 if trains_input else state.weights_bytes()
    sharding = {"trained model whole in fp32 (accelerate upcasts, then shards)": 4 * shape.params,
                "fp32 weight shards": -(-4 * shape.params // where.fsdp)}
    phases = {"sharded training": terms, "sharding": sharding}
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    other = next(k for k in phases if k != peak)
    notes = [f"FSDP over {where.fsdp} processes, per process; peak in the {peak} phase, {other} phase "
             f"{fmt_bytes(sum(phases[other].values()))}; the main process also saves and evaluates the whole model"]
    return Parts({k: v for k, v in phases[peak].items() if v}, resident, out, notes)


def block_bytes(state: ModelState) -> int:
    """Bytes of one decoder block in `state` (what onloading holds of a model at a time)."""
    s = state.shape
    outer = s.vocab * s.hidden * state.act_bytes * (1 if s.tied else 2)
    return max(0, state.weights_bytes() - outer) // max(s.layers, 1)


def spilled_embedding_cast(state: ModelState, out: ModelState) -> dict:
    """Terms of casting the input embedding to out's dtype a slab at a time into a whole new tensor, which is then
    spilled to disk (onload.cast_outside_spilled): what onloaded cast and int8 hold outside the blocks."""
    s = state.shape
    return {f"embedding in {out.dtype} (then spilled to disk)": s.vocab * s.hidden * out.act_bytes,
            "one slab of the input embedding": min(s.vocab * s.hidden * state.act_bytes, measure.CAST_SLAB_BYTES)}


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


# ----------------------------------------------------------------------------------------------------
# What a stage's memory model gets and gives


@dataclass
class Where:
    """What a stage's memory model knows beyond its config and input model."""
    kind: str = "cpu"                 # cpu | cuda
    device_bytes: int | None = None   # the device's memory, when planning for one
    states: dict = field(default_factory=dict)   # earlier stage names, indices (str) and 'base' -> ModelState
    input: ModelState | None = None
    data: dict = field(default_factory=dict)     # the pipeline's data block (calibration, train)
    loaded: set = field(default_factory=set)     # libraries already imported by an earlier stage of this process
    fsdp: int = 1                     # processes a training stage is sharded over (accelerate FSDP); 1: none
    onload: bool = False              # the input stays on the host, one block at a time on the device (compress/onload.py)


@dataclass
class Parts:
    """A stage's memory model: its growth terms, the input bytes that live on the device while it runs, and the
    state of the model it outputs (which flows into the next stage's prediction)."""
    terms: dict
    on_device_input: int
    out: ModelState
    notes: list = field(default_factory=list)
    loads: tuple = ()                 # libraries the stage imports into the process (they stay: see Where.loaded)
    host: dict | None = None          # onloaded on a GPU: what the host holds meanwhile (terms); None: nothing planned


@dataclass
class Tip:
    """One change a stage's `memory_advice` proposes when it does not fit; the planner re-plans with `changes`
    (Config fields) and prints `text` with the predicted saving."""
    text: str
    changes: dict


def require_plain(state: ModelState, stage: str) -> None:
    """Refuse a quantized input for a stage that needs float weights (before any work)."""
    if state.format != "plain":
        raise CompressError(f"a {stage} stage needs a plain (unquantized) input model, but it gets a "
                            f"{state.format} one; move the {stage} stage before quantization or use `from:`")


def phased(phases: dict, state: ModelState, out: ModelState) -> Parts:
    """Parts of a stage that runs in phases ({phase: {term: bytes}}): the peak phase's terms are its growth,
    with a note on the others."""
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    terms = {k: v for k, v in phases[peak].items() if v}
    notes = [f"peak in the {peak} phase; " + ", ".join(f"{k} phase {fmt_bytes(sum(v.values()))}"
                                                      for k, v in phases.items() if k != peak)]
    return Parts(terms, state.weights_bytes(), out, notes)


def autocast(mixed_precision: str, kind: str) -> bool:
    """compress/train.py: bf16 autocast with mixed_precision bf16, or auto on CUDA; none on CPU."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and kind == "cuda")


def training_tips(cfg, state: ModelState, kind: str, fits) -> list[Tip]:
    """Advice for a training stage whose Config has batch_size and seq_len (and maybe mixed_precision):
    the largest batch that fits (`fits(**changes)` re-plans) with gradient accumulation, a shorter sequence,
    16-bit activations."""
    b, seq = cfg.batch_size, cfg.seq_len
    tips = []
    if b > 1:
        v = b // 2
        while v >= 1 and not fits(batch_size=v):
            v //= 2
        if v >= 1:
            tips.append(Tip(f"batch_size: {v} with grad_accum x{b // v} (same tokens per step) fits", {"batch_size": v}))
        else:
            tips.append(Tip(f"batch_size: 1 with grad_accum x{b} (same tokens per step)", {"batch_size": 1}))
    if seq > 128:
        tips.append(Tip(f"seq_len: {seq // 2}", {"seq_len": seq // 2}))
    mp = getattr(cfg, "mixed_precision", None)
    if mp is not None and state.dtype == "float32" and not autocast(mp, kind):
        tips.append(Tip("mixed_precision: bf16 (16-bit activations)", {"mixed_precision": "bf16"}))
    return tips


def text_domains(value, fallback) -> list[str]:
    """A stage's text sources: its own setting, else the pipeline's (data.train), as a list."""
    v = value if value else fallback
    if not v:
        return []
    return [v] if isinstance(v, str) else list(v)


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
