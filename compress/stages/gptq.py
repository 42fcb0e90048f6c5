"""Stage `gptq`: GPTQ (or RTN) weight-only quantization of every linear inside the decoder blocks, GPTQ v1 format.

Paper: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
https://arxiv.org/abs/2210.17323. The core (Hessian, Cholesky inverse, lazy block updates, packing) is
compress/algorithms/gptq.py; this module is the glue that walks the model:

    - gptq: {bits: 4, group_size: 128, act_order: false, nsamples: 128, seq_len: 512}
    - gptq: {method: rtn, bits: 4, group_size: 128}        # round-to-nearest baseline, no calibration

Layer by layer: the calibration tokens run through the embeddings once (a hook on block 0 records its inputs and
stops the forward), then each block is quantized with inputs that are the outputs of the already quantized
previous block, so memory holds one block plus the activations. Inside a block "true sequential" order holds:
linears reading the same tensor form a group (Llama: q/k/v, o, gate/up, down), each group sees inputs produced by
the already quantized earlier groups, and the linears of a group share one Hessian and are quantized as one stacked
matrix. Calibration text comes from the pipeline's `data.calibration` (or this stage's `calibration:`), as
`nsamples` random windows of `seq_len` tokens from its train split, seeded by the pipeline seed.

With true_sequential (the default) each linear is computed once per calibration token: the passes of later
groups replay what is already final (recorded outputs; a submodule that returns its last linear's output, as
Llama's self_attn and mlp do, is that linear applied to the input its own pass kept, so attention runs once per
block). On CPU a memory-mapped input
(how every stage input is loaded) gives back each finished block's replaced weights (measure.page_out_mapped), so
RSS holds the input less the finished blocks, plus their packed form and one block's working set.

Mixture of experts (Mixtral, Qwen3-MoE): each block's fused experts become per-expert linears first
(compress/moe.py, same logits), and each expert is quantized on its own: its Hessian comes from the calibration
tokens the router sent to it; all experts' gate/up in one pass, then all downs in the next. An expert that got no
calibration token gets RTN codes (stats.experts.rtn_fallback counts them). The router stays unquantized, in
`dtype`. The checkpoint holds the experts per expert under the family's own names (Qwen3-MoE
mlp.experts.E.gate_proj/up_proj/down_proj, Mixtral block_sparse_moe.experts.E.w1/w3/w2), the layout GPTQModel
and vLLM read for these models.

The returned model holds QuantLinear modules (packed qweight/qzeros/scales/g_idx), everything else in `dtype`
(float16 by default, as GPTQ checkpoints are; bfloat16 for families that overflow float16, Gemma), and
`config.quantization_config` set for a v1 checkpoint that transformers (+optimum+gptqmodel), GPTQModel and vLLM
load. Stats say which share of the parameters, and of the blocks' linear weights, is quantized; a run that would
quantize less than half of the blocks' linear weights (say, everything skipped) is refused before any work.

Not supported: GPTQ v2 format, linears whose in or out features times bits is not a multiple of 32 (refused
before any work: skip them), encoder-decoder models, quantizing lm_head, embeddings or MoE routers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.algorithms.gptq import (
    BITS, GPTQ, QuantLinear, QuantResult, name_matches, quantization_config, rtn, storage_bits,
)
from compress import families, measure, memory, moe, onload
from compress.errors import CompressError
from compress.modeling import (
    MIN_QUANTIZED_FRACTION, StopForward, call_block, capture_block_inputs, decoder_layers_with_name, linear_weight,
    linears, quantized_fraction, set_linear_weight, set_submodule, trace_block,
)

NAME = "gptq"
ONLOAD = True  # the input can stay on the host, one block at a time on the device (pipeline offload)
METHODS = ("gptq", "rtn")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Config:
    method: str = "gptq"            # gptq (Hessian-aware, needs calibration) or rtn (round to nearest, the baseline)
    bits: int = 4                   # 2, 3, 4 or 8 bits per weight
    group_size: int = 128           # input columns sharing one scale/zero; -1 = one per output channel
    sym: bool = True                # symmetric grid (zero fixed at the middle); false = asymmetric per-group zero
    act_order: bool = False         # desc_act: quantize columns by decreasing Hessian diagonal (better at 2-3 bits)
    act_group_aware: bool = True    # GAR: important groups first, columns by importance inside each; free at inference (ignored with act_order)
    static_groups: bool = False     # with act_order: groups fixed on the original column order (g_idx monotone)
    true_sequential: bool = True    # each linear group sees inputs from the already quantized earlier groups
    damp_percent: float = 0.05      # dampening added to diag(H), a fraction of its mean (doubled on failure); 0.01 (the paper's) was worse here
    block_size: int = 128           # columns per lazy batch update; affects speed only
    nsamples: int = 128             # calibration sequences (the paper uses 128)
    seq_len: int = 512              # tokens per calibration sequence (paper: 2048; 512 keeps CPU runs in minutes)
    batch_size: int = 8             # sequences per forward through a block (memory vs speed)
    calibration: str | None = None  # text source for calibration; default: the pipeline's data.calibration
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  # linears kept in full precision (name, suffix or regex)
    dtype: str = "auto"             # what is not quantized (embeddings, norms, lm_head, routers): auto = float16, bfloat16 where it overflows (Gemma)

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressError(f"gptq: method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in BITS:
            raise CompressError(f"gptq: bits must be one of {BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise CompressError(f"gptq: group_size must be -1 (per output channel) or >= 1, got {self.group_size}")
        if self.static_groups and not self.act_order:
            raise CompressError("gptq: static_groups only matters with act_order: true; remove it or set act_order")
        if not 0 < self.damp_percent < 1:
            raise CompressError(f"gptq: damp_percent must be in (0, 1), got {self.damp_percent}")
        for name in ("block_size", "nsamples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise CompressError(f"gptq: {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise CompressError(f"gptq: dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.skip, list) or not all(isinstance(s, str) for s in self.skip):
            raise CompressError(f"gptq: skip must be a list of module names, got {self.skip!r}")


def run(model, tokenizer, cfg: Config, ctx):
    """Quantize `model` in place; return it (QuantLinear modules, quantization_config set) and stats."""
    t0 = time.perf_counter()
    calib_stats = None
    tokens = None
    if cfg.method == "gptq":
        tokens, calib_stats = calibration_tokens(tokenizer, cfg, ctx)
    stats = quantize_model(model, cfg, ctx, tokens)
    if calib_stats is not None:
        stats["calibration"] = calib_stats
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return model, stats


def calibration_tokens(tokenizer, cfg: Config, ctx) -> tuple[torch.Tensor, dict]:
    """(token ids [nsamples, seq_len], fingerprint stats) from the configured calibration source."""
    spec = cfg.calibration or (ctx.data or {}).get("calibration")
    if not spec:
        raise CompressError("gptq needs calibration text: set data.calibration in the pipeline (e.g. zoo:austen) "
                            "or calibration: in the stage, or use method: rtn")
    from compress import data

    tokens = data.calibration_blocks(tokenizer, spec, cfg.nsamples, cfg.seq_len, ctx.seed)
    return tokens, calibration_fingerprint(tokens, spec, ctx.seed)


def calibration_fingerprint(tokens: torch.Tensor, source: str | None, seed: int | None) -> dict:
    """What the manifest records about the calibration set: source, shape, seed and a hash of the token ids."""
    digest = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"source": source, "nsamples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "seed": seed, "tokens_sha256": digest}


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def _linear_groups(shape: memory.ModelShape) -> list[list[tuple]]:
    """Linears of a block that read the same input (GPTQ shares one Hessian per group and stacks them):
    Llama: [q, k, v], [o], [gate, up], [down]; otherwise every linear alone."""
    by_name = {n.split(".")[-1]: l for l in shape.linears for n in [l[0]]}
    llama = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    if all(n in by_name for g in llama for n in g):
        return [[by_name[n] for n in g] for g in llama]
    return [[l] for l in shape.linears]


def _expert_solvers(lin: list, hidden: int) -> int:
    """Bytes of the GPTQ solvers alive in one MoE step (every expert's H [C, C] and stacked W [R, C] in fp32, one
    step for all gate/up, one for all down): the larger step. 0 without experts."""
    experts: dict[str, list] = {}
    for name, i, o in lin:
        if ".experts." in f".{name}":
            experts.setdefault(name.rsplit(".", 1)[0], []).append((i, o))
    gate_up = sum(hidden ** 2 + sum(o for i, o in ls if i == hidden) * hidden for ls in experts.values())
    down = sum(i * i + o * i for ls in experts.values() for i, o in ls if i != hidden)
    return 4 * max(gate_up, down) if experts else 0


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: calibration hidden states in fp32, one block at a time in fp32, true-sequential
    passes that replay recorded sub-module outputs, one GPTQ solver per linear group; everything not quantized
    ends in `dtype` (float16 by default). On CPU the input is memory-mapped (a stage's input is loaded from its
    safetensors checkpoint) and each finished block's replaced weights are paged out (page_out_mapped), so the
    input's resident bytes fall block by block: the peak is then the first block's, not the last one's."""
    memory.require_plain(state, NAME)
    shape = state.shape
    bits, g = cfg.bits, cfg.group_size
    n, seq, batch = cfg.nsamples, cfg.seq_len, cfg.batch_size
    out_dtype = memory.dtype_name(cfg.dtype if cfg.dtype != "auto" else families.half_dtype(shape.config))
    skip = tuple(cfg.skip)
    out = dataclasses.replace(state, format="gptq", bits=bits, group_size=g, dtype=out_dtype, skip=skip)
    lin = out.quantized_linears()
    h = shape.hidden
    groups = _linear_groups(shape)
    results = sum(i * o for _, i, o in lin) * 5                     # one block's Q (fp32) + codes (int8)
    packed = memory.gptq_linear_bytes(lin, shape.layers, bits, g)          # accumulates: all of it by the last block
    cast = out.float_numel() * memory.DTYPE_BYTES[out_dtype] if out_dtype != state.dtype else 0  # at the very end
    # the block computed in fp32 (onloaded: _onloaded counts it, as the block in fp32)
    block_copy = shape.layer_params * 4 if state.dtype != "float32" and not where.onload else 0
    # replaced weights of every block but the last, paged out by the last block (CPU: memory-mapped input)
    per_block = sum(i * o for _, i, o in lin) * memory.DTYPE_BYTES.get(state.dtype, 4) if where.kind == "cpu" else 0
    released = -per_block * (shape.layers - 1)
    first_packed = packed // max(shape.layers, 1)
    if cfg.method == "rtn":
        work = {"RTN transients (largest linear)": max((i * o for _, i, o in lin), default=0) * 4 * 4,  # W, codes, Q, error
                "block results (Q fp32 + codes)": results}
        if block_copy:
            work["fp32 copy of one block"] = block_copy
        if where.onload:
            return _onloaded({}, work, first_packed, cast, out_dtype, state, out, where)
        phases = {"first block": {**work, "packed output (one block)": first_packed},
                  "last block": {**work, "packed output": packed, "input blocks paged out": released},
                  "end": {"packed output": packed, f"unquantized weights in {out_dtype}": cast,
                          "input blocks paged out": released - per_block}}
        return memory.phased(phases, state, out)
    # GPTQ. Phases, each with what is alive in it (the input model stays resident, less what is paged out):
    #   start: the calibration text is read and tokenized, block 0's inputs captured;
    #   first / last block: block inputs + outputs, the replayed sub-module outputs of the block, the solver of
    #     its largest group (or, without replay, a full block forward), its results, the packed output so far;
    #   end: the packed output, everything unquantized cast to `dtype`.
    tokens = n * seq
    spec = cfg.calibration or where.data.get("calibration")
    io = 2 * tokens * h * 4
    replay = 0
    if len(groups) == 4 and cfg.true_sequential:
        # what the passes keep, fp32: the inputs of o and down, whose modules (self_attn, mlp) return their output
        # unchanged, so they replay as one matmul (_Tail); the stage checks the free memory for the recorded
        # outputs the general scheme would keep (q,k,v + attention, then gate,up)
        need = sum(o for grp in groups[:-1] for _, _, o in grp) * tokens * 4
        if where.device_bytes is None or need <= where.device_bytes // 4:
            replay = tokens * 4 * (groups[1][0][1] + groups[3][0][1])
    # stacked W [R, C] and H [C, C]; quantize(): W clone, W^T, Q^T, codes^T, the error terms ~ 6 R*C; the
    # accumulated H and at most two more (H damped in place, then L, its inverse, Hinv) ~ 3 C^2
    # (compress/algorithms/gptq.py)
    solver = max(((6 * sum(o for _, _, o in grp) * grp[0][1] + 3 * grp[0][1] ** 2) * 4 for grp in groups), default=0)
    experts = _expert_solvers(lin, h)
    forward = memory.inference_layer_bytes(shape, 4, batch, seq)
    main = {"block inputs + outputs (fp32)": io}
    if replay:
        main["replayed sub-module inputs (fp32)"] = replay
        main["GPTQ solver or batch forward (fp32), the larger"] = max(solver, forward)
    else:
        main["GPTQ solver or block forward (fp32), the larger"] = max(solver, forward)
    main["block results (Q fp32 + codes)"] = results
    if experts:
        main["expert Hessians + weights (every expert of one step)"] = experts
    if block_copy:
        main["fp32 copy of one block"] = block_copy
    start = {"calibration text": memory.data_bytes(shape, [(spec, "train")]) if spec else 0,
             "calibration tokens": tokens * 8, "block 0 inputs (fp32)": tokens * h * 4}
    if where.onload:
        return _onloaded(start, main, first_packed, cast, out_dtype, state, out, where)
    phases = {
        "start": start,
        "first block": {**main, "packed output (one block)": first_packed},
        "last block": {**main, "packed output": packed, "input blocks paged out": released},
        "end": {"packed output": packed, f"unquantized weights in {out_dtype}": cast,
                "input blocks paged out": released - per_block},
    }
    return memory.phased(phases, state, out)


