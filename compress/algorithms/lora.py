"""LoRA adapters over every weight format compress writes, through peft: plain, GPTQ QuantLinear, bnb int8.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
A frozen linear W [out, in] gets a trainable low-rank update,

    h = W x + (alpha / r) B A dropout(x),    A [r, in] (Kaiming-uniform init), B [out, r] (zeros)

so the adapted model starts exactly equal to the frozen one, and only r (in + out) numbers per linear learn.
QLoRA: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314.
W stays in its quantized storage and is dequantized for each matmul, in the forward and again in the backward
(W is frozen, so the backward needs only dL/dx = dL/dh W), so no full-precision copy of W outlives its matmul.

Which module gets which layer (peft 0.21's dispatch, first match wins):
    nn.Linear                      peft's own lora.Linear (mergeable)
    bitsandbytes Linear8bitLt      peft's lora.bnb.Linear8bitLt (needs model.is_loaded_in_8bit, as transformers sets)
    compress QuantLinear (GPTQ v1) QuantLinearLora below, registered with peft's custom-module API
                                   (LoraConfig._register_custom_module, marked experimental by peft)
`lora_config()` builds a LoraConfig with that registration; an adapter saved over a QuantLinear base loads back
only through a config that has it too (`load_adapter`, which compress.checkpoint.load uses).

QuantLinearLora computes the base product with `dequant_linear`: when the input needs a gradient and the layer
keeps no dequantized cache (QuantLinear.cache False), an autograd function dequantizes W in the forward, frees
it, and dequantizes again in the backward; otherwise the QuantLinear's own forward runs (its cache, if on, then
holds every dequantized weight: faster, but the memory of a float model).

Not supported: merging into QuantLinear or Linear8bitLt (packed integer weights; peft's int8 merge re-quantizes,
we refuse instead), DoRA, adapters on embeddings or lm_head, several adapters at once.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from compress.algorithms.gptq import QuantLinear
from compress.errors import CompressError


def require_peft():
    """The peft module, or a CompressError that says how to install it (peft imports bitsandbytes: quietly)."""
    from compress.algorithms.int8 import quiet_import

    return quiet_import("peft", "lora needs peft: pip install 'compress[lora]' (peft >= 0.21)")


_peft = require_peft()
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# The frozen quantized product, dequantized on the fly


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T + b with W = q.dequantize(); W is rebuilt in the backward instead of being saved for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype
        W = q.dequantize(dtype)                                        # [out, in], freed on return
        bias = None if q.bias is None else q.bias.to(dtype)
        return F.linear(x.to(dtype), W, bias)                          # [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        W = ctx.q.dequantize(ctx.dtype)                                # [out, in] again
        return (grad.to(ctx.dtype) @ W).to(ctx.x_dtype), None, None   # dL/dx [..., in]; W and dtype get none


def dequant_linear(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """q(x), keeping no dequantized weight alive for the backward when q keeps no cache (QLoRA-style)."""
    if q.cache or not (torch.is_grad_enabled() and x.requires_grad):
        return q(x)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return _DequantMatmul.apply(x, q, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The peft layer for QuantLinear


class QuantLinearLora(nn.Module, LoraLayer):
    """peft LoRA layer over a compress QuantLinear: h = Q(x) + (alpha / r) B A dropout(x), Q never updated.

    Built by peft (`target, adapter_name, config=LoraConfig, r=, lora_alpha=, **extra`) through the custom-module
    registration; follows peft's LoraLayer conventions (lora_A/lora_B ModuleDicts, scaling, active adapters),
    so saving, loading, disabling and unloading work as for peft's own layers. Adapters are float32 (the base
    holds integer codes, so there is no float dtype to follow).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **extra):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise CompressError("lora: DoRA is not supported over GPTQ QuantLinear layers")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=extra.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("adapter_names") is not None:
            raise CompressError("lora: per-sample adapter selection is not supported over QuantLinear layers")
        result = dequant_linear(self.get_base_layer(), x)               # [..., out]
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            result = result + (B(A(self.lora_dropout[name](xa))) * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """(alpha / r) B A: the [out, in] update this adapter adds to the dequantized weight."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise CompressError("lora: adapters cannot be merged into GPTQ QuantLinear weights (packed integer codes); "
                            "keep them as an adapter, or train LoRA on the plain model before quantizing")

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ----------------------------------------------------------------------------------------------------------------
# Configs, targets, module swaps


def lora_config(target_modules: list[str], r: int, alpha: float, dropout: float, inference_mode: bool = False):
    """A peft LoraConfig for causal LMs on exactly these module names, with QuantLinear registered."""
    cfg = _peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                           bias="none", task_type="CAUSAL_LM", inference_mode=inference_mode)
    return register(cfg)


def register(cfg):
    """Register QuantLinearLora for QuantLinear on a LoraConfig (in place; returns it)."""
    cfg._register_custom_module({QuantLinear: QuantLinearLora})
    return cfg


def is_adapted(model) -> bool:
    """True for a peft model (adapters applied, not merged)."""
    return isinstance(model, _peft.PeftModel)


def adapter_layers(model) -> dict[str, nn.Module]:
    """Name -> peft tuner layer, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@contextlib.contextmanager
def without_adapters(model):
    """Yield the underlying transformers model with each LoRA layer swapped back for its base layer; swap back after.

    Inside, the model's modules, names and state_dict are the frozen base's own (no `base_layer.` infix, no
    lora_* tensors): what compress.checkpoint.save writes for the base. Nothing is copied.
    """
    base = model.get_base_model() if is_adapted(model) else model
    swapped = []
    for name, layer in list(adapter_layers(base).items()):
        base.set_submodule(name, layer.get_base_layer())
        swapped.append((name, layer))
    try:
        yield base
    finally:
        for name, layer in swapped:
            base.set_submodule(name, layer)


def load_adapter(model, folder, trainable: bool = False):
    """Apply the PEFT adapter saved in `folder` to `model` (any compress format); return the PeftModel."""
    cfg = register(_peft.LoraConfig.from_pretrained(str(folder)))
    _mark_int8(model)
    with _quiet_deprecations():
        return _peft.PeftModel.from_pretrained(model, str(folder), config=cfg, is_trainable=trainable)


def _mark_int8(model) -> None:
    """peft wraps Linear8bitLt only in models marked as 8-bit-loaded (transformers' flag; checkpoint.load's
    bnb-int8 path builds the model itself and does not set it)."""
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        model.is_loaded_in_8bit = True


def add_adapters(model, target_modules: list[str], r: int, alpha: float, dropout: float):
    """Wrap `model` in a PeftModel with fresh adapters on `target_modules` (B = 0: the model's outputs do not
    change); only adapter weights require grad."""
    _mark_int8(model)
    with _quiet_deprecations():
        return _peft.get_peft_model(model, lora_config(target_modules, r, alpha, dropout))


@contextlib.contextmanager
def _quiet_deprecations():
    """peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns once per call that it is renamed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
