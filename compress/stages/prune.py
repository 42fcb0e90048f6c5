"""Stage `prune`: Sheared-LLaMA targeted structured pruning to a given shape or parameter count.

Paper: Xia et al. 2023, "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning",
https://arxiv.org/abs/2310.06694 (section 2.1). The core (hard-concrete gates, Lagrangian, masked forward,
materialisation) is compress/algorithms/shear.py and shear_model.py; this module is the glue:

    - prune: {target: {layers: 16, hidden: 320, heads: 6, intermediate: 768}, steps: 400}
    - prune: {target: 67_000_000, steps: 400}     # a parameter count (a number < 1 = a fraction of the model's)

Training (compress/train.py's `fit`, accelerate): every micro-batch samples masks z ~ HardConcrete(log_alpha),
runs the model with them (forward hooks, no forked model code) and minimises LM loss + the Lagrangian
lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 over model weights and log_alpha, while the lambdas are trained by
gradient ascent (AdamW maximize) with constant learning rates. The target t ramps linearly from the full model
to the final shape over the first `target_warmup` fraction of the steps (the paper: 20%). Text comes from this
stage's `data:` or the pipeline's `data.train` domains, mixed uniformly (one token block per row).

Then the deterministic masks (exactly the target count of every quantity, top-k of log_alpha) are folded into a
smaller dense model of the same class (plain from_pretrained); the stage checks on one batch that it computes
what the masked model computes and records the error.

Target shape: keys layers, hidden, heads, kv_heads, intermediate (missing = keep). With grouped-query
attention the kept (heads, kv_heads) is uniform over layers and heads % kv_heads == 0: whole kv groups are
pruned first (kv_heads defaults to heads / the model's query heads per group), query heads inside groups
otherwise; a parameter count is turned into a shape by shear.derive_shape (widths x f, depth x sqrt f).

Shapes that deploy: hidden and intermediate sizes are multiples of `multiple_of` (default 64), and query heads
are kept so that heads x head_dim is as aligned as the model's. GPTQ's int32 packing needs in_features x bits
% 32 == 0 (8 for 4-bit), the Marlin / ExLlama GPU kernels want in_features % 64 or % 128 and group_size to divide
in_features, vLLM's fused MoE kernels % 64: 64 satisfies all of them at group sizes up to 64 (use 128 to keep
group 128 whole). A derived shape is rounded; an explicit one that is not a multiple is refused with the nearest
valid values. Per-layer config lists (`layer_types`, Qwen3-MoE's `mlp_only_layers`) follow the kept layers, so
the smaller model loads with plain `from_pretrained`.

Families: every one in compress/families.py whose entry has no `prune` reason: Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3, Phi-3, Phi-2, OLMo 2, Granite, Mixtral, Qwen3-MoE (experts' FFN dims pruned jointly, the
router kept). Refused with the reason: StableLM, GPT-NeoX, Falcon, GPT-2, OPT (their attention takes head_dim
from hidden / heads, so a smaller hidden size does not load in their transformers class) and encoders.

Not supported: dynamic batch loading during pruning (the `train` stage has it), non-uniform per-layer shapes,
pruning head_dim, pruning whole experts, MoE models with dense layers, quantized inputs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from compress import memory, train
from compress.algorithms import shear, shear_model
from compress.errors import CompressError

NAME = "prune"
DISTRIBUTED = True  # under `accelerate launch` every process runs it, on its own shard (compress/pipeline.py)


@dataclass
class Config:
    target: dict | float = 0.5          # shape {layers, hidden, heads, kv_heads, intermediate} or a parameter count (<1: fraction)
    steps: int = 400                    # pruning updates (the paper: 3,200 x 32 x 4096 tokens; CPU runs need far fewer)
    lr: float = 1e-4                    # model weights' peak learning rate (the paper's), warmup + cosine
    lr_masks: float = 1.0               # log_alpha learning rate, constant (the paper: 1.0 with AdamW)
    lr_lambdas: float = 1.0             # Lagrange multipliers' learning rate for gradient ascent, constant (the paper: 1.0)
    batch_size: int = 8                 # token blocks per micro-batch
    grad_accum: int = 1                 # micro-batches per update (a bigger batch without more memory)
    seq_len: int = 512                  # tokens per block
    target_warmup: float = 0.2          # fraction of steps over which the target ramps from full size to final (paper: 0.2)
    lr_warmup: float = 0.1              # fraction of steps of linear lr warmup for the model weights (paper: 0.1)
    init_log_alpha: float = 3.0         # initial log_alpha of every gate: P(z != 0) ~ 0.99, so training starts near the full model
    data: list[str] | str | None = None # text sources (domains); default: the pipeline's data.train
    log_every: int = 10                 # steps between expected-shape records in the stats
    multiple_of: int = 64               # hidden / intermediate sizes are multiples of it, so GPTQ packing and GPU kernels take them
    save_every: int = 0                 # mid-stage checkpoint every N steps into the stage's work_dir (resume); 0 = never

    def __post_init__(self):
        t = self.target
        if isinstance(t, dict):
            unknown = sorted(set(t) - set(shear.TARGET_KEYS))
            if unknown or not t:
                raise CompressError(f"prune.target needs some of {', '.join(shear.TARGET_KEYS)}; got {sorted(t) or 'nothing'}")
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < 1 or (t >= 1 and float(t).is_integer())):
            raise CompressError(f"prune.target must be a shape mapping, a parameter count or a fraction in (0, 1), got {t!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CompressError(f"prune.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise CompressError(f"prune.seq_len must be an integer >= 3, got {self.seq_len!r}")
        for name in ("lr", "lr_masks", "lr_lambdas"):
            if not getattr(self, name) > 0:
                raise CompressError(f"prune.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("target_warmup", "lr_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise CompressError(f"prune.{name} is a fraction of the steps in [0, 1], got {getattr(self, name)!r}")
        if self.save_every < 0:
            raise CompressError(f"prune.save_every must be >= 0, got {self.save_every}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise CompressError(f"prune.multiple_of must be an integer >= 1, got {self.multiple_of!r}")
        if isinstance(self.data, str):
            self.data = [self.data]


def target_shape(model, cfg: Config) -> shear.Shape:
    """The target Shape from the config's `target` (a mapping, a parameter count, or a fraction (< 1) of them),
    its widths multiples of `multiple_of`."""
    base = shear.Shape.of(model.config)
    if isinstance(cfg.target, dict):
        shape = shear.resolve_target(base, cfg.target)
        shear.check_multiples(base, shape, shear.head_dim(model), cfg.multiple_of)
        shear.check_shape(model, shape)
        return shape
    n = round(cfg.target * model.num_parameters()) if cfg.target < 1 else int(cfg.target)
    return shear.derive_shape(model, n, cfg.multiple_of)


def _domains(tokenizer, cfg: Config, ctx) -> dict[str, torch.Tensor]:
    from compress.data import token_blocks

    specs = cfg.data or ctx.data.get("train")
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise CompressError("prune needs training text: set the pipeline's data.train or the stage's data")
    return {spec: token_blocks(tokenizer, spec, "train", cfg.seq_len) for spec in specs}


def run(model, tokenizer, cfg: Config, ctx):
    """Learn masks to the target shape, then return the materialised smaller model and the stats."""
    from accelerate import PartialState

    shear_model.check_supported(model)
    t0 = time.perf_counter()
    base = shear.Shape.of(model.config)
    target = target_shape(model, cfg)
    if target == base:
        raise CompressError(f"prune.target {cfg.target!r} is the model's own shape {base.as_dict()}; nothing to prune")
    params_before = model.num_parameters()
    ctx.log(f"prune: {base.as_dict()} -> {target.as_dict()} ({params_before:,} -> {shear.Arch.of(model).count(target):,} params)")

    blocks = _domains(tokenizer, cfg, ctx)
    state = PartialState()
    batches = train.DomainMixture(blocks, cfg.batch_size, seed=ctx.seed, rank=state.process_index,
                                  world_size=state.num_processes)
    shearer = shear.Shearer(model, target, init=cfg.init_log_alpha, seed=ctx.seed)
    warmup_steps = max(1, round(cfg.target_warmup * cfg.steps))
    progress = {"value": 0.0}
    target_params = shear.Arch.of(model).count(target)

    def snapshot(step):
        shape = shearer.expected_shape()
        rel = abs(shape["params"] - target_params) / max(params_before - target_params, 1)
        return {"step": step, **shape, "gap": _gap(shearer), "params_gap": rel}

    trace = [snapshot(0)]

    def before_step(step):
        progress["value"] = step / warmup_steps
        shearer.generator.manual_seed(ctx.seed * 1_000_003 + step)  # mask noise is a function of the step (resume)

    def loss_fn(wrapped, batch):
        mf.masks = shearer.sample()
        lm, _ = train.causal_lm_loss(wrapped, batch)
        lag, _ = shearer.lagrangian(progress["value"])
        return lm + lag, {"lm_loss": lm.detach(), "lagrangian": lag.detach()}

    def on_step(step, record):
        shearer.constrain()
        if step % cfg.log_every and step != cfg.steps:
            return None
        snap = snapshot(step)
        ctx.log(f"prune step {step}: lm_loss {record.get('lm_loss', float('nan')):.4f} expected params "
                f"{snap['params']:,.0f} (target {target_params:,}) shape gap {snap['gap']:.3f}")
        return {f"expected/{k}": v for k, v in snap.items() if k != "step"}  # kept in fit's (checkpointed) history

    tcfg = train.TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=round(cfg.lr_warmup * cfg.steps),
                             grad_accum=cfg.grad_accum, save_every=cfg.save_every, name="prune")
    groups = [{"params": shearer.gate_parameters(), "lr": cfg.lr_masks, "schedule": "constant"},
              {"params": shearer.lambda_parameters(), "lr": cfg.lr_lambdas, "maximize": True, "schedule": "constant"}]
    with shear_model.MaskedForward(model) as mf:
        result = train.fit(model, batches, loss_fn, tcfg, ctx, extra_param_groups=groups, before_step=before_step,
                           on_step=on_step)
        masks = shearer.deterministic()
        check = next(iter(blocks.values()))[: min(2, cfg.batch_size)].to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            mf.masks = masks
            masked_logits = model(input_ids=check).logits
            mf.masks = None
    pruned = shear_model.materialize(model, masks)
    model.train(was_training)
    pruned.eval()
    with torch.no_grad():
        err = ((pruned(input_ids=check).logits - masked_logits).abs().max() / masked_logits.abs().max().clamp(min=1e-12)).item()
    tol = 1e-4 if next(pruned.parameters()).dtype == torch.float32 else 5e-2  # folding rounds again in 16-bit
    if not err < tol:
        raise RuntimeError(f"materialised model differs from the masked model (max rel error {err:.2e} > {tol}); this is a bug")
    final = shear.Shape.of(pruned.config)
    trace += [{"step": r["step"], **{k[9:]: v for k, v in r.items() if k.startswith("expected/")}}
              for r in result.history if "expected/params" in r]
    stats = {
        "base_shape": base.as_dict(),
        "target_shape": target.as_dict(),
        "final_shape": final.as_dict(),
        "params_before": params_before,
        "params_after": pruned.num_parameters(),
        "expected_shape": trace,
        "target_params": target_params,
        "gap": {"start": trace[0]["gap"], "end": trace[-1]["gap"]},            # max over quantities |s_hat - t| (fractions)
        "params_gap": {"start": trace[0]["params_gap"], "end": trace[-1]["params_gap"]},  # |E[params] - target| / (full - target)
        "lambdas": {n: [float(v) for v in lam.detach().cpu()] for n, lam in shearer.lambdas.items()},
        "lm_loss": train.downsample(result.history, "lm_loss"),
        "lagrangian": train.downsample(result.history, "lagrangian"),
        "materialize_max_rel_error": err,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "domains": {n: int(len(b)) for n, b in blocks.items()},
        "seconds": time.perf_counter() - t0,
    }
    return pruned, stats


def _gap(shearer: shear.Shearer) -> float:
    """Largest distance, over pruned quantities, between the expected kept fraction and the final target's."""
    final = shearer.final_fractions()
    with torch.no_grad():
        return max((abs(s.mean().item() - final[n]) for n, s in shearer.expected_fractions().items()), default=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: the full model's weights train with hard-concrete masks (applied by hooks to
    head outputs, the MLP intermediate and every hidden-state write), then the pruned model is materialised."""
    memory.require_plain(state, NAME)
    shape, a = state.shape, state.act_bytes
    batch, seq = cfg.batch_size, cfg.seq_len
    terms = memory.training_terms(shape, a, batch, seq, memory.autocast("auto", where.kind),  # fit's default
                                  fsdp=where.fsdp)
    terms["mask activations"] = batch * seq * shape.layers * a * (3 * shape.hidden + shape.intermediate)
    domains = memory.text_domains(cfg.data, where.data.get("train"))
    terms["training text"] = memory.data_bytes(shape, [(d, "train") for d in domains])
    pruned = _pruned_shape(shape, cfg)
    terms["pruned model"] = (pruned.params + pruned.float_buffers) * a
    return memory.training_parts(terms, state, where, dataclasses.replace(state, shape=pruned))


def _meta_model(config: dict):
    """A model of `config` on the meta device (shapes, no storage), of the class its checkpoint would load as."""
    from transformers import AutoConfig

    from compress import checkpoint

    clean = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
    with torch.device("meta"):
        return checkpoint.auto_class(clean).from_config(AutoConfig.for_model(**clean))


def _pruned_shape(shape: memory.ModelShape, cfg: Config) -> memory.ModelShape:
    """The pruned model's shape, resolved as the stage resolves it (target_shape on a meta-device model)."""
    model = _meta_model(shape.config)
    shear_model.check_supported(model)
    return memory.describe(shear.target_config(model, target_shape(model, cfg)).to_dict())


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    return memory.training_tips(cfg, state, kind, fits)
