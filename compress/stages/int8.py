"""`int8` stage: LLM.int8() weight quantization with bitsandbytes (Dettmers et al. 2022, arXiv 2208.07339).

    stages:
      - int8: {threshold: 6.0, skip: [lm_head], dtype: bfloat16}

Every nn.Linear (and subclass, e.g. Falcon's; and GPT-2's Conv1D) outside `skip` becomes a bitsandbytes
`Linear8bitLt`: int8 weights with one absmax scale per output row; at run time input dimensions holding a value
with |x| >= threshold are multiplied in 16-bit. MoE experts (Mixtral, Qwen3-MoE), fused 3-D tensors in
transformers 5, first become per-expert linears (compress/moe.py) and are quantized one Linear8bitLt per expert
linear; the router stays in `dtype`. Such a checkpoint reloads with `checkpoint.load` only: transformers 5 fuses
experts on load and its bitsandbytes path leaves fused experts alone. Stats give the quantized share of all
parameters and of the blocks' linear weights; a run that would leave most of the latter unquantized is refused.
Embeddings, norms and skipped linears are cast to `dtype` (16-bit by default, not float32 as a direct
transformers load on CPU leaves them; `dtype: float32` gives that load's numbers exactly, at 35% more memory
on SmolLM2). The returned model carries `config.quantization_config` in transformers' bitsandbytes 8-bit form,
so its saved checkpoint reloads with `checkpoint.load` (via `compress.algorithms.int8.prepare_for_load`) and
with `AutoModelForCausalLM.from_pretrained`.
Stats: bytes of the quantized linears vs the same linears in bf16, whole-model bytes vs the input, and the
outlier input dimensions seen on `calibration_samples` windows of the pipeline's `data.calibration` text.

With the pipeline's offload onloading it (a model bigger than memory), on a CPU, the stage works a block at a
time from the memory-mapped input, each finished block written to its scratch folder (quantize_onloaded).
Needs `pip install 'compress[int8]'` (bitsandbytes >= 0.45; CPU or CUDA). Not supported: 4-bit, int8
training (has_fp16_weights), an input that is already quantized, onloading on CUDA (refused when planned).
LLM.int8() is slower than 16-bit matmuls for small models: it saves memory, not time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from compress import families, memory, moe
from compress.algorithms import int8 as core
from compress.modeling import MIN_QUANTIZED_FRACTION, quantized_fraction
from compress.context import Context
from compress.errors import CompressError

NAME = "int8"
REQUIRES = ("bitsandbytes",)  # checked before any work (compress.pipeline.check_inputs)
ONLOAD = True  # on a CPU, a model bigger than memory is quantized a block at a time from its memory map (offload)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Config:
    threshold: float = 6.0        # outlier threshold (paper's alpha = 6): input dims with |x| >= it run in 16-bit; 0 = all int8
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  # modules kept in `dtype`: name prefix, regex or suffix
    dtype: str = "bfloat16"       # what stays unquantized (embeddings, norms, skipped linears) and activations; float32: as load_in_8bit on CPU
    calibration_samples: int = 4  # windows of data.calibration run for the outlier statistics (0 = no statistics)
    seq_len: int = 512            # tokens per calibration window

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or self.threshold < 0:
            raise CompressError(f"int8.threshold must be a number >= 0 (6.0 is the paper's), got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if isinstance(self.skip, str):
            self.skip = [self.skip]
        if not isinstance(self.skip, list) or not all(isinstance(s, str) and s for s in self.skip):
            raise CompressError(f"int8.skip must be a list of module names or patterns, got {self.skip!r}")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise CompressError(f"int8.skip pattern {pattern!r} is not a valid regex: {e}") from None
        if self.dtype not in DTYPES:
            raise CompressError(f"int8.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 0:
            raise CompressError(f"int8.calibration_samples must be an integer >= 0, got {self.calibration_samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise CompressError(f"int8.seq_len must be a positive integer, got {self.seq_len!r}")


def calibration_tokens(tokenizer, cfg: Config, ctx: Context) -> torch.Tensor | None:
    """[calibration_samples, seq_len] token windows of data.calibration, or None when there is nothing to run."""
    spec = ctx.data.get("calibration")
    if cfg.calibration_samples == 0 or not spec:
        return None
    from compress.data import calibration_blocks

    return calibration_blocks(tokenizer, spec, cfg.calibration_samples, cfg.seq_len, ctx.seed)


def run(model, tokenizer, cfg: Config, ctx: Context):
    """Quantize the model's linears with LLM.int8(); return (model, stats).

    Under compress.measure.mmap_threshold: linear by linear, its fp16 copies and int8 kernels' buffers are small
    allocations between the kept int8 weights, which glibc would otherwise keep in RSS (3.4x the live bytes).
    """
    from compress import measure

    with measure.mmap_threshold():
        return _run(model, tokenizer, cfg, ctx)


def _run(model, tokenizer, cfg: Config, ctx: Context):
    core.require_bitsandbytes()
    if getattr(model.config, "quantization_config", None):
        raise CompressError("int8 needs an unquantized input model; give the stage `from: base` or a plain stage")
    dtype = DTYPES[cfg.dtype]
    input_bytes = core.state_bytes(model)

    skip = core.modules_to_skip(model, cfg.skip)
    block_params, planned = coverage(model, skip)  # before any work: refuse what would stay mostly unquantized
    fam = families.find(model)
    who = fam.name if fam is not None else type(model).__name__
    if block_params and planned < MIN_QUANTIZED_FRACTION * block_params:
        raise CompressError(
            f"int8 would quantize only {100 * planned / block_params:.0f}% of the linear weights in the blocks of "
            f"{who} (skip={skip}); refusing a mostly unquantized result; check int8.skip")
    if not core.quantizable_linears(model, skip):
        raise CompressError(f"int8 found no linear to quantize in {who} (skip={skip}); check int8.skip")
    onloaded = ctx.onload and ctx.work_dir is not None
    if onloaded:
        _refuse_onloaded_on(ctx.device)
        ctx.log(f"int8: quantizing a block at a time from the memory-mapped input (offload; threshold "
                f"{cfg.threshold}, rest in {cfg.dtype})")
        names, experts = quantize_onloaded(model, cfg.threshold, skip, dtype, ctx)
    else:
        experts = moe.unfuse(model)  # fused MoE experts -> per-expert linears (same logits), quantized one by one
        ctx.log(f"int8: quantizing {len(core.quantizable_linears(model, skip))} linears on {ctx.device} "
                f"(threshold {cfg.threshold}, rest in {cfg.dtype})")
        names = core.quantize_model(model, cfg.threshold, skip, ctx.device)
        core.cast_unquantized(model, dtype, ctx.device)
    bf16_bytes = sum(2 * sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names)
    model.config.dtype = dtype
    model.config.quantization_config = core.bnb_quantization_config(cfg.threshold, skip)
    model.is_loaded_in_8bit = True  # as transformers marks its own bnb 8-bit models
    model.eval()

    int8_bytes = sum(core.state_bytes(model.get_submodule(n)) for n in names)
    output_bytes = core.state_bytes(model)
    quantized = sum(model.get_submodule(n).weight.numel() for n in names)
    prefix = _blocks(model)[0] + "."
    in_blocks = sum(model.get_submodule(n).weight.numel() for n in names if n.startswith(prefix))
    total = sum(p.numel() for p in model.parameters())
    stats = {
        "threshold": cfg.threshold,
        "dtype": cfg.dtype,
        "skip": skip,
        "quantized_linears": len(names),
        "quantized_params": quantized,
        "quantized_fraction": quantized_fraction(quantized, total, in_blocks, block_params),
        "linear_bytes": {"int8": int8_bytes, "bf16": bf16_bytes, "ratio": round(int8_bytes / bf16_bytes, 4)},
        "model_bytes": {"input": input_bytes, "output": output_bytes, "ratio": round(output_bytes / input_bytes, 4)},
        "outliers": None,
    }
    if experts:
        stats["experts"] = {"experts": experts}

    blocks = calibration_tokens(tokenizer, cfg, ctx)
    if blocks is None:
        ctx.log("int8: no data.calibration (or calibration_samples: 0); outlier statistics skipped")
        return model, stats
    linears = {n: model.get_submodule(n) for n in names}
    with torch.no_grad(), core.OutlierCounter(linears, cfg.threshold) as counter:
        if onloaded:  # every window through one block at a time: each block's linears see one window per call
            from compress import onload

            for _ in onload.logits_by_block(model, [ids[None] for ids in blocks], ctx.device):
                pass
        else:
            for ids in ctx.progress(blocks, desc="int8 outliers", total=len(blocks)):
                # one window per forward: per-call counts are per window; no KV cache (nothing decodes after it)
                model(input_ids=ids[None].to(ctx.device), use_cache=False)
    stats["outliers"] = {
        "source": ctx.data["calibration"], "windows": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
        **counter.stats(),
    }
    ctx.log(f"int8: {stats['outliers']['total_outlier_dims']} outlier input dims over {len(names)} linears")
    return model, stats


def _refuse_onloaded_on(device) -> None:
    """Onloaded int8 runs on a CPU only: a decoder block moved between devices does not carry its Linear8bitLt
    modules' int8 state along (bitsandbytes moves it in Linear8bitLt.to only, which a parent's .to() skips)."""
    if torch.device(device).type != "cpu":
        raise CompressError("int8 with offload (the model on the host, a block at a time) runs on a CPU only; on "
                            f"{device}, set offload: never with a model that fits the device, or quantize with gptq")


def quantize_onloaded(model, threshold: float, skip: list[str], dtype: torch.dtype, ctx: Context) -> tuple[list, int]:
    """LLM.int8() of a model on the host that may exceed RAM: block by block, its fused experts unfused, its
    linears quantized from the memory-mapped input, the rest cast to `dtype`, the result written to the stage's
    scratch folder and held as views of it (onload.spill), the input's pages handed back; then what lies outside
    the blocks. Resident memory holds about one block; the tensors are quantize_model's + cast_unquantized's.
    Returns (quantized module names, experts unfused)."""
    from pathlib import Path

    from compress import measure, onload

    bnb = core.require_bitsandbytes()
    core.quiet_cast_warning()
    is_int8 = lambda m: isinstance(m, bnb.nn.Linear8bitLt)  # noqa: E731
    fam = families.find(model)
    layers_name, layers = _blocks(model)
    scratch = Path(ctx.work_dir)
    names, experts = [], 0
    for i in ctx.progress(range(len(layers)), desc="int8 blocks", total=len(layers), unit="block"):
        block, prefix = layers[i], f"{layers_name}.{i}."
        originals = list(block.state_dict().values())
        experts += moe.unfuse_block(block, fam) if fam is not None and fam.is_moe() else 0
        for n, linear in core.quantizable_linears(block, None):
            if not core.is_skipped(prefix + n, skip):
                block.set_submodule(n, core.quantize_linear(linear, threshold, ctx.device))
                names.append(prefix + n)
        onload.cast_tensors(block.modules(), dtype, buffers=False, keep=is_int8)
        onload.spill(list(block.modules()), scratch / f"int8-{i:05d}.safetensors", parameters=True)
        _rebind_codes(block, is_int8)
        measure.page_out_mapped(originals)  # the input's pages this block read
        del originals
        measure.release_free_heap()
    for n, linear in core.quantizable_linears(model, skip):  # outside the blocks: a head not skipped
        if not n.startswith(layers_name + "."):
            model.set_submodule(n, core.quantize_linear(linear, threshold, ctx.device))
            names.append(n)
    onload.cast_outside_spilled(model, layers_name, dtype, scratch, buffers=False, keep=is_int8)
    _rebind_codes(model, is_int8)
    return names, experts


def _rebind_codes(module, is_int8) -> None:
    """Int8Params keeps its codes twice, as .data and as .CB (what forward reads); after spill replaced .data
    by the file's view, point .CB at it too, so the in-memory codes are let go."""
    for m in module.modules():
        if is_int8(m) and m.weight.CB is not None:
            m.weight.CB = m.weight.data


