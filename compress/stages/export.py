"""Stage `export`: write the incoming model in the format a serving runtime reads, and check it in that runtime.

    - export: {format: gguf, type: q4_0, from: gptq-w4g128}   # llama.cpp / Ollama: GPTQ's own codes, not rounded again
    - export: {format: gguf, type: f16}                       # from a plain stage (cast, prune, distill)
    - export: {format: compressed-tensors, from: gptq}        # vLLM's default quantized path

GGUF (compress/export/writer.py, through the `gguf` package): one file with weights, tokenizer and chat
template, and a Modelfile beside it, so `llama-cli -m model.gguf` and `ollama create NAME -f Modelfile` serve it
at once. From a plain model the weights are rounded to nearest as llama.cpp's own quantizer does; from a gptq
stage whose grid matches (4-bit symmetric -> q4_0, 4-bit asymmetric -> q4_1, 8-bit symmetric -> q8_0, any
group size that fills whole 32-weight blocks) its codes and fp16 scales are re-encoded exactly; any other grid is
refused before work in one line naming the gptq settings that match. `type: auto` picks the matching type for a
gptq input and f16 otherwise.

The runtime checks its own file (`check: true`, with the optional extra `pip install -e ".[deploy]"`, whose
llama-cpp-python compiles llama.cpp from source: about 9 minutes on 2 cores): the .gguf is loaded in llama.cpp,
and under the pipeline's eval protocol (the same windows as every stage) the stage records perplexity computed
from llama.cpp's logits, KL divergence to the base model and to the input model, top-1 agreement with the base,
and decode tokens/s at batch 1. Without llama-cpp-python the manifest says in one line what was not checked.

compressed-tensors (compress/export/compressed_tensors.py): a checkpoint folder in the pack-quantized layout
with the `quantization_config` vLLM reads, converted from a gptq stage exactly (codes and scales carried over);
checked by decompressing it with the compressed-tensors library itself and comparing logits with our loader
(tolerance 1e-3 relative).

The stage writes its files into its own folder; the model passes through unchanged, so a later stage with
`from: export` starts from the export's input. Not supported: GGUF of families other than the Llama family,
k-quants, GGUF from int8 inputs, compressed-tensors from anything but a gptq stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compress import memory
from compress.errors import CompressError

NAME = "export"
WRITES_CHECKPOINT = False  # it writes its own files (ctx.out_dir); the model passes through unchanged
FORMATS = ("gguf", "compressed-tensors")
GGUF_TYPES = ("auto", "f16", "bf16", "f32", "q8_0", "q4_0", "q4_1")
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}  # bits per weight on disk


@dataclass
class Config:
    format: str = "gguf"             # gguf (llama.cpp, Ollama) | compressed-tensors (vLLM)
    type: str = "auto"               # gguf weights: auto (the gptq input's own grid, else f16) | f16 | bf16 | f32 | q8_0 | q4_0 | q4_1
    check: bool = True               # load the file in its runtime and measure it under the pipeline's eval protocol
    threads: int | None = None       # llama.cpp threads for the check (default: torch's)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise CompressError(f"export.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.type not in GGUF_TYPES:
            raise CompressError(f"export.type must be one of {', '.join(GGUF_TYPES)}, got {self.type!r}")
        if self.format != "gguf" and self.type != "auto":
            raise CompressError("export.type applies to format: gguf only; remove it")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise CompressError(f"export.threads must be an integer >= 1, got {self.threads!r}")


def gguf_type(cfg: Config, qc: dict | None) -> str:
    """The GGUF weight type: the configured one, or for `auto` the type that holds a gptq input's grid exactly."""
    if cfg.type != "auto":
        return cfg.type
    if not qc:
        return "f16"
    from compress.export import ggml

    for candidate in ("q4_0", "q4_1", "q8_0"):
        if ggml.gptq_mismatch(candidate, qc.get("bits"), qc.get("sym", True), qc.get("group_size"),
                              qc.get("desc_act", False), qc.get("static_groups", False)) is None:
            return candidate
    raise CompressError(f"export: no GGUF type holds this gptq grid exactly ({ {k: qc.get(k) for k in ('bits', 'sym', 'group_size')} }); "
                        "gptq with bits 4 (sym or not) or 8 (sym) and a group size that is a multiple of 32 does")


