"""LLM.int8() through bitsandbytes: int8 linears, outlier input dimensions kept in 16-bit, and its checkpoint format.

Paper: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
https://arxiv.org/abs/2208.07339. Each weight row is quantized to int8 with its own absmax scale
(vector-wise: CB = round(127 * W / SCB), SCB = max|W| per output row). At run time each token row of X is
quantized the same way, except the input feature dimensions where some |X| >= threshold (the outliers):
those columns are multiplied in the activations' dtype against the dequantized weight columns and added back
(bitsandbytes' `Linear8bitLt`, has_fp16_weights=False; it casts X to float16 before quantizing it). This module holds the plain functions the `int8`
stage and `checkpoint.load` share:

- `quantize_model(model, threshold, skip, device)`: swap nn.Linear (and GPT-2 Conv1D) for Linear8bitLt.
- `prepare_for_load(model, quantization_config)`: the same swap with empty int8 skeletons, so that
  `load_state_dict` of a saved checkpoint fits (keys `<linear>.weight` int8 [out, in], `<linear>.SCB`
  float32 [out], `<linear>.weight_format` uint8 scalar 0 = row-major, `<linear>.bias` if any: transformers'
  bitsandbytes 8-bit serialization, which `AutoModelForCausalLM.from_pretrained` reads too).
- `OutlierCounter`: forward pre-hooks that count the input dimensions crossing the threshold.

Linear subclasses (Falcon's FalconLinear) are quantized like nn.Linear; MoE experts once they are per-expert
linears (compress/moe.py; `prepare_for_load` unfuses the skeleton the same way).

Not supported: 4-bit (load_in_4bit), has_fp16_weights=True (int8 training), CPU/disk offload of the fp32
parts (llm_int8_enable_fp32_cpu_offload).
bitsandbytes is imported lazily: without it `require_bitsandbytes()` raises a CompressError.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from torch import nn

from compress.errors import CompressError

ROW_FORMAT = 0  # bitsandbytes' `weight_format` code for row-major int8 weights (the only one it still writes)


def quiet_import(module: str, hint: str):
    """Import `module` (bitsandbytes, or peft, which imports it) with bitsandbytes' CPU backend logger quiet, or raise
    a CompressError with `hint`. That backend warns at import that a 4-bit kernel (fetched from the hub by the
    `kernels` package) is missing; LLM.int8() and LoRA over it do not use it."""
    import importlib
    import logging

    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompressError(hint) from None
    finally:
        cpu_ops.setLevel(level)


def require_bitsandbytes():
    """The bitsandbytes module, or a CompressError that says how to install it."""
    return quiet_import("bitsandbytes", "int8 needs bitsandbytes: pip install 'compress[int8]'")


# ---------------------------------------------------------------------------------------------- which linears


def is_skipped(name: str, patterns: list[str] | None) -> bool:
    """True when module `name` matches a skip pattern, by the rule transformers' bnb loader applies.

    A pattern matches as a prefix ending at a module boundary ("model.layers.1" skips "model.layers.1.mlp.up_proj"
    but not "model.layers.11..."), as a regex with the same boundary ("model.layers.*.mlp"), or as a suffix
    ("lm_head", "down_proj"). Keeping the rule identical is what lets transformers reload our checkpoints.
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns or [])


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def modules_to_skip(model: nn.Module, skip: list[str] | None) -> list[str]:
    """The skip list written to `llm_int8_skip_modules`: the given patterns, the model's fp32-pinned modules, and
    the output embedding when it is tied to the input embedding (an int8 copy would break the tie).

    `skip=None` means transformers' default: the output embedding.
    """
    head = _output_embedding_names(model)
    patterns = list(skip) if skip is not None else list(head)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    extra = list(getattr(model, "_keep_in_fp32_modules", None) or []) + (head if tied else [])
    for name in extra:
        if not is_skipped(name, patterns):
            patterns.append(name)
    return patterns


def _output_embedding_names(model: nn.Module) -> list[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if out is not None and m is out]


