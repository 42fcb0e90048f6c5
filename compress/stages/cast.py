"""cast: change the dtype of a model's floating-point weights (float32 / float16 / bfloat16).

The first compression step anyone takes: FP32 -> BF16 halves weight memory and disk size at (almost) no
accuracy cost, since bfloat16 keeps float32's exponent range. float16 halves it too but can overflow in
activations of some models; prefer bfloat16 unless the deployment target lacks it.

    stages:
      - cast: {dtype: bfloat16}

A model bigger than memory (the pipeline's offload onloads it) is cast a block at a time from its memory map,
each finished block written to the stage's scratch folder (cast_blockwise): the same tensors, one block resident.

Not supported: casting quantized checkpoints (gptq, bnb-int8) - their packed integer tensors are not
floating point; cast before quantizing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from compress import memory
from compress.errors import CompressError

NAME = "cast"
ONLOAD = True  # a model bigger than memory is cast a block at a time from its memory map (offload)
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
    if ctx.onload and ctx.work_dir is not None:
        cast_blockwise(model, DTYPES[cfg.dtype], Path(ctx.work_dir))
    else:
        cast_weights(model, DTYPES[cfg.dtype])
    model.config.dtype = DTYPES[cfg.dtype]
    return model, {"dtype_before": before, "dtype_after": cfg.dtype}


def cast_weights(model, dtype: torch.dtype) -> None:
    """Cast parameters and persistent float buffers; leave non-persistent ones (e.g. RoPE inv_freq) as built.

    `model.to(dtype)` would also round buffers that are recomputed in float32 at load time, so the
    in-memory model would differ from the reloaded checkpoint.
    """
    from compress import onload

    onload.cast_tensors(model.modules(), dtype, paged=False)


def cast_blockwise(model, dtype: torch.dtype, scratch: Path) -> None:
    """cast_weights with a model on the host that may exceed RAM (offload): each block's tensors cast from the
    memory-mapped input a slab at a time (onload.cast_paged, the source pages handed back), the block's result
    written to `scratch` and held as views of that file (onload.spill); then the tensors outside the blocks.
    Resident memory holds about one block, not the model; the values are cast_weights' exactly."""
    from compress import measure, onload
    from compress.modeling import decoder_layers_with_name

    layers_name, layers = decoder_layers_with_name(model)
    for i, block in enumerate(layers):
        originals = list(block.state_dict().values())  # the input's mapped tensors: their pages stay resident
        onload.cast_tensors(block.modules(), dtype)
        onload.spill(list(block.modules()), scratch / f"cast-{i:05d}.safetensors", parameters=True)
        measure.page_out_mapped(originals)  # ... until handed back (the whole input otherwise, file-backed)
        del originals
        measure.release_free_heap()
    onload.cast_outside_spilled(model, layers_name, dtype, scratch)


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: every floating parameter converted (p.data = p.data.to(dtype)); the input stays
    resident, so the peak holds both copies."""
    memory.require_plain(state, NAME)
    target = memory.dtype_name(cfg.dtype)
    out = dataclasses.replace(state, dtype=target)
    if where.onload and target == state.dtype:
        return memory.Parts({}, 0, out, ["onloaded: already in the target dtype, nothing is cast"])
    if where.onload:
        # cast_blockwise: one block paged in and its cast (then spilled), or the largest tensor outside the blocks
        # (the embedding, the head) cast a slab at a time into a whole new tensor; on the host, none on a device
        host = max({"one block's weights paged in": memory.block_bytes(state),
                    f"one block in {target} (then spilled to disk)": memory.block_bytes(out)},
                   memory.spilled_embedding_cast(state, out), key=lambda terms: sum(terms.values()))
        if where.kind == "cpu":
            return memory.Parts(host, 0, out, ["onloaded: cast a block at a time, each spilled to disk"])
        return memory.Parts({}, 0, out, ["onloaded: cast on the host, a block at a time"], host=host)
    terms = {} if target == state.dtype else {f"{target} copy of weights": out.float_numel() * out.act_bytes}
    return memory.Parts(terms, state.weights_bytes(), out)
