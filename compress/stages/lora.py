"""lora: LoRA adapters that win back what compression lost, trained on the frozen (possibly quantized) model.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685 (h = W x + (alpha / r) B A x, B = 0 at the start).
QLoRA: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (adapters over a frozen quantized W, dequantized
on the fly for each matmul and again in the backward). The adapter layers and the peft glue live in
compress/algorithms/lora.py; training goes through compress/train.py (`fit`: AdamW, warmup + cosine,
accumulation, clipping, NaN guard, progress bar, resumable checkpoints, accelerate).

    stages:
      - gptq: {bits: 4, group_size: 128}
      - lora: {rank: 16, alpha: 32, loss: kd, teacher: base, tokens: 1_000_000, seq_len: 512}

Inputs: a plain model, a GPTQ model (compress QuantLinear: peft's custom-module API, compress's own layer), or an
LLM.int8() model (bitsandbytes Linear8bitLt: peft's own layer; runs on CPU with bitsandbytes 0.50). Targets: every
linear inside the decoder blocks (compress.modeling.decoder_layers), or those named in `targets` (q_proj,
mlp.down_proj, ...). Everything but the adapters is frozen; the stage returns the base unchanged, bit for bit.

Objective: `loss: kd` (default) = KL(teacher || model) at temperature T over every position
(compress.algorithms.kd.soft_target_kl), the teacher frozen and loaded as distill loads it (`base`, an earlier
stage, a folder, zoo:NAME); `loss: lm` = next-token cross-entropy on the text. Text: the stage's `data` or the
pipeline's data.train, train splits as token blocks of seq_len, domains mixed uniformly; steps =
ceil(tokens / (batch_size * seq_len * grad_accum * processes)). Before and after training the LM loss (and,
with a teacher, the KL) is measured on validation blocks; with a teacher, `gap_closed` per domain is the share
of the model-to-teacher LM-loss gap the adapters closed.

Output: a peft PeftModel, which compress.checkpoint.save writes as the base checkpoint as before plus
`adapter/` (adapter_config.json + adapter_model.safetensors, PEFT format); compress.checkpoint.load applies it,
and `PeftModel.from_pretrained(base, folder / "adapter")` does over a plain base (over a GPTQ base, peft needs
compress's layer registered: compress.algorithms.lora.load_adapter). `merge: true` folds the adapters into the
weights and returns a plain model (plain inputs only; a quantized input with merge is refused before training).

16-bit inputs: with `upcast` (default) the frozen model's float16/bfloat16 parameters are computed in float32
during training (exact: every 16-bit value is a float32) and cast back after, so the saved base is unchanged;
float16 activations would underflow without a loss scaler, and CPUs are slow at 16-bit. Adapters are float32.

Not supported: merging into GPTQ or int8 weights, a second adapter on an input that already has one (merge the
first), adapters on embeddings / lm_head, DoRA / rsLoRA / other peft variants, masked LMs and encoders, 4-bit
bitsandbytes, teachers with another tokenizer; several processes (DDP) are wired as in distill but not tested.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from compress import memory
from compress import train as engine
from compress.errors import CompressError

NAME = "lora"
REQUIRES = ("peft",)  # checked before any work (compress.pipeline.check_inputs)
DISTRIBUTED = True  # under `accelerate launch` every process runs it, on its own shard (compress/pipeline.py)
LOSSES = ("kd", "lm")
# Importing peft into a process that already runs a model and has imported bitsandbytes: +10.3 MiB RSS, measured
# twice on torch 2.13 CPU. peft imports bitsandbytes itself when it is installed (stages/int8.BNB_IMPORT_BYTES).
PEFT_IMPORT_BYTES = 11 * 2**20


@dataclass
class Config:
    rank: int = 16                    # r: adapter rank; capacity to correct the compressed weights vs adapter bytes
    alpha: float = 32.0               # the update is scaled by alpha / rank (2 here): its step size relative to lr
    dropout: float = 0.0              # dropout on the adapters' input; the target is the base's own distribution, not a small task set
    targets: list[str] | None = None  # linear names inside each block (q_proj, mlp.down_proj); null = every linear in the blocks
    loss: str = "kd"                  # kd: KL to the teacher's next-token distribution | lm: cross-entropy on the text
    teacher: str = "base"             # kd only: base | an earlier stage | a model folder | zoo:NAME (the model compression started from)
    temperature: float = 1.0          # kd: T; 1 matches the distribution the evaluation's KL compares
    tokens: int = 1_000_000           # token budget over all processes; sets the number of steps
    batch_size: int = 8               # sequences per micro-batch per process (memory: activations, logits of both models)
    seq_len: int = 512                # tokens per training block
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 2e-4                  # peak learning rate of the adapters (QLoRA: 2e-4 for models up to 13B)
    warmup: float = 0.03              # fraction of steps of linear warmup (QLoRA: 3%)
    weight_decay: float = 0.0         # AdamW decay on the adapter matrices
    min_lr_ratio: float = 0.1         # cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 0.3        # gradient clipping (QLoRA: 0.3; 0 = off)
    save_every: int = 100             # steps between resumable checkpoints in the stage's work dir (0 = none)
    data: list[str] | str | None = None  # text specs (domains); default: the pipeline's data.train
    eval_tokens: int = 16384          # validation tokens (all domains) for the before/after LM loss and KL
    merge: bool = False               # fold the adapters into the weights (plain inputs only): a plain model, no adapter/
    upcast: bool = True               # compute 16-bit frozen weights in float32 while training (exact, cast back after)
    cache_dequantized: bool = False   # GPTQ inputs: keep every dequantized weight (faster, a float model's memory) instead of QLoRA's on-the-fly dequantization
    mixed_precision: str = "auto"     # auto (bf16 autocast on CUDA, none on CPU) | bf16 | no

    def __post_init__(self):
        for name in ("rank", "tokens", "batch_size", "grad_accum", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CompressError(f"lora.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise CompressError(f"lora.seq_len must be an integer >= 3, got {self.seq_len!r}")
        if self.eval_tokens < self.seq_len:
            raise CompressError(f"lora.eval_tokens must be >= seq_len ({self.seq_len}), got {self.eval_tokens}")
        for name in ("alpha", "temperature", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CompressError(f"lora.{name} must be a number > 0, got {v!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise CompressError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.loss not in LOSSES:
            raise CompressError(f"lora.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise CompressError(f"lora.teacher must be base, a stage name, a model folder or zoo:NAME, got {self.teacher!r}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise CompressError(f"lora.targets must be a non-empty list of linear names (or null), got {self.targets!r}")
        if not 0 <= self.warmup < 1:
            raise CompressError(f"lora.warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CompressError(f"lora.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.save_every < 0:
            raise CompressError("lora.weight_decay, max_grad_norm and save_every must be >= 0")
        for name in ("merge", "upcast", "cache_dequantized"):
            if not isinstance(getattr(self, name), bool):
                raise CompressError(f"lora.{name} must be true or false, got {getattr(self, name)!r}")
        if self.mixed_precision not in engine.MIXED_PRECISION:
            raise CompressError(
                f"lora.mixed_precision must be one of {', '.join(engine.MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.data is not None and (not self.data or not all(isinstance(d, str) and d for d in self.data)):
            raise CompressError(f"lora.data must be a text spec or a non-empty list of them, got {self.data!r}")


# ----------------------------------------------------------------------------- what gets adapters


def input_format(model) -> str:
    """plain | gptq | bnb-int8, from config.quantization_config (compress.checkpoint.format_of)."""
    from compress import checkpoint

    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return checkpoint.format_of({"quantization_config": qc})


def target_names(model, targets: list[str] | None) -> list[str]:
    """Full module names of the linears (plain, QuantLinear, Linear8bitLt) inside the decoder blocks that get
    adapters: all of them, or those whose name inside the block is, or ends with, one of `targets`."""
    from compress.modeling import decoder_layers_with_name, is_linear

    layers_name, layers = decoder_layers_with_name(model)
    found, used = [], set()
    for i, block in enumerate(layers):
        for name, m in block.named_modules():
            if not name or not (is_linear(m) or hasattr(m, "qweight")):
                continue
            hit = [t for t in targets or [] if name == t or name.endswith("." + t)]
            if targets is None or hit:
                found.append(f"{layers_name}.{i}.{name}")
                used.update(hit)
    if targets is not None and set(targets) - used:
        names = _block_linears(layers[0])
        raise CompressError(f"lora.targets {sorted(set(targets) - used)} match no linear in the decoder blocks; "
                            f"they hold: {', '.join(names)}")
    if not found:
        raise CompressError("lora found no linear layer inside the decoder blocks to adapt")
    return found


def _block_linears(block) -> list[str]:
    from compress.modeling import is_linear

    return [n for n, m in block.named_modules() if n and (is_linear(m) or hasattr(m, "qweight"))]


def _upcast(model) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
    """float16/bfloat16 parameters computed in float32, in place (exact); returns what to cast back."""
    changed = []
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            changed.append((p, p.dtype))
            p.data = p.data.float()
    return changed


def _cast_back(changed) -> None:
    for p, dtype in changed:
        p.data = p.data.to(dtype)  # exact: the values were 16-bit to begin with and were not trained


def _adapter_tensors(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- losses


def _kl_loss(teacher, T: float):
    """fit's loss_fn: KL(teacher || model) at temperature T over every position (kd.soft_target_kl)."""
    from compress.algorithms import kd

    def loss_fn(model, batch):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch   # [B, T]
        with torch.no_grad():
            z_t = teacher(input_ids=ids, use_cache=False).logits         # [B, T, V]
        z_s = model(input_ids=ids, use_cache=False).logits               # [B, T, V]
        kl = kd.soft_target_kl(z_s, z_t, T)
        return kl, {"kl": kl.detach()}

    return loss_fn