def quantizable_linears(model: nn.Module, skip: list[str] | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear (subclasses too: Falcon's FalconLinear computes the same x W^T + b) and
    Conv1D not matched by `skip`, in model order; bitsandbytes' own (already quantized) linears are left out."""
    conv1d = _conv1d_type()
    return [
        (name, m) for name, m in model.named_modules()
        if (isinstance(m, (nn.Linear, conv1d)) and not type(m).__module__.startswith("bitsandbytes"))
        and not is_skipped(name, skip)
    ]


# ------------------------------------------------------------------------------------------------ quantization


def int8_linear(CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> nn.Module:
    """A ready Linear8bitLt holding int8 weight CB [out, in] and its row scales SCB [out] (float32)."""
    bnb = require_bitsandbytes()
    out_features, in_features = CB.shape
    with torch.device("meta"):  # skip allocating the float weight Linear8bitLt.__init__ would make
        q = bnb.nn.Linear8bitLt(in_features, out_features, bias is not None, has_fp16_weights=False, threshold=threshold)
    # CB is the weight's own storage: load_state_dict copies into it, and forward reads state.CB from it.
    q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    if bias is not None:
        q.bias = nn.Parameter(bias, requires_grad=False)
    q.requires_grad_(False)
    return q


def quantize_linear(linear: nn.Module, threshold: float, device: torch.device) -> nn.Module:
    """Quantize one nn.Linear (or Conv1D) row-wise to int8 on `device`; returns the Linear8bitLt."""
    bnb = require_bitsandbytes()
    W = linear.weight.detach()
    if not isinstance(linear, nn.Linear):  # GPT-2 Conv1D stores W as [in, out]
        W = W.t()
    W16 = W.to(device=device, dtype=torch.float16).contiguous()  # [out, in]; bitsandbytes quantizes from fp16
    if not torch.isfinite(W16).all():
        raise CompressError("int8: a weight does not fit in float16 (|w| > 65504); LLM.int8() cannot quantize it")
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W16)  # CB int8 [out, in], SCB float32 [out] = max|W| per row
    bias = None if linear.bias is None else linear.bias.detach().to(device).clone()
    return int8_linear(CB, SCB, bias, threshold)


def quantize_model(model: nn.Module, threshold: float, skip: list[str], device: torch.device) -> list[str]:
    """Swap every quantizable linear for its Linear8bitLt (weights quantized on `device`), in place.

    Returns the names of the swapped modules. Other parameters keep their dtype and device.
    """
    names = []
    for name, linear in quantizable_linears(model, skip):
        model.set_submodule(name, quantize_linear(linear, threshold, device))
        names.append(name)
    return names


class _DropCastWarning(logging.Filter):
    """Drops bitsandbytes' per-call "inputs will be cast from X to float16" warning (one line per linear per forward).

    Casting to float16 before quantizing activations is LLM.int8() as bitsandbytes implements it, not an accident.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_cast_warning() -> None:
    """Install `_DropCastWarning` on bitsandbytes' matmul logger once (bfloat16/float32 activations trigger it)."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in log.filters):
        log.addFilter(_DropCastWarning())


def cast_unquantized(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Move every module to `device`; cast float parameters outside the Linear8bitLt modules to `dtype`.

    Parameters only: buffers such as rotary `inv_freq` keep their float32 precision. Never call
    `model.to(dtype)` on a quantized model: it would turn the int8 weights into floats.
    """
    bnb = require_bitsandbytes()
    quiet_cast_warning()
    model.to(device)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def bnb_quantization_config(threshold: float, skip: list[str]) -> dict:
    """config.json's `quantization_config`, exactly as transformers' BitsAndBytesConfig writes it."""
    import json

    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=list(skip))
    return json.loads(qc.to_json_string(use_diff=False))  # plain JSON types (quant_method is an Enum in to_dict())


# ------------------------------------------------------------------------------------------------ loading


def prepare_for_load(model: nn.Module, quantization_config: dict) -> nn.Module:
    """Swap the linears a bnb 8-bit checkpoint quantized for empty Linear8bitLt skeletons, in place.

    After this, `model.load_state_dict(<safetensors of the checkpoint>)` fills int8 weights, SCB and biases
    (weight_format is consumed by bitsandbytes' load hook). The skeletons live on the CPU (or the original
    module's device when that is not meta); move the loaded model with `model.to(device)`, never with a dtype.
    """
    qc = dict(quantization_config)
    if qc.get("quant_method") != "bitsandbytes":
        raise CompressError(f"int8.prepare_for_load: quant_method is {qc.get('quant_method')!r}, expected 'bitsandbytes'")
    if not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        raise CompressError("bitsandbytes checkpoint is not 8-bit (load_in_4bit is not supported); use transformers to load it")
    if qc.get("llm_int8_has_fp16_weight"):
        raise CompressError("bitsandbytes checkpoint has llm_int8_has_fp16_weight=true (int8 training); not supported")
    require_bitsandbytes()
    quiet_cast_warning()
    from compress import moe

    moe.unfuse(model, copy=False)  # the int8 stage quantized MoE experts per expert (compress/moe.py)
    threshold = float(qc.get("llm_int8_threshold", 6.0))
    skip = modules_to_skip(model, qc.get("llm_int8_skip_modules"))
    for name, linear in quantizable_linears(model, skip):
        W = linear.weight
        device = W.device if W.device.type != "meta" else torch.device("cpu")
        out_features, in_features = W.shape if isinstance(linear, nn.Linear) else W.shape[::-1]
        CB = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        SCB = torch.ones(out_features, dtype=torch.float32, device=device)
        bias = None if linear.bias is None else torch.zeros(out_features, dtype=linear.bias.dtype, device=device)
        model.set_submodule(name, int8_linear(CB, SCB, bias, threshold))
    return model


# ------------------------------------------------------------------------------------------------ accounting


def state_bytes(module: nn.Module) -> int:
    """Bytes of the module's state_dict (what a checkpoint stores), tied tensors counted once."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.device, t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def layer_of(name: str) -> str | None:
    """The decoder-layer index in a module name ('model.layers.3.mlp.up_proj' -> '3'), or None."""
    m = re.search(r"\.(\d+)(?:\.|$)", name)
    return m.group(1) if m else None


class OutlierCounter:
    """Count, per linear, the input feature dimensions where some |x| >= threshold (LLM.int8's outlier columns).

    Use as a context manager around forward passes:
        with OutlierCounter(dict(linears), threshold) as oc:
            model(ids)
        oc.stats()
    `>=` is bitsandbytes' own test (int8_vectorwise_quant), so the counts are the columns it computes in 16-bit.
    Per linear it keeps the union of outlier columns over all calls and the per-call count (bitsandbytes
    decomposes per call), whose mean is what each matmul paid.
    """

    def __init__(self, modules: dict[str, nn.Module], threshold: float):
        self.modules, self.threshold = modules, threshold
        self.union: dict[str, torch.Tensor] = {}           # name -> bool [in_features]
        self.per_call: dict[str, list[int]] = defaultdict(list)
        self._handles = []

    def _hook(self, name):
        def hook(module, args):
            X = args[0].detach()
            X = X.reshape(-1, X.shape[-1])                   # (tokens, in_features)
            cols = (X.abs() >= self.threshold).any(dim=0)    # (in_features,)
            if name not in self.union:
                self.union[name] = torch.zeros_like(cols)
            self.union[name] |= cols  # in place: no small survivor per call between freed activations in the heap
            self.per_call[name].append(int(cols.sum()))
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def columns(self, name: str) -> list[int]:
        """Indices of the input dimensions of `name` that crossed the threshold in any call."""
        return torch.nonzero(self.union[name]).flatten().tolist() if name in self.union else []

    def stats(self) -> dict:
        """JSON-able counts: per linear, per layer (sums over its linears) and total."""
        per_linear = {}
        per_layer: dict[str, int] = defaultdict(int)
        for name in self.modules:
            if name not in self.union:
                continue
            n = int(self.union[name].sum())
            calls = self.per_call[name]
            per_linear[name] = {
                "outlier_dims": n,
                "in_features": int(self.union[name].numel()),
                "mean_per_forward": round(sum(calls) / len(calls), 3),
            }
            layer = layer_of(name)
            if layer is not None:
                per_layer[layer] += n
        total = sum(v["outlier_dims"] for v in per_linear.values())
        total_in = sum(v["in_features"] for v in per_linear.values())
        return {
            "threshold": self.threshold,
            "total_outlier_dims": total,
            "fraction_of_input_dims": round(total / total_in, 6) if total_in else 0.0,
            "linears_with_outliers": sum(1 for v in per_linear.values() if v["outlier_dims"]),
            "per_layer": dict(sorted(per_layer.items(), key=lambda kv: int(kv[0]))),
            "per_linear": per_linear,
        }