def _qc(model) -> dict | None:
    qc = getattr(model.config, "quantization_config", None)
    return dict(qc if isinstance(qc, dict) else qc.to_dict()) if qc else None


def run(model, tokenizer, cfg: Config, ctx):
    """Write the file(s) into ctx.out_dir and check them; return the model unchanged and what was written."""
    if ctx.out_dir is None:
        raise CompressError("export writes files: run it in a pipeline (it needs the stage's folder)")
    t0 = time.perf_counter()
    if cfg.format == "gguf":
        stats = _gguf(model, tokenizer, cfg, ctx)
    else:
        stats = _compressed_tensors(model, tokenizer, ctx)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return model, stats


def _gguf(model, tokenizer, cfg: Config, ctx) -> dict:
    from compress.export import llamacpp
    from compress.export.writer import write_gguf

    qc = _qc(model)
    if qc and qc.get("quant_method") != "gptq":
        raise CompressError(f"export to gguf takes a plain or gptq model, not a {qc.get('quant_method')} one; "
                            "use `from:` a plain or gptq stage")
    type_ = gguf_type(cfg, qc)
    path = ctx.out_dir / "model.gguf"
    ctx.log(f"export: writing {path.name} ({type_})")
    written = write_gguf(model, tokenizer, path, type=type_)
    (ctx.out_dir / "Modelfile").write_text("FROM ./model.gguf\n")  # `ollama create NAME -f Modelfile`
    stats = {"format": f"gguf-{type_}", "file": path.name, "written": written,
             "size": {"disk_bytes": path.stat().st_size}}
    if not cfg.check:
        stats["runtime_check"] = "not checked: export.check is false"
    elif not llamacpp.available():
        stats["runtime_check"] = ("not checked: llama-cpp-python is not installed (pip install -e \".[deploy]\" builds "
                                  "llama.cpp); the file was written but not loaded")
    elif ctx.eval is None or not ctx.eval.perplexity:
        stats["runtime_check"] = "loaded only: the pipeline has no eval: perplexity sources to score it on"
        with llamacpp.GGUFModel(path, n_ctx=64, n_threads=cfg.threads):
            pass
    else:
        stats.update(_llamacpp_check(model, tokenizer, path, cfg, ctx))
    return stats


def _llamacpp_check(model, tokenizer, path, cfg: Config, ctx) -> dict:
    """Perplexity from llama.cpp's logits on the eval protocol's windows, KL to the base and to the input model,
    top-1 agreement with the base, decode tokens/s at batch 1."""
    from compress.export import llamacpp

    ev = ctx.eval
    base = ctx.load_model("base")[0]
    accuracy = {}
    prompt = llamacpp.decode_prompt(tokenizer)
    n_ctx = max(ev.seq_len, len(prompt) + ev.decode_tokens)
    with llamacpp.GGUFModel(path, n_ctx=n_ctx, n_threads=cfg.threads) as runtime:
        for spec in ev.perplexity:
            ids, scored, protocol = llamacpp.perplexity_windows(tokenizer, spec, ev.seq_len, ev.max_tokens, ev.bos)
            res = llamacpp.compare(ids, scored, llamacpp.torch_logits(base),
                                   {"llama.cpp": runtime.logits, "input": llamacpp.torch_logits(model)},
                                   progress=lambda r: ctx.progress(r, desc=f"llama.cpp {spec}", unit="window"))
            vs_input = llamacpp.compare(ids, scored, llamacpp.torch_logits(model), {"llama.cpp": runtime.logits})
            r = res["llama.cpp"]
            accuracy[spec] = {"value": r["perplexity"], "kl": r["kld"], "top1": r["top1"],
                              "kl_to_input": vs_input["llama.cpp"]["kld"],
                              "protocol": {**protocol, "n_tokens": r["n_tokens"], "reference": "base",
                                           "runtime": "llama.cpp", "device": "cpu"}}
        decode = runtime.decode_speed(prompt, ev.decode_tokens)
    return {"runtime_check": "loaded in llama.cpp", "accuracy": {"perplexity": accuracy},
            "speed": {"decode_tokens_per_s": decode, "eval_tokens_per_s": None,
                      "protocol": {"decode_tokens": ev.decode_tokens, "decode_batch": 1, "runtime": "llama.cpp",
                                   "threads": cfg.threads or torch.get_num_threads(), "device": "cpu"}}}


