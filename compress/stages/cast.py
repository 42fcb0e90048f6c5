"""cast: change the dtype of a model's floating-point weights (float32 / float16 / bfloat16).

The first compression step anyone takes: FP32 -> BF16 halves weight memory and disk size at (almost) no
accuracy cost, since bfloat16 keeps float32's exponent range. float16 halves it too but can overflow in
activations of some models; prefer bfloat16 unless the deployment target lacks it.

    stages:
      - cast: {dtype: bfloat16}

Not supported: casting quantized checkpoints (gptq, bnb-int8) - their packed integer tensors are not
floating point; cast before quantizing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from compress import memory
from compress.errors import CompressError

NAME = "cast"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Config:
    dtype: str = "bfloat16"  # target dtype of every floating-point parameter and buffer: float32 | float16 | bfloat16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise CompressError(f"cast.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def run(model, tokenizer, cfg: Config, ctx):
    """Cast in place; return the model and the before/after dtypes."""
    if getattr(model.config, "quantization_config", None):
        raise CompressError("cast cannot change a quantized model; put the cast stage before gptq/int8")
    before = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    cast_weights(model, DTYPES[cfg.dtype])
    model.config.dtype = DTYPES[cfg.dtype]
    return model, {"dtype_before": before, "dtype_after": cfg.dtype}


def cast_weights(model, dtype: torch.dtype) -> None:
    """Cast parameters and persistent float buffers; leave non-persistent ones (e.g. RoPE inv_freq) as built.

    `model.to(dtype)` would also round buffers that are recomputed in float32 at load time, so the
    in-memory model would differ from the reloaded checkpoint.
    """
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: every floating parameter converted (p.data = p.data.to(dtype)); the input stays
    resident, so the peak holds both copies."""
    memory.require_plain(state, NAME)
    target = memory.dtype_name(cfg.dtype)
    out = dataclasses.replace(state, dtype=target)
    terms = {} if target == state.dtype else {f"{target} copy of weights": out.float_numel() * out.act_bytes}
    return memory.Parts(terms, state.weights_bytes(), out)