def _blocks(model):
    """(dotted name, block list) of the model: its family's, else the generic repeated-block finder."""
    from compress.modeling import decoder_layers_with_name

    fam = families.find(model)
    if fam is not None and fam.get(model, fam.layers) is not None:
        return fam.layers, fam.layer_list(model)
    return decoder_layers_with_name(model)


def coverage(model, skip: list[str]) -> tuple[int, int]:
    """(linear-like parameters of the blocks, those the int8 stage will quantize): linears and experts (as the
    per-expert linears compress/moe.py makes of them), counted before anything changes."""
    fam = families.find(model)
    layers_name, layers = _blocks(model)
    total = planned = 0
    for i, block in enumerate(layers):
        total += moe.linear_like_params(block)
        planned += sum(fin * fout for n, (fin, fout) in moe.planned_linears(block, fam).items()
                       if not core.is_skipped(f"{layers_name}.{i}.{n}", skip))
    return total, planned


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)

# Importing bitsandbytes 0.50 (its native library, triton stubs) into a process that already runs a model:
# +43.5 MiB RSS, measured twice on torch 2.13 CPU. Host memory only: nothing on a CUDA device.
BNB_IMPORT_BYTES = 44 * memory.MiB


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: each linear quantized from an fp16 copy (bitsandbytes), the rest cast to
    `dtype`, then `calibration_samples` forward passes of seq_len tokens for outlier statistics."""
    memory.require_plain(state, NAME)
    shape = state.shape
    out_dtype = memory.dtype_name(cfg.dtype)
    out = dataclasses.replace(state, format="bnb-int8", dtype=out_dtype, skip=tuple(cfg.skip))
    lin = out.quantized_linears()
    i_max, o_max = max(((i, o) for _, i, o in lin), key=lambda t: t[0] * t[1], default=(0, 0))
    if where.onload:
        return _onloaded(cfg, state, out, where, lin, i_max * o_max)
    terms = {
        "int8 weights + row scales": shape.layers * sum(i * o + 4 * o for _, i, o in lin),
        "fp16 copy of one linear + quantize temporaries": i_max * o_max * (2 + 2 + 1),
    }
    if out_dtype != state.dtype:
        terms[f"unquantized weights in {out_dtype}"] = out.float_numel() * memory.DTYPE_BYTES[out_dtype]
    if where.kind == "cpu" and "bitsandbytes" not in where.loaded:
        terms["bitsandbytes library (first import)"] = BNB_IMPORT_BYTES
    if cfg.calibration_samples > 0 and where.data.get("calibration"):
        seq, a = cfg.seq_len, memory.DTYPE_BYTES[out_dtype]
        terms["calibration text"] = memory.data_bytes(shape, [(where.data["calibration"], "train")])
        terms["outlier pass: logits"] = seq * shape.vocab * a
        terms["outlier pass: layer + int8 matmul"] = memory.inference_layer_bytes(shape, a, 1, seq) + seq * (3 * i_max + 4 * o_max)
    return memory.Parts(terms, state.weights_bytes(), out, loads=("bitsandbytes",))


def _onloaded(cfg: Config, state: memory.ModelState, out: memory.ModelState, where: memory.Where, lin: list,
              largest: int) -> memory.Parts:
    """quantize_onloaded's memory, in phases: a block (its mapped input pages, its int8 codes until spilled, the
    largest linear's fp16 copy), the embedding cast (a slab of the input, the whole cast until spilled), the
    outlier pass through onload.logits_by_block (every window's hidden states twice, one block's forward, one
    window's logits). Nothing of the input or output stays resident."""
    _refuse_onloaded_on(where.kind)
    s = state.shape
    a = memory.DTYPE_BYTES[out.dtype]
    lib = {"bitsandbytes library (first import)": BNB_IMPORT_BYTES} if "bitsandbytes" not in where.loaded else {}
    phases = {
        "block": {**lib, "one block's weights paged in": memory.block_bytes(state),
                  "int8 block (then spilled to disk)": sum(i * o + 4 * o for _, i, o in lin),
                  "fp16 copy of one linear + quantize temporaries": largest * (2 + 2 + 1)},
        "outside": {**lib, **memory.spilled_embedding_cast(state, out)},
    }
    if cfg.calibration_samples > 0 and where.data.get("calibration"):
        seq, n = cfg.seq_len, cfg.calibration_samples
        phases["outlier pass"] = {
            **lib, "calibration text": memory.data_bytes(s, [(where.data["calibration"], "train")]),
            "hidden states of every window, in and out": 2 * n * seq * s.hidden * a,
            "one block's pages + layer forward": memory.block_bytes(out) + memory.inference_layer_bytes(s, a, 1, seq),
            "logits of one window": seq * s.vocab * a}
    parts = memory.phased(phases, state, out)
    parts.on_device_input = 0
    parts.loads = ("bitsandbytes",)
    return parts


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    """No outlier statistics when the stage does not fit (they are for the manifest only)."""
    if cfg.calibration_samples > 0:
        return [memory.Tip("calibration_samples: 0 (no outlier statistics)", {"calibration_samples": 0})]
    return []