def _compressed_tensors(model, tokenizer, ctx) -> dict:
    from compress import checkpoint
    from compress.export import compressed_tensors as ct

    qc = _qc(model)
    if not qc or qc.get("quant_method") != "gptq":
        raise CompressError("export to compressed-tensors takes a gptq stage's model; use `from:` a gptq stage")
    dest = ctx.out_dir  # the stage folder is the checkpoint: `vllm serve <folder>`
    info = ct.export(model, dest, tokenizer)
    stats = {"format": "compressed-tensors", "written": info,
             "size": {"disk_bytes": sum(f.stat().st_size for f in dest.glob("*.safetensors"))}}
    try:
        decompressed = ct.load_with_library(dest, dtype=torch.float32)[0]
    except CompressError as e:  # the library is an optional extra
        stats["runtime_check"] = f"not checked: {e}"
        return stats
    ids = checkpoint.probe_input(model)
    reference = model.float() if next(model.parameters()).dtype != torch.float32 else model
    err = checkpoint.max_rel_error(checkpoint.outputs(reference, ids), checkpoint.outputs(decompressed, ids))
    if not err <= 1e-3:
        raise CompressError(f"export: compressed-tensors' own decompression differs from our loader by {err:.3g} "
                            "(relative logits; tolerance 1e-3): the export is not faithful")
    stats["runtime_check"] = "decompressed by compressed-tensors"
    stats["decompressed_max_rel_error"] = err
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: the writer converts one tensor at a time (the largest, in fp32, and its encoding);
    the llama.cpp check maps the file and keeps one window's logits, and the base model is loaded for KL (the
    input model is resident already)."""
    shape = state.shape
    if cfg.format == "compressed-tensors" and state.format != "gptq":
        raise CompressError("export to compressed-tensors takes a gptq stage's model; use `from:` a gptq stage")
    if cfg.format == "gguf" and cfg.type in ("q4_0", "q4_1", "q8_0") and state.format == "gptq":
        bits = 8 if cfg.type == "q8_0" else 4
        if state.bits != bits or state.group_size not in (-1,) and state.group_size % 32:
            raise CompressError(f"export type {cfg.type} needs a gptq stage with bits {bits} and a group size that is a "
                                f"multiple of 32 (or -1); this input has bits {state.bits}, group_size {state.group_size}")
    terms = {"one tensor converted (fp32 and its encoding)": shape.largest_tensor * (4 + 4)}
    if cfg.format == "gguf":
        bits = GGUF_BITS.get(cfg.type, 4.5 if state.format == "gptq" else 16)
        terms["llama.cpp: the file, memory-mapped"] = int(shape.params * bits / 8) if cfg.check else 0
        terms["llama.cpp: one window's logits"] = 512 * shape.vocab * 4 * 3 if cfg.check else 0
        base = where.states.get("base")
        terms["base model (for KL)"] = base.weights_bytes() if cfg.check and base is not None else 0
    else:
        terms["decompressed model (float32)"] = (shape.params + shape.float_buffers) * 4
    return memory.Parts({k: v for k, v in terms.items() if v}, state.weights_bytes(), state)
