"""train: continued pretraining with Sheared-LLaMA's dynamic batch loading (Xia et al. 2023, arXiv 2310.06694).

Next-token training of a causal LM on a mixture of text domains (each source in `domains`, by default the
pipeline's `data.train`), for a token budget, through the one training loop (compress/train.py: AdamW,
warmup + cosine, accumulation, clipping, bf16 on CUDA, resumable checkpoints, DDP/FSDP via accelerate).

    stages:
      - train: {tokens: 2_000_000, seq_len: 512, batch_size: 8, grad_accum: 4, lr: 1.0e-4, update_every: 50}

Dynamic batch loading (section 2.2, Algorithm 1): every `update_every` steps measure each domain's loss ℓ on
its validation split, take the excess over a reference Δ = max(ℓ - ℓ_ref, 0), and reweight the mixture
w <- w·exp(η Δ) / Σ (then LLM-Shearing's uniform smoothing c = `smoothing`); batches are sampled from the
domains in proportion to w. Domains that lag behind their reference get more data.

The reference: the paper uses the loss that a scaling law predicts for a model of the target size trained
from scratch (or, in its ablation, the source model's loss). Here:
- `reference_loss: {spec: loss}` gives it per domain (e.g. the paper's way, from your own scaling fit);
- else `reference_model: base` (or any earlier stage) measures that model on each validation split: the
  "source model" reference, the natural choice after `prune`;
- else (default, `reference_model: input`) the model entering this stage, measured at stage start: then Δ > 0
  only where training made a domain worse than it was, and DBL re-balances towards the domains being
  forgotten. With one domain, or dynamic_batch_loading: false, the weights stay fixed.

Batch size: `batch_size` sequences per micro-batch per process; one step = batch_size * seq_len * grad_accum
* processes tokens; steps = ceil(tokens / that).

Not supported: quantized inputs (train before gptq/int8), masked-LM (BERT) pretraining, packing documents
across domains into one block, per-domain validation beyond `eval_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress import memory
from compress import train as engine
from compress.errors import CompressError

NAME = "train"
DISTRIBUTED = True  # under `accelerate launch` every process runs it, on its own shard (compress/pipeline.py)


@dataclass
class Config:
    tokens: int = 1_000_000                # token budget over all processes; sets the number of steps
    batch_size: int = 8                    # sequences per micro-batch per process (memory)
    seq_len: int = 512                     # tokens per training sequence (non-overlapping blocks of each domain)
    grad_accum: int = 1                    # micro-batches per optimizer step (bigger batch, same memory)
    lr: float = 1e-4                       # peak learning rate; the paper's continued pretraining uses 1e-4
    warmup: float = 0.03                   # fraction of steps of linear warmup (the paper: 3%)
    weight_decay: float = 0.0              # AdamW decay on matrices; 0 keeps short runs close to the input model
    min_lr_ratio: float = 0.1              # cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0             # gradient clipping (0 = off)
    save_every: int = 100                  # steps between resumable checkpoints in the stage's work dir (0 = none)
    domains: list | None = None            # text specs, one per domain; default: the pipeline's data.train
    dynamic_batch_loading: bool = True     # reweight domains by excess validation loss (else fixed weights)
    update_every: int = 50                 # m: steps between weight updates (each costs one validation pass)
    reference_loss: dict | None = None     # {spec: loss} per domain; overrides reference_model
    reference_model: str = "input"         # whose validation loss is the reference: input | base | a stage name
    initial_weights: dict | None = None    # {spec: weight} at step 0; default uniform
    eta: float = 1.0                       # step size η of the exponential update (the paper: 1)
    smoothing: float = 1e-4                # c: mix (1-c)·w + c/k so no domain starves (LLM-Shearing's code: 1e-4)
    eval_tokens: int = 16384               # validation tokens per domain for each loss measurement
    mixed_precision: str = "auto"          # auto (bf16 autocast on CUDA, none on CPU) | bf16 | no

    def __post_init__(self):
        for name in ("tokens", "batch_size", "seq_len", "grad_accum", "update_every", "eval_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CompressError(f"train.{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise CompressError(f"train.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise CompressError(f"train.warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.save_every < 0:
            raise CompressError("train.weight_decay, max_grad_norm and save_every must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CompressError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.eta <= 0 or not 0 <= self.smoothing < 1:
            raise CompressError(f"train.eta must be > 0 and smoothing in [0, 1), got {self.eta!r}, {self.smoothing!r}")
        if self.mixed_precision not in engine.MIXED_PRECISION:
            raise CompressError(
                f"train.mixed_precision must be one of {', '.join(engine.MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.domains is not None:
            if isinstance(self.domains, str):
                self.domains = [self.domains]
            specs = self.domains
            if not specs or len(set(specs)) != len(specs) or not all(isinstance(d, str) for d in specs):
                raise CompressError(f"train.domains must be a non-empty list of distinct text specs, got {specs!r}")
        for name in ("reference_loss", "initial_weights"):
            v = getattr(self, name)
            ok = v is None or (isinstance(v, dict) and all(isinstance(x, (int, float)) and x >= 0 for x in v.values()))
            if not ok:
                raise CompressError(f"train.{name} must map each domain spec to a number >= 0, got {v!r}")


def run(model, tokenizer, cfg: Config, ctx):
    """Continue pretraining `model` in place; return it with the data mixture and loss statistics."""
    from compress import data

    if getattr(model.config, "quantization_config", None):
        raise CompressError("train cannot update a quantized model; put the train stage before gptq/int8")
    domains = _domains(cfg, ctx)
    for name, given in (("reference_loss", cfg.reference_loss), ("initial_weights", cfg.initial_weights)):
        if given is not None and set(given) != set(domains):
            raise CompressError(f"train.{name} must have exactly the domains {domains}, got {sorted(given)}")
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        ctx.log("[train] the weights are 16-bit: updates below their resolution are lost; train before a cast stage")

    state = engine.process_state(ctx)
    train_blocks = {d: data.token_blocks(tokenizer, d, "train", cfg.seq_len) for d in domains}  # each [n_i, T]
    val_blocks = {
        d: data.token_blocks(tokenizer, d, "validation", cfg.seq_len, max_tokens=cfg.eval_tokens) for d in domains
    }
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * state.num_processes
    steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    ctx.log(f"[train] {steps} steps of {tokens_per_step} tokens over {len(domains)} domain(s)")

    torch.manual_seed(ctx.seed)
    if state.num_processes > 1:  # under accelerate launch each process trains on its own device
        model.to(state.device)
    initial = engine.domain_losses(model, val_blocks, cfg.batch_size)
    reference, reference_source = _reference(cfg, ctx, initial, val_blocks, next(model.parameters()).device)

    w0 = None if cfg.initial_weights is None else [cfg.initial_weights[d] for d in domains]
    mixture = engine.DomainMixture(train_blocks, cfg.batch_size, weights=w0, seed=ctx.seed,
                                   rank=state.process_index, world_size=state.num_processes)
    dbl = engine.DynamicBatchLoading(
        mixture, val_blocks, reference, cfg.update_every, cfg.eta, cfg.smoothing, cfg.batch_size
    )
    use_dbl = cfg.dynamic_batch_loading and len(domains) > 1
    tcfg = engine.TrainConfig(
        steps=steps, lr=cfg.lr, warmup_steps=round(cfg.warmup * steps), min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm or None,
        save_every=cfg.save_every, mixed_precision=cfg.mixed_precision, name="train",
    )
    result = engine.fit(
        model, mixture, engine.causal_lm_loss, tcfg, ctx,
        on_step=(lambda step, logs: dbl(model, step)) if use_dbl else None, state_objects={"dbl": dbl},
    )
    final = engine.domain_losses(model, val_blocks, cfg.batch_size)
    stats = {
        "steps": steps, "tokens": result.tokens, "tokens_per_step": tokens_per_step,
        "train_seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from_step": result.resumed_from, "processes": state.num_processes,
        "domains": domains, "dynamic_batch_loading": use_dbl,
        "reference_loss": reference, "reference_source": reference_source,
        "initial_val_loss": initial, "final_val_loss": final,
        "domain_weights": dbl.history, "tokens_per_domain": mixture.tokens_seen(),
        "loss_curve": engine.downsample(result.history, "loss", 100),
    }
    return model, stats


def _domains(cfg: Config, ctx) -> list[str]:
    domains = cfg.domains if cfg.domains is not None else ctx.data.get("train")
    if isinstance(domains, str):
        domains = [domains]
    if not domains:
        raise CompressError("train has no data: set train.domains, or data.train in the pipeline (text specs)")
    return list(domains)


def _reference(cfg: Config, ctx, initial: dict, val_blocks: dict, device) -> tuple[dict, str]:
    """ℓ_ref per domain and where it came from (config, the input model, or an earlier model)."""
    if cfg.reference_loss is not None:
        return {d: float(cfg.reference_loss[d]) for d in val_blocks}, "config"
    if cfg.reference_model == "input":
        return dict(initial), "input"
    ref_model, _ = ctx.load_model(cfg.reference_model)
    ref_model.to(device)
    losses = engine.domain_losses(ref_model, val_blocks, cfg.batch_size)
    del ref_model
    return losses, cfg.reference_model


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: full training of the input in its dtype (compress/train.py), the train and
    validation splits of every domain, and the reference model when it is an earlier stage's."""
    memory.require_plain(state, NAME)
    terms = memory.training_terms(state.shape, state.act_bytes, cfg.batch_size, cfg.seq_len,
                                  memory.autocast(cfg.mixed_precision, where.kind), fsdp=where.fsdp)
    domains = memory.text_domains(cfg.domains, where.data.get("train"))
    terms["training text"] = memory.data_bytes(state.shape, [(d, sp) for sp in ("train", "validation") for d in domains])
    ref = cfg.reference_model
    if ref != "input" and ref in where.states and where.states[ref] is not where.input:
        terms["reference model"] = where.states[ref].weights_bytes()
    return memory.training_parts(terms, state, where, state)


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    return memory.training_tips(cfg, state, kind, fits)