def _domains(cfg: Config, ctx) -> list[str]:
    specs = cfg.data if cfg.data is not None else ctx.data.get("train")
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise CompressError("lora has no data: set lora.data, or data.train in the pipeline (text specs)")
    return list(specs)


def _measure(model, teacher, val: dict, cfg: Config) -> dict:
    """{"lm": {domain: loss}, "kl": {domain: kl} (with a teacher)} on the validation blocks."""
    out = {"lm": engine.domain_losses(model, val, cfg.batch_size)}
    if teacher is not None:
        out["kl"] = engine.domain_losses(model, val, cfg.batch_size, _kl_loss(teacher, cfg.temperature))
    return out


# ----------------------------------------------------------------------------- memory


def _target_linears(shape, targets: list[str] | None) -> list[tuple]:
    """(name, in, out) of one decoder layer's linears that get adapters (target_names on a ModelShape)."""
    if targets is None:
        return list(shape.linears)
    return [l for l in shape.linears if any(l[0] == t or l[0].endswith("." + t) for t in targets)]


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory, counted as the train and distill stages count theirs.

    The frozen input stays resident in its stored format (plain, GPTQ, int8): on-device input, not growth.
    Growth: the adapters r (in + out) per adapted linear in float32 with their gradients and AdamW m, v (16
    bytes per adapter parameter); a float32 copy of 16-bit weights when `upcast`; activations as full training
    keeps them (compress.memory.training_activation_bytes: the backward to earlier layers' adapters runs through
    every layer), plus each adapter's input in float32 when activations are 16-bit and its dropout copy and mask;
    logits + loss, and with kd the teacher's logits and the soft-target KL (fp32 copies, (log-)softmax of both,
    ~6 x B*S*V*4, as distill); GPTQ: every dequantized weight with `cache_dequantized`, else one linear's at a
    time (forward and backward); int8: LLM.int8's matmul buffers and the backward's fp16 weight of one linear;
    kd: the teacher's weights (always loaded beside the input, float32 when upcast) and one teacher layer's
    transient; the text (train + validation splits); libraries imported for the first time.
    """
    import dataclasses

    from compress.stages.int8 import BNB_IMPORT_BYTES

    mem = memory
    if cfg.merge and state.format != "plain":
        raise CompressError(f"lora.merge: true folds adapters into plain weights, but this input is {state.format}; "
                            "set merge: false (the adapter is saved beside the base)")
    shape, B, S = state.shape, cfg.batch_size, cfg.seq_len
    autocast = mem.autocast(cfg.mixed_precision, where.kind)
    upcast = cfg.upcast and state.dtype != "float32"
    w = 4 if upcast else state.act_bytes                      # compute dtype of the frozen float tensors
    a = 2 if autocast else w                                  # activations
    lin = _target_linears(shape, cfg.targets)
    P = shape.layers * sum(cfg.rank * (i + o) for _, i, o in lin)
    terms = {"adapter weights (float32)": P * 4, "adapter gradients": P * 4, "AdamW states (m, v)": P * 8}
    if upcast:
        terms["float32 copy of 16-bit weights (upcast)"] = state.float_numel() * 4
    terms["activations"] = mem.training_activation_bytes(shape, a, B, S)
    per_token = sum(cfg.rank * 4 + (i * 4 if a < 4 else 0) + (i * (a + 1) if cfg.dropout > 0 else 0) for _, i, _ in lin)
    terms["adapter activations"] = B * S * shape.layers * per_token
    n = B * S * shape.vocab
    terms["logits + loss"] = mem.train_logits_bytes(shape, a, B, S)
    quantized = state.quantized_linears() if state.format != "plain" else []
    if state.format == "gptq":
        if cfg.cache_dequantized:
            terms["dequantized weight cache"] = shape.layers * sum(i * o for _, i, o in quantized) * a
        else:
            terms["dequantized weight (one linear at a time)"] = max(i * o for _, i, o in quantized) * a
    elif state.format == "bnb-int8":
        i, o = max(((i, o) for _, i, o in quantized), key=lambda t: t[0] * t[1])
        terms["int8 matmul buffers + backward fp16 weight (largest linear)"] = B * S * (3 * i + 4 * o) + 2 * i * o
    if cfg.loss == "kd":
        t_state = where.states.get(cfg.teacher) or where.states.get("base") or state
        if cfg.upcast and t_state.format == "plain" and t_state.dtype != "float32":
            t_state = dataclasses.replace(t_state, dtype="float32")
        t_a = 2 if autocast else t_state.act_bytes
        terms["teacher weights"] = t_state.weights_bytes()
        terms["teacher logits"] = n * t_a
        terms["soft targets + KL"] = 6 * n * 4
        terms["teacher forward (one layer)"] = mem.inference_layer_bytes(t_state.shape, t_a, B, S)
    domains = mem.text_domains(cfg.data, where.data.get("train"))
    terms["training text"] = mem.data_bytes(shape, [(d, sp) for sp in ("train", "validation") for d in domains])
    if cfg.merge:
        terms["merge transient (one linear)"] = max(i * o for _, i, o in lin) * 4
    if where.kind == "cpu":
        terms["peft library (first import)"] = PEFT_IMPORT_BYTES
        if "bitsandbytes" not in where.loaded:
            terms["bitsandbytes library (first import, by peft)"] = BNB_IMPORT_BYTES
    return mem.Parts({k: v for k, v in terms.items() if v}, state.weights_bytes(), state, loads=("bitsandbytes",))


# ----------------------------------------------------------------------------- the stage


def run(model, tokenizer, cfg: Config, ctx):
    """Train LoRA adapters on the frozen `model`; return the PeftModel (or the merged plain model) and stats."""
    from compress import data, manifest
    from compress.evaluate import model_kind

    fmt = input_format(model)
    if cfg.merge and fmt != "plain":
        raise CompressError(f"lora.merge: true folds adapters into plain weights, but this input is {fmt}; "
                            "set merge: false (the adapter is saved beside the base)")
    from compress.algorithms import gptq as gptq_core
    from compress.algorithms import lora as core
    from compress.stages import distill

    if core.is_adapted(model):
        raise CompressError("lora: the input already carries an adapter; merge it first (merge: true) "
                            "or train from the model before it")
    if model_kind(model) != "causal":
        raise CompressError(f"lora trains causal LMs; {type(model).__name__} is not one")
    targets = target_names(model, cfg.targets)
    state = engine.process_state(ctx)
    device = state.device
    domains = _domains(cfg, ctx)

    # -- teacher (frozen, no grad)
    teacher, t_info = None, None
    if cfg.loss == "kd":
        known = ["base", *ctx.stage_paths]
        if not (cfg.teacher.startswith("zoo:") or cfg.teacher in known or Path(cfg.teacher).expanduser().is_dir()):
            raise CompressError(f"lora.teacher {cfg.teacher!r} is neither an earlier stage ({', '.join(known)}), "
                                "a model folder, nor zoo:NAME")
        teacher, t_tok, t_hash, t_path = distill.load_teacher(cfg.teacher, ctx)
        distill.check_compatible(teacher, t_tok, model, tokenizer)
        teacher.eval()
        teacher.requires_grad_(False)
        if cfg.upcast:
            _upcast(teacher)  # discarded after the stage: no cast back
        teacher.to(device)
        t_info = {"ref": cfg.teacher, "path": t_path, "hash": t_hash}

    # -- the frozen model: 16-bit weights computed in float32, GPTQ weights dequantized on the fly
    model.requires_grad_(False)
    changed = _upcast(model) if cfg.upcast else []
    quant = [m for m in model.modules() if isinstance(m, gptq_core.QuantLinear)]
    caches = [(q, q.cache) for q in quant]
    for q in quant:
        q.cache, q._cached = cfg.cache_dequantized, None
    model.to(device)
    torch.manual_seed(ctx.seed)  # the adapters' A init
    adapted = core.add_adapters(model, targets, cfg.rank, cfg.alpha, cfg.dropout)
    trainable = _adapter_tensors(adapted)
    n_train = sum(p.numel() for p in trainable)
    ctx.log(f"[lora] {len(targets)} {fmt} linears get rank-{cfg.rank} adapters: {n_train:,} trainable parameters")

    # -- data
    train_blocks = {d: data.token_blocks(tokenizer, d, "train", cfg.seq_len) for d in domains}   # each [n_i, T]
    per_domain = max(cfg.seq_len, cfg.eval_tokens // len(domains))
    val = {d: data.token_blocks(tokenizer, d, "validation", cfg.seq_len, max_tokens=per_domain) for d in domains}
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * state.num_processes
    steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    ctx.log(f"[lora] loss {cfg.loss}" + (f" against {cfg.teacher}" if teacher is not None else "")
            + f": {steps} steps of {tokens_per_step} tokens over {len(domains)} domain(s)")

    teacher_lm = engine.domain_losses(teacher, val, cfg.batch_size) if teacher is not None else None
    start = _measure(adapted, teacher, val, cfg)
    mixture = engine.DomainMixture(train_blocks, cfg.batch_size, seed=ctx.seed, rank=state.process_index,
                                   world_size=state.num_processes)
    loss_fn = _kl_loss(teacher, cfg.temperature) if teacher is not None else engine.causal_lm_loss
    tcfg = engine.TrainConfig(
        steps=steps, lr=cfg.lr, warmup_steps=round(cfg.warmup * steps), min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm or None,
        save_every=cfg.save_every, mixed_precision=cfg.mixed_precision, name="lora",
    )
    try:
        result = engine.fit(adapted, mixture, loss_fn, tcfg, ctx)
    finally:
        for q, cache in caches:
            q.cache, q._cached = cache, None
    adapted.eval()

    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    out = adapted.merge_and_unload() if cfg.merge else adapted
    _cast_back(changed)
    out.requires_grad_(False)
    end = _measure(out, teacher, val, cfg)
    gap = None
    if teacher_lm is not None:
        gap = {d: ((start["lm"][d] - end["lm"][d]) / (start["lm"][d] - teacher_lm[d])
                   if start["lm"][d] - teacher_lm[d] > 1e-6 else None) for d in domains}
    stats = {
        "input_format": fmt, "merged": cfg.merge,
        "targets": sorted({re.sub(r"^.*?\.\d+\.", "", t) for t in targets}),  # names inside a block
        "adapted_linears": len(targets), "rank": cfg.rank, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.rank,
        "dropout": cfg.dropout,
        "trainable_params": n_train, "model_params": manifest.count_params(out),
        "adapter_bytes": adapter_bytes,
        "trained_against": {"loss": cfg.loss, "teacher": t_info,
                            "temperature": cfg.temperature if teacher is not None else None,
                            "tokens": result.tokens, "domains": domains},
        "upcast_16bit_params": len(changed), "dequantized_cache": cfg.cache_dequantized if quant else None,
        "steps": steps, "tokens_per_step": tokens_per_step,
        "train_seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from_step": result.resumed_from, "processes": state.num_processes,
        "val_blocks": {d: int(len(v)) for d, v in val.items()},
        "val_start": start, "val_end": end, "teacher_val_lm": teacher_lm, "gap_closed": gap,
        "loss_curve": engine.downsample(result.history, "loss", 100),
    }
    del teacher
    return out, stats