def _onloaded(start: dict, main: dict, block_packed: int, cast: int, out_dtype: str, state: memory.ModelState,
              out: memory.ModelState, where: memory.Where) -> memory.Parts:
    """GPTQ with the input on the host, memory-mapped, one block at a time on the device (offload). The device
    holds the embeddings while block 0's inputs are captured, then one block in fp32 and its working set; the
    host holds the block in transit and its packed form, which is then spilled to the stage's scratch folder
    (onload.spill), then the unquantized weights cast to `dtype` (a slab at a time from the mapped input). On a
    CPU host and device are one memory. RTN has no start phase (`start` empty): nothing is calibrated, the
    embeddings never go to the device."""
    shape = state.shape
    fp32_block = shape.layer_params * 4
    paged = memory.block_bytes(state)  # the mapped block's pages, read while it is moved or computed
    outer = shape.vocab * shape.hidden * state.act_bytes * (1 if shape.tied else 2)
    if where.kind == "cpu":
        block = {"one block's weights paged in": paged}
        if state.dtype != "float32":
            block["the block in fp32"] = fp32_block
        phases = {**({"start": start} if start else {}),
                  "block": {**main, **block, "packed block (then spilled to disk)": block_packed},
                  "end": {f"unquantized weights in {out_dtype}": cast,
                          "one slab of the cast": min(outer, measure.CAST_SLAB_BYTES)}}
        parts = memory.phased(phases, state, out)
        parts.on_device_input = 0
        return parts
    device = {**({"start": {**start, "embeddings and head on the device": outer}} if start else {}),
              "block": {**main, "the block in fp32": fp32_block}}
    peak = max(device, key=lambda k: sum(device[k].values()))
    host = {"one block in transit": paged, "packed block (then spilled to disk)": block_packed,
            f"unquantized weights in {out_dtype}": cast}
    notes = [f"onloaded: device peak in the {peak} phase; the host holds a block in transit and the cast weights"]
    return memory.Parts({k: v for k, v in device[peak].items() if v}, 0, out, notes, host=host)


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    """Smaller calibration work, or no calibration (RTN), when the stage does not fit."""
    if cfg.method != "gptq":
        return []
    tips = []
    if cfg.nsamples > 8:
        tips.append(memory.Tip(f"nsamples: {cfg.nsamples // 2} (fewer calibration samples)", {"nsamples": cfg.nsamples // 2}))
    if cfg.seq_len > 128:
        tips.append(memory.Tip(f"seq_len: {cfg.seq_len // 2} (shorter calibration samples)", {"seq_len": cfg.seq_len // 2}))
    if cfg.batch_size > 1:
        b = max(1, cfg.batch_size // 4)
        tips.append(memory.Tip(f"batch_size: {b} (sequences per block forward)", {"batch_size": b}))
    tips.append(memory.Tip("method: rtn (no calibration, lower accuracy)", {"method": "rtn"}))
    return tips


# ----------------------------------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, cfg: Config, ctx, tokens: torch.Tensor | None = None) -> dict:
    """Replace the linears of every decoder block by QuantLinear (GPTQ with `tokens` [n, T], or RTN); return stats."""
    if cfg.method == "rtn":  # linear by linear, small temporaries between kept codes: keep RSS to live bytes
        with measure.mmap_threshold():
            return _quantize_blocks(model, cfg, ctx, None)
    return _quantize_blocks(model, cfg, ctx, tokens)


def _quantize_blocks(model: nn.Module, cfg: Config, ctx, tokens: torch.Tensor | None) -> dict:
    """quantize_model's work, block by block."""
    if cfg.method == "gptq" and tokens is None:
        raise CompressError("gptq: method gptq needs calibration tokens")
    if getattr(getattr(model, "config", None), "quantization_config", None):
        raise CompressError("gptq: the input model is already quantized; quantize a float model (use from: base)")
    model.eval()
    fam = families.find(model)
    dtype_name = resolve_dtype(cfg, model)
    dtype = DTYPES[dtype_name]
    layers_name, layers = decoder_layers_with_name(model)
    device = torch.device(ctx.device)
    block_params = check_coverage(layers, layers_name, fam, cfg)  # before any work: refuse what would not quantize

    inputs = None
    if cfg.method == "gptq":
        batches = list(tokens.split(cfg.batch_size))
        # every block's own arguments: layer types give blocks different masks and rotary tables (Gemma, Qwen with
        # sliding windows); blocks of one type share the very tensors, moved to the device once (memo by identity)
        captured = capture_block_inputs(model, batches, device)
        memo: dict[int, torch.Tensor] = {}

        def block_args(i: int, b: int) -> tuple:
            rest, kw = captured[b]["args"][i]
            return _moved(rest, device, memo), _moved(kw, device, memo)

        inputs = [(x["hidden"].to(device=device, dtype=torch.float32), *block_args(0, b))  # per batch: (hidden
                  for b, x in enumerate(captured)]                                         # [B, T, d], args, kwargs)

    steps = None  # passes of a block, each a list of linear sets that share an input (see _steps)
    traced = None  # the linear names of the block the steps were traced on (MoE models mix dense blocks in)
    spans: dict[str, int] = {}  # submodule -> linears run by its end (which outputs are final after which group)
    tails: dict[str, tuple] = {}  # submodule -> (linear, position, length): its output is that linear's
    replay_ok = False  # whether recorded submodule outputs of one block fit in memory (set after the trace)
    layer_stats, skipped, quantized_bits, quantized_params = [], [], 0, 0
    order: list[str] = []  # linear names in block order, over all blocks
    sets_seen: list[list[str]] = []  # linear sets sharing an input, in order, over all blocks
    known_sets: set[tuple] = set()
    present: list[set] = []  # per block: its linears
    experts = {"experts": 0, "rtn_fallback": 0, "rtn_fallback_linears": 0}
    for i in ctx.progress(range(len(layers)), desc=f"{cfg.method} layers", total=len(layers), unit="layer"):
        t_layer = time.perf_counter()
        block = layers[i]
        home = next(block.parameters()).device
        originals = list(block.state_dict().values())  # the input's tensors, for page_out_mapped below
        experts["experts"] += moe.unfuse_block(block, fam)  # fused 3-D experts -> per-expert linears (same numbers)
        if inputs is not None:  # this block's own mask and rotary tables
            inputs = [(h, *block_args(i, b)) for b, (h, _, _) in enumerate(inputs)]
        block.to(device=device, dtype=torch.float32)
        names = list(linears(block))
        lists = moe.expert_lists(block)
        if steps is None or names != traced:
            steps, spans, tails = _steps(block, inputs, names, lists)
            traced = names
            if inputs is not None:
                replay_ok = _replay_fits(block, [[n for s in st for n in s if not _inside(n, lists)] for st in steps],
                                         tokens.numel(), device)
        present.append(set(names))
        order += [n for n in names if n not in order]
        for s in (s for st in steps for s in st if tuple(s) not in known_sets):
            known_sets.add(tuple(s))
            sets_seen.append(s)
        wanted = [n for n in names if not name_matches(f"{layers_name}.{i}.{n}", cfg.skip)]
        skipped += [f"{layers_name}.{i}.{n}" for n in names if n not in wanted]
        results: dict[str, QuantResult] = {}
        seen: dict[str, int] = {}  # linear -> calibration tokens that reached it (experts: those routed to it)
        if cfg.method == "rtn":
            for n in wanted:
                results[n] = rtn(linear_weight(block.get_submodule(n)), cfg.bits, cfg.group_size, cfg.sym)
        else:
            flat = [[n for s in st for n in s] for st in steps]
            if cfg.true_sequential:
                replay = {} if replay_ok else None  # submodule name -> its recorded output per batch
                for k, step in enumerate(steps):
                    sets = [m for m in ([n for n in s if n in wanted] for s in step) if m]
                    members = [n for s in sets for n in s]
                    if members:  # steps before k are final now: record their outputs once, replay them after
                        catch = {} if replay is None else _to_catch(tails, members, replay)
                        record = [] if replay is None else [
                            m for m in _to_record(flat, spans, k, replay) if not _inside(m, catch)]
                        results.update(_gptq_pass(block, sets, inputs, cfg, record, replay, catch, seen))
                        del catch  # its tails live on in replay, until the block is done
            else:  # one forward of the unquantized block feeds every Hessian
                sets = [m for m in ([n for n in s if n in wanted] for st in steps for s in st) if m]
                replay = None
                results.update(_gptq_pass(block, sets, inputs, cfg, [], None, None, seen))
            inputs = [(out, r, kw) for out, (_, r, kw) in zip(_run_block(block, inputs, replay=replay), inputs)]
            del replay

        lin_stats = {}
        for n, res in results.items():
            lin = block.get_submodule(n)
            q = QuantLinear.from_result(res, lin.bias, bias_dtype=dtype)
            set_submodule(block, n, q)
            quantized_bits += storage_bits(q)
            quantized_params += q.in_features * q.out_features
            lin_stats[n] = _linear_stats(res)
            if _inside(n, lists) and cfg.method == "gptq":
                lin_stats[n]["tokens"] = seen.get(n, 0)
                if not seen.get(n):  # no calibration token was routed to this expert: RTN codes
                    experts["rtn_fallback_linears"] += 1
        if cfg.method == "gptq":  # experts none of whose linears saw a token
            experts["rtn_fallback"] += sum(
                1 for p in lists for e, ex in enumerate(block.get_submodule(p))
                if not any(seen.get(f"{p}.{e}.{n}") for n in ex.names) and any(
                    f"{p}.{e}.{n}" in results for n in ex.names))
        _cast_unquantized(block, dtype)
        block.to(home)
        if ctx.onload and home.type == "cpu" and ctx.work_dir is not None:
            onload.spill([m for m in block.modules() if isinstance(m, QuantLinear)],
                         Path(ctx.work_dir) / f"packed-{i:05d}.safetensors")
        kept = {t.data_ptr() for t in block.state_dict().values()}
        # The replaced weights of a memory-mapped input (every stage input `compress run` loads on CPU) keep their
        # pages resident until the whole file is unmapped: hand them back.
        measure.page_out_mapped([t for t in originals if t.data_ptr() not in kept])
        del originals
        if device.type == "cpu":
            # Give this block's freed transients back to the OS. A heap left fragmented by earlier work in the
            # process (a training stage, an evaluation) otherwise serves each block from other, not yet resident
            # free chunks, and RSS climbs layer by layer (bench/results/memory.md). One call per block, ms each.
            measure.release_free_heap()
        seconds = time.perf_counter() - t_layer
        layer_stats.append({"index": i, "seconds": round(seconds, 3), "linears": lin_stats})
        if cfg.method == "gptq":
            err = sum(s.get("error", 0.0) for s in lin_stats.values())
            ctx.log(f"{cfg.method} layer {i + 1}/{len(layers)}: {seconds:.1f}s, output error {err:.4g}")
        else:
            ctx.log(f"{cfg.method} layer {i + 1}/{len(layers)}: {seconds:.1f}s")
    if experts["rtn_fallback"]:
        ctx.log(f"gptq: {experts['rtn_fallback']} of {experts['experts']} experts got no calibration token; "
                "their linears are RTN-quantized (more calibration samples route tokens to more experts)")

    _cast_unquantized(model, dtype)
    model.config.dtype = dtype
    # transformers+optimum read which linears of a block are quantized (one list for every block); linears
    # skipped in some blocks only are listed as exceptions in `dynamic` (GPTQModel, vLLM and our loader read it).
    # Names are written as the family's checkpoints spell them (Mixtral: block_sparse_moe.experts.E.w1).
    disk = fam.to_disk if fam is not None else (lambda n: n)
    quantized = [{n for n in layer["linears"]} for layer in layer_stats]
    anywhere = set.union(*quantized) if quantized else set()
    in_block = [[disk(n) for n in g if n in anywhere] for g in sets_seen]
    in_block = [g for g in in_block if g]
    partial = [disk(f"{layers_name}.{i}.{n}") for i, q in enumerate(quantized) for n in order
               if n in present[i] and n not in q and n in anywhere]
    if partial:
        ctx.log(f"gptq: {len(partial)} linears are skipped in some blocks only; GPTQModel and vLLM honour that "
                "(quantization_config.dynamic), transformers+optimum do not")
    model.config.quantization_config = quantization_config(
        bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.act_order,
        true_sequential=cfg.true_sequential, damp_percent=cfg.damp_percent, static_groups=cfg.static_groups,
        modules_in_block_to_quantize=in_block, block_name_to_quantize=layers_name,
        modules_to_not_convert=cfg.skip, skipped=partial,
    )
    total_params = sum(p.numel() for p in model.parameters()) + quantized_params
    total_bits = sum(p.numel() * p.element_size() * 8 for p in model.parameters()) + quantized_bits
    stats = {
        "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
        "act_order": cfg.act_order, "act_group_aware": cfg.act_group_aware and not cfg.act_order, "format": "gptq-v1",
        "dtype": dtype_name,
        "quantized_linears": sum(len(s["linears"]) for s in layer_stats), "skipped_linears": skipped,
        "quantized_params": quantized_params,
        "quantized_fraction": quantized_fraction(quantized_params, total_params, quantized_params, block_params),
        "bits_per_weight": round(quantized_bits / max(quantized_params, 1), 4),  # qweight+qzeros+scales+g_idx
        "bits_per_param_model": round(total_bits / max(total_params, 1), 4),     # incl. fp16 embeddings/norms
        "layers": layer_stats,
    }
    if experts["experts"]:
        stats["experts"] = experts if cfg.method == "gptq" else {"experts": experts["experts"]}
    if cfg.method == "gptq":
        errs = [s for layer in layer_stats for s in layer["linears"].values() if "error" in s]
        stats["error_total"] = sum(s["error"] for s in errs)
        stats["rel_error_mean"] = sum(s["rel_error"] for s in errs) / max(len(errs), 1)
        stats["sequential_groups"] = in_block
    return stats


def resolve_dtype(cfg: Config, model) -> str:
    """The dtype of everything not quantized: the configured one, or for `auto` float16 (what GPTQ kernels expect)
    unless the family overflows it (Gemma: bfloat16; compress/families.py `fp16_safe`)."""
    return cfg.dtype if cfg.dtype != "auto" else families.half_dtype(model)


def check_coverage(layers, layers_name: str, fam, cfg: Config) -> int:
    """Before any work: the linears this run will quantize (experts included, as per-expert linears) must hold at
    least half of the blocks' linear-like weights, and each must fit the GPTQ v1 packing; else a one-line error.
    Returns the blocks' linear-like parameter count (the quantized fraction's denominator)."""
    who = fam.name if fam is not None else "this model"
    total = covered = 0
    for i, block in enumerate(layers):
        total += moe.linear_like_params(block)
        for n, (fin, fout) in moe.planned_linears(block, fam).items():
            if name_matches(f"{layers_name}.{i}.{n}", cfg.skip):
                continue
            if (fin * cfg.bits) % 32 or (fout * cfg.bits) % 32:
                raise CompressError(
                    f"gptq: {layers_name}.{i}.{n} of {who} is [{fout}, {fin}]; {cfg.bits}-bit GPTQ v1 packing needs "
                    f"in and out features times {cfg.bits} divisible by 32: skip it (gptq.skip) or use other bits")
            covered += fin * fout
    if total and covered < MIN_QUANTIZED_FRACTION * total:
        raise CompressError(
            f"gptq would quantize only {100 * covered / total:.0f}% of the linear weights in the blocks of {who} "
            f"(skip={cfg.skip}); refusing a mostly unquantized result (experts are quantized per expert for "
            f"{', '.join(families.supported(lambda f: f.is_moe()))}; check gptq.skip)")
    return total


def _moved(value, device: torch.device, memo: dict):
    """`value` (tensors in nested tuples / lists / dicts) on `device`, floating tensors in fp32; a tensor seen before
    (by identity) is moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device=device, dtype=torch.float32 if value.is_floating_point() else None)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device, memo) for k, v in value.items()}
    return value


def _steps(block: nn.Module, inputs, names: list[str], lists: list[str]):
    """(steps, spans, tails) of a block: steps are the GPTQ passes in order, each a list of linear sets that share
    one input (one Hessian per set). Dense: one set per step (Llama: [q,k,v], [o], [gate,up], [down]). A MoE
    block's experts make two steps: every expert's [gate, up] (each its own Hessian, from the tokens routed to
    it), then every expert's [down]: experts read the same block input, so quantizing one never changes another's
    inputs, and two passes serve them all. Spans and tails inside the experts (and after them) are dropped: which
    experts run differs from batch to batch, so their outputs are never replayed. RTN: one linear per step."""
    if inputs is None:
        return [[[n]] for n in names], {}, {}
    h, r, kw = inputs[0]
    groups, spans, tails = trace_block(block, h, r, kw, optional=tuple(lists))
    if not lists:
        return [[g] for g in groups], spans, tails
    first = next((k for k, g in enumerate(groups) if _inside(g[0], lists)), len(groups))
    before = sum(len(g) for g in groups[:first])
    dense = [g for g in groups if not _inside(g[0], lists)]
    gate_up, down = [], []
    for p in lists:
        for e, expert in enumerate(block.get_submodule(p)):
            g, u, d = expert.names
            gate_up.append([f"{p}.{e}.{g}", f"{p}.{e}.{u}"])
            down.append([f"{p}.{e}.{d}"])
    steps = [[g] for g in dense[:first]] + [gate_up, down] + [[g] for g in dense[first:]]
    spans = {m: k for m, k in spans.items() if k <= before and not _inside(m, lists)}
    tails = {m: t for m, t in tails.items() if not _inside(t[0], lists) and not _inside(m, lists)}
    return steps, spans, tails


class _Tail:
    """A submodule whose output is its last linear's output (modeling.trace_block's tails): that linear's input
    recorded per batch during the linear's own GPTQ pass, so the output is one matmul away once it is quantized.
    Llama: self_attn = o_proj(recorded input), mlp = down_proj(recorded input); attention, rotary embeddings and
    gate/up never run again for the block, and what is kept is o_proj's and down_proj's inputs (h + I per token)
    instead of q/k/v, the attention output and gate/up outputs (2h + 2kvd, then h + 2I): less memory and less
    time for the same codes (bench/results/gptq_vs_peers.md)."""

    def __init__(self, name: str, pos: int, length: int):
        self.name, self.pos, self.length = name, pos, length  # the linear (block-relative name), output position
        self.linear: nn.Module | None = None  # set by the pass that quantizes it
        self.inputs: list = []  # per batch: (the linear's input, or once computed its output; version counters)
        self.done: list[bool] = []  # per batch: whether inputs[b] holds the output already

    def catch(self, x: torch.Tensor) -> None:
        if x.untyped_storage().nbytes() > x.numel() * x.element_size():
            x = x.clone()  # a view into a larger tensor would keep all of it alive
        self.inputs.append((x, _versions(x)))
        self.done.append(False)

    def output(self, b: int):
        """The submodule's output for batch b: computed on first use, then kept in place of the input (later
        passes replay it without the matmul; o_proj's output is no larger than its input, down_proj's smaller)."""
        x, versions = self.inputs[b]
        if _versions(x) != versions:
            raise RuntimeError("a recorded tensor of a replayed module was modified in place by the model; "
                               "replay cannot be used for this architecture (disable it in _replay_fits)")
        if not self.done[b]:
            x = self.linear(x)
            self.inputs[b], self.done[b] = (x, _versions(x)), True
        if self.pos < 0:
            return x
        out = [None] * self.length
        out[self.pos] = x
        return tuple(out)


class _Replay(nn.Module):
    """Stands in for a module whose inputs and weights are final: returns its recorded output for the current batch
    (or, for a _Tail, its last linear applied to the recorded input).

    No copies: the recorded tensors are handed out as they are, and their version counters are checked on every
    use, so a model that modifies a module's output in place fails loudly instead of corrupting later passes.
    """

    def __init__(self, outputs, cursor: list):
        super().__init__()
        self.outputs, self.cursor = outputs, cursor

    def forward(self, *args, **kwargs):
        if isinstance(self.outputs, _Tail):
            return self.outputs.output(self.cursor[0])
        out, versions = self.outputs[self.cursor[0]]
        if _versions(out) != versions:
            raise RuntimeError("a replayed module output was modified in place by the model; "
                               "replay cannot be used for this architecture (disable it in _replay_fits)")
        return out


def _versions(out) -> tuple:
    """Version counters of the tensors in a module output (a tensor, or a tuple/list of tensors and None)."""
    if isinstance(out, torch.Tensor):
        return (out._version,)
    if isinstance(out, (tuple, list)):
        return tuple(v for o in out for v in _versions(o))
    return ()


@torch.no_grad()
def _run_block(block: nn.Module, inputs, pre_hooks: dict | None = None, record=(), replay: dict | None = None) -> list:
    """Run every calibration batch through the block; return the outputs of the batches that ran to the end.

    pre_hooks: linear name -> fn(x) called with the linear's input (may raise StopForward to end the batch early).
    record: submodules whose outputs are stored in replay[name][batch]; submodules already complete in `replay`
    are swapped for _Replay during the run, so they are not recomputed (true-sequential passes and the last pass
    of a block would otherwise recompute every earlier, already quantized group, attention included).
    """
    cursor = [0]
    handles, swapped = [], {}
    replay = {} if replay is None else replay
    for name in record:
        replay[name] = [None] * len(inputs)
        handles.append(block.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: replay[name].__setitem__(cursor[0], (out, _versions(out)))))
    for name, fn in (pre_hooks or {}).items():
        handles.append(block.get_submodule(name).register_forward_pre_hook(lambda m, a, fn=fn: fn(a[0])))
    complete = [n for n, outs in replay.items()
                if n not in record and (isinstance(outs, _Tail) or all(o is not None for o in outs))]
    for name in complete:
        if not any(name.startswith(a + ".") for a in complete):  # outermost only: the rest is not called
            swapped[name] = block.get_submodule(name)
            set_submodule(block, name, _Replay(replay[name], cursor))
    outputs = []
    try:
        for b, (h, r, kw) in enumerate(inputs):
            cursor[0] = b
            try:
                outputs.append(call_block(block, h, r, kw))
            except StopForward:
                pass
    finally:
        for hd in handles:
            hd.remove()
        for name, m in swapped.items():
            set_submodule(block, name, m)
    for name in record:  # what a recorded module replays covers its insides: free their recordings
        for inner in [n for n in replay if n.startswith(name + ".")]:
            del replay[inner]
    return outputs


def _replay_fits(block: nn.Module, groups: list[list[str]], n_tokens: int, device: torch.device) -> bool:
    """Do the recorded outputs of every linear but the last group fit in a quarter of the free memory?"""
    need = sum(linear_weight(block.get_submodule(n)).shape[0] for g in groups[:-1] for n in g) * n_tokens * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need <= free // 4


def _inside(name: str, outer) -> bool:
    """Is submodule `name` one of `outer` or inside one of them?"""
    return any(name == o or name.startswith(o + ".") for o in outer)


def _to_catch(tails: dict[str, tuple], members: list[str], replay: dict) -> dict[str, _Tail]:
    """Tails completed by this pass (their last linear is quantized in it), outermost first: submodule -> _Tail."""
    done = [n for n, v in replay.items() if isinstance(v, _Tail)]
    found = [m for m, (lin, _, _) in tails.items() if lin in members and not _inside(m, done)]
    outer = [m for m in found if not any(m.startswith(o + ".") for o in found)]
    return {m: _Tail(*tails[m]) for m in outer}


def _to_record(groups: list[list[str]], spans: dict[str, int], k: int, replay: dict) -> list[str]:
    """Submodules to record in the pass of group k: the outermost ones whose linears all belong to groups < k.

    Their inputs and weights no longer change, so from the next pass on their recorded outputs replace them
    (Llama: q/k/v in the pass of o, the whole self_attn in the pass of gate/up, gate/up in the pass of down).
    """
    done = sum(len(g) for g in groups[:k])
    linear_names = [n for g in groups for n in g]
    final = {m for m, end in spans.items()
             if end <= done and any(n == m or n.startswith(m + ".") for n in linear_names)}
    outer = [m for m in final if not any(m.startswith(a + ".") for a in final)]
    return [m for m in outer if m not in replay]


@torch.no_grad()
def _gptq_pass(
    block: nn.Module, sets: list[list[str]], inputs, cfg: Config, record: list[str], replay: dict | None,
    catch: dict | None = None, seen: dict | None = None,
) -> dict[str, QuantResult]:
    """One calibration pass through the block, then GPTQ for the linears in `sets`; sets Q as their weights.

    Each set holds linears that read the same input: they share H and are quantized as one row-stacked matrix.
    With true_sequential a pass has one set; without it, a pass holds every set of the block (one forward, all
    inputs from the unquantized block). The forward stops at the input of the last set. `catch` (submodule -> _Tail):
    the inputs of their last linears are kept, and after quantization the tails join `replay`.
    A set that no calibration token reached (a MoE expert the router never picked) gets RTN codes instead; `seen`
    (when given) receives each linear's calibration token count.
    """
    catch = catch or {}
    members = [n for s in sets for n in s]
    mods = {n: block.get_submodule(n) for n in members}
    solvers = [GPTQ(torch.cat([linear_weight(mods[n]).float() for n in s])) for s in sets]  # [sum(out), in]
    # The linears of a set read the very same tensor (modeling.trace_block), so its first linear's input is the
    # whole set's: feed the shared Hessian and the tails there, and stop the forward at the last set's first
    # linear, before anything of the pass's own linears is computed (q/k, gate and silu would be wasted work).
    first = {s[0]: k for k, s in enumerate(sets)}
    caught = {s[0]: [] for s in sets}  # first linear of a set -> tails whose linear is in the set
    for tail in catch.values():
        tail.linear = block.get_submodule(tail.name)
        caught[next(s[0] for s in sets if tail.name in s)].append(tail)
    stop = sets[-1][0]

    def make_hook(name):
        def hook(x):
            solvers[first[name]].add_batch(x)
            for tail in caught[name]:
                tail.catch(x)
            if name == stop:
                raise StopForward
        return hook

    _run_block(block, inputs, pre_hooks={n: make_hook(n) for n in first}, record=record, replay=replay)

    out: dict[str, QuantResult] = {}
    for s, solver in zip(sets, solvers):
        if seen is not None:
            seen.update({n: solver.nsamples for n in s})
        if solver.nsamples == 0:  # no Hessian: an expert no calibration token was routed to
            res = rtn(solver.W, cfg.bits, cfg.group_size, cfg.sym)
        else:
            res = solver.quantize(
                bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, act_order=cfg.act_order,
                static_groups=cfg.static_groups, damp_percent=cfg.damp_percent, blocksize=cfg.block_size,
                group_aware=cfg.act_group_aware,
            )
        r0 = 0
        for n in s:
            rows = linear_weight(mods[n]).shape[0]
            out[n] = res.rows(r0, r0 + rows)
            # later groups see this linear quantized; a new tensor, not a write into the old one: writing into a
            # memory-mapped input would copy its pages into private memory that lives as long as the mapping
            set_linear_weight(mods[n], out[n].Q)
            r0 += rows
    for m, tail in catch.items():  # complete now: what they replay covers their insides
        for inner in [n for n in replay if n.startswith(m + ".")]:
            del replay[inner]
        replay[m] = tail
    return out


def _linear_stats(res: QuantResult) -> dict:
    """JSON-able per-linear numbers: output error (GPTQ objective), relative error, weight MSE, damp, seconds."""
    s = {"weight_mse": float(res.weight_err.sum() / res.Q.numel()), "seconds": round(res.seconds, 4)}
    if res.error is not None:
        s["error"] = float(res.error.sum())
        s["rel_error"] = float(res.error.sum() / res.energy.sum().clamp(min=1e-30))
        s["damp_percent"] = res.damp_percent
    return s


def _cast_unquantized(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters outside QuantLinear modules to dtype (buffers such as rotary inv_freq are kept)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            continue
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = onload.cast_paged(p.data, dtype)
