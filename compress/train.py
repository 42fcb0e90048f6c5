"""The one training loop (`fit`) and Sheared-LLaMA's dynamic batch loading; prune, train and distill all use it.

`fit()` runs AdamW with linear warmup + cosine decay, gradient accumulation and clipping, bf16 autocast on
CUDA, a progress bar with loss and tokens/s, a NaN/inf guard, and resumable checkpoints in the stage's
work_dir. It runs through `accelerate`, so the same code runs in one process or under a launcher:

    accelerate launch --multi_gpu --num_processes 2 -m compress.cli run pipe.yaml  # DDP: NCCL on GPUs, gloo on CPU
    accelerate launch --config_file fsdp.yaml -m compress.cli run pipe.yaml        # FSDP: from accelerate's config

On a machine without CUDA, `--multi_gpu` still starts N torchrun processes, and they form a gloo group
because compress asks accelerate for cpu=True (tested with 2). `--cpu --num_processes 2` starts ONE process
in accelerate 1.x unless it is given `--mpirun_hostfile`.

FSDP: FSDP2 only (`fsdp_version: 2`, configs/accelerate/fsdp.yaml); sharding, wrapping and its mixed-precision
policy come from the accelerate config. `fit` shards `model` in place (accelerate's fsdp2_prepare_model), builds
AdamW on the shards, reduce-scatters gradients on every micro-batch (no no_sync: that would hold full-size
gradients), clips through accelerate (the global norm over DTensor shards), and at the end all-gathers the
trained weights into the plain model it was given (same modules, hooks and Parameter objects, original dtypes)
on every process, so the stage and the pipeline continue as after DDP. While it trains, `model` is the sharded
module: a forward on it is a collective (domain_losses keeps the processes in step). accelerate 1.16 ignores
FSDP on CPU (it trains with DDP there); compress turns it on (FSDP2 runs on gloo; tested with 2 processes).

Usage (what the stages do):

    from compress import train
    cfg = train.TrainConfig(steps=1000, lr=1e-4, warmup_steps=30, grad_accum=4, save_every=100)
    result = train.fit(model, batches, train.causal_lm_loss, cfg, ctx)
    result.history[-1]["loss"], result.tokens, result.tokens_per_s

- `batches` yields this process's micro-batches (a LongTensor [B, T], or a dict of tensors with "input_ids").
  Under several processes each must yield its own shard: `DomainMixture` does (it draws one global batch and
  keeps rows [rank*B, (rank+1)*B)); otherwise shard with `process_state(ctx).process_index`.
- `loss_fn(model, batch) -> (loss, logs)`: a scalar loss to minimise and a dict of floats/0-d tensors to log
  (averaged over micro-batches; rank-local). It gets the *wrapped* model (DDP, FSDP); call it as usual. It runs under
  autocast, so a frozen teacher inside it (distill) is autocast too; put the teacher on
  `process_state(ctx).device` and keep it out of the optimizer (requires_grad False or not in `model`).
- `extra_param_groups`: more AdamW groups, e.g. hard-concrete masks and Lagrange multipliers (prune):
      [{"params": [log_alpha...], "lr": 0.1},
       {"params": [lambda_1, lambda_2], "lr": 0.1, "maximize": True, "schedule": "constant"}]
  keys: any AdamW option (lr, weight_decay [default 0 here], betas, maximize=True = gradient ascent) plus
  "schedule": "cosine" (default: warmup + cosine like the model) | "constant". Parameters that are not inside
  `model` get their gradients averaged across processes by `fit` and are not clipped; they are moved to the
  training device in place (same Parameter objects). Keep such parameters outside `model`: under DDP a model
  parameter that gets no gradient in a step is an error (find_unused_parameters is off).
- `before_step(step)` runs before step `step` (1-based): e.g. set the mask temperature / target sparsity.
  `on_step(step, logs)` runs after the update; a dict it returns is merged into that step's history record
  (e.g. expected shape). Both also run (from the checkpointed step on) after a resume, so keep them
  functions of `step` plus checkpointed state.
- `state_objects`: {name: object with state_dict()/load_state_dict()} saved in checkpoints and restored on
  resume (tensors at any depth -> safetensors, the rest -> JSON). `batches` is saved the same way when it has
  those methods; otherwise resume fast-forwards it by the number of micro-batches already consumed (so it must
  be deterministic). State objects must be identical on every process (only rank 0 writes them).

Checkpoints: every `save_every` steps and at the end, into `ctx.work_dir/<cfg.name>/step-NNNNNNNN/`
(model.safetensors = trainable parameters, optimizer.safetensors + .json, objects.*, rng-<rank>.safetensors,
state.json written last; the folder is renamed into place, older ones are deleted). No pickle anywhere. Under
FSDP the checkpoint is sharded: each process writes its own shards (model-RRRRR.*, optimizer-RRRRR.*), so no
process gathers the whole AdamW state (16 bytes/parameter for fp32) and resume reads them back in place.
The next `fit` with the same work_dir, config and parameter shapes continues from the newest one; on CPU the
result is bit-identical to an uninterrupted run (tests/test_train.py). The learning-rate schedule is a pure
function of the step, so the step *is* the scheduler state.

Dynamic batch loading (Xia et al. 2023, arXiv 2310.06694, section 2.2, Algorithm 1), for train and prune:
`DomainMixture` samples each row's domain in proportion to weights w; `DynamicBatchLoading` (an on_step
helper) measures per-domain validation loss every m steps and applies `update_domain_weights`.

Not supported: fp16 (needs a loss scaler; use bf16), DeepSpeed and FSDP1 (refused), checkpointing buffers (LM
buffers do not change in training), resuming with a different number of processes (starts over), a model
whose weights do not fit one device before sharding (every process loads the stage input whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from compress import distributed
from compress.errors import CompressError

CKPT_FORMAT = 1
MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass
class TrainConfig:
    steps: int                                # optimizer updates; each sees grad_accum micro-batches per process
    lr: float = 1e-4                          # peak learning rate of the model's parameters (reached after warmup)
    warmup_steps: int = 0                     # linear warmup from lr/warmup_steps to lr: avoids early Adam blow-ups
    min_lr_ratio: float = 0.1                 # cosine decay ends at lr * min_lr_ratio on the last step
    weight_decay: float = 0.0                 # AdamW decoupled decay on matrices only (norms, biases are not decayed)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments; 0.95 is the usual LLM choice (stabler than 0.999)
    eps: float = 1e-8                         # AdamW denominator floor
    grad_accum: int = 1                       # micro-batches per update: a bigger batch without more memory
    max_grad_norm: float | None = 1.0         # clip the model's global gradient norm; None or 0 = no clipping
    save_every: int = 0                       # checkpoint every N steps (and at the end) into ctx.work_dir; 0 = never
    mixed_precision: str = "auto"             # auto: bf16 autocast on CUDA, none on CPU | bf16 (also on CPU) | no
    name: str = "train"                       # progress label and checkpoint folder (two fits in a stage: two names)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise CompressError(f"training steps must be an integer >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise CompressError(f"lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise CompressError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CompressError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise CompressError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_accum < 1:
            raise CompressError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise CompressError(f"max_grad_norm must be >= 0 (0 or null = no clipping), got {self.max_grad_norm}")
        if self.save_every < 0:
            raise CompressError(f"save_every must be >= 0 (0 = no mid-stage checkpoints), got {self.save_every}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise CompressError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if not self.name or "/" in self.name:
            raise CompressError(f"training name must be a non-empty folder name, got {self.name!r}")


@dataclass
class FitResult:
    steps: int                    # steps done in total (including those before a resume)
    tokens: int                   # input tokens seen in total, all processes
    seconds: float                # wall time of this call (not counting the run before a resume)
    tokens_per_s: float           # throughput of this call, all processes
    resumed_from: int | None      # step of the checkpoint this call started from, None = from scratch
    history: list[dict] = field(default_factory=list)  # one record per step: step, loss, lr, tokens, grad_norm, logs

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def process_state(ctx):
    """accelerate's PartialState for this run; call it before anything else asks for one.

    The state is a per-process singleton fixed by its first creation, and on a machine without CUDA only
    cpu=True makes processes started by a launcher form a gloo group (else each trains alone).
    """
    from accelerate import PartialState

    return PartialState(cpu=ctx.device.type == "cpu")


def lr_multiplier(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak lr at 1-based `step`: linear warmup to 1, then cosine down to min_lr_ratio at `steps`."""
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    if steps <= warmup_steps:
        return 1.0
    progress = (step - warmup_steps) / (steps - warmup_steps)  # in (0, 1]
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy of a causal LM on a batch of token blocks (HF shifts the labels)."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch  # [B, T]
    return model(input_ids=ids, labels=ids).loss, {}


def fit(
    model: torch.nn.Module,
    batches: Iterable,
    loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    ctx,
    *,
    extra_param_groups: Iterable[dict] = (),
    before_step: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict], dict | None] | None = None,
    state_objects: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` in place for cfg.steps AdamW updates; see the module docstring for every argument.

    Returns a FitResult; the model is left on the training device in the train/eval mode it came in.
    Raises CompressError when the loss or the gradient norm is not finite (naming the step; nothing is
    updated at that step), or when `batches` runs out.
    """
    process_state(ctx)
    accelerator = distributed.accelerator(cpu=ctx.device.type == "cpu")
    device = accelerator.device
    fsdp = distributed.is_fsdp(accelerator)
    state_objects = dict(state_objects or {})
    if hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict"):
        state_objects["batches"] = batches

    # -- parameters and optimizer
    extra = [dict(g, params=list(g["params"])) for g in extra_param_groups]
    for g in extra:
        g.setdefault("weight_decay", 0.0)
        if g.setdefault("schedule", "cosine") not in ("cosine", "constant"):
            raise CompressError(f"{cfg.name}: a group's schedule is 'cosine' or 'constant', not {g['schedule']!r}")
    extra_ids = {id(p) for g in extra for p in g["params"]}
    in_model = {id(p) for p in model.parameters()}
    outside = [p for g in extra for p in g["params"] if id(p) not in in_model]
    if fsdp and len(outside) != sum(len(g["params"]) for g in extra):
        raise CompressError(f"{cfg.name}: under FSDP the extra parameter groups must hold parameters outside the "
                            "model (FSDP shards the model's own)")
    for p in outside:  # same Parameter objects, so the caller's references stay valid
        p.data = p.data.to(device)
    was_training = model.training
    if fsdp:  # FSDP2 shards `model` in place; the optimizer is built on the shards (accelerate: model first, alone)
        snapshot = distributed.Snapshot(model)
        wrapped = accelerator.prepare(model)
        snapshot.release_weights()  # the shards are copies: drop the full tensors until training ends
        named = [(n, p) for n, p in distributed.canonical_parameters(wrapped) if p.requires_grad]
        optimizer = _adamw(named, extra, cfg)
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in extra_ids]
        wrapped, optimizer = accelerator.prepare(model, _adamw(named, extra, cfg))
    main_params = [p for _, p in named]

    # -- resume
    ckpt_root = Path(ctx.work_dir) / cfg.name if ctx.work_dir is not None and cfg.save_every else None
    key = _fingerprint(cfg, named, extra, accelerator.num_processes, fsdp)
    tensors = _trainable_tensors(named, extra)
    step, tokens, micro, history, resumed_from = 0, 0, 0, [], None
    latest = _latest_checkpoint(ckpt_root) if ckpt_root else None
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text())
        if saved.get("key") != key:
            ctx.log(f"[{cfg.name}] ignoring checkpoint {latest.name}: it was made with another config or model")
        else:
            _load_checkpoint(latest, tensors, optimizer, state_objects, accelerator, ctx, sharded=fsdp)
            step, tokens, micro, history = saved["step"], saved["tokens"], saved["micro_batches"], saved["history"]
            resumed_from = step
            ctx.log(f"[{cfg.name}] resumed from step {step}/{cfg.steps}")
    it = iter(batches)
    if resumed_from and "batches" not in state_objects:
        for _ in itertools.islice(it, micro):  # replay a stateless, deterministic iterator to where it was
            pass

    # -- loop
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    steps = range(step + 1, cfg.steps + 1)
    bar = ctx.progress(steps, desc=cfg.name, total=len(steps), unit="step") if accelerator.is_main_process else steps
    wrapped.train()
    optimizer.zero_grad(set_to_none=True)
    t0, tokens0 = time.perf_counter(), tokens
    for step in bar:
        if before_step is not None:
            before_step(step)
        mult = lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * (mult if g.get("schedule", "cosine") == "cosine" else 1.0)
        loss_sum, logs_sum, step_tokens = torch.zeros((), device=device), {}, 0
        for i in range(cfg.grad_accum):
            try:
                batch = next(it)
            except StopIteration:
                raise CompressError(
                    f"{cfg.name}: the batches ran out at step {step} (micro-batch {i + 1}); "
                    "give more data or fewer steps"
                ) from None
            micro += 1
            batch = _to_device(batch, device)
            step_tokens += _count_tokens(batch)
            # DDP all-reduces gradients on the last micro-batch only; FSDP reduce-scatters every micro-batch into
            # the sharded gradients (skipping it would accumulate full-size unsharded gradients on every process)
            sync = fsdp or i == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, logs = loss_fn(wrapped, batch)
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float()
            for k, v in (logs or {}).items():
                logs_sum[k] = logs_sum.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        loss_value = float(accelerator.reduce(loss_sum / cfg.grad_accum, "mean"))
        if not math.isfinite(loss_value):
            raise CompressError(
                f"{cfg.name}: loss is {loss_value} at step {step} (lr {cfg.lr:g}); "
                "lower lr, keep max_grad_norm on, or check the data"
            )
        for p in outside:  # DDP syncs the model's gradients; parameters outside it are averaged here
            if p.grad is not None and accelerator.num_processes > 1:
                p.grad = accelerator.reduce(p.grad, "mean")
        record = {"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
        if cfg.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(main_params, cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise CompressError(
                    f"{cfg.name}: gradient norm is {grad_norm} at step {step} (lr {cfg.lr:g}); "
                    "lower lr or check the data"
                )
            record["grad_norm"] = grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens * accelerator.num_processes
        record["tokens"] = tokens
        record.update({k: float(v) / cfg.grad_accum for k, v in logs_sum.items()})
        if on_step is not None:
            record.update(on_step(step, record) or {})
        history.append(record)
        tok_s = (tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if ckpt_root is not None and (step % cfg.save_every == 0 or step == cfg.steps):
            state = {"format": CKPT_FORMAT, "key": key, "step": step, "tokens": tokens, "micro_batches": micro,
                     "history": history}
            _save_checkpoint(ckpt_root, state, tensors, optimizer, state_objects, accelerator, sharded=fsdp)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if fsdp:  # every process gets the full trained weights back into the plain model it passed in
        optimizer.state.clear()
        del optimizer
        snapshot.restore(distributed.full_parameters(wrapped))
        del wrapped
    model.train(was_training)
    accelerator.free_memory()  # drop accelerate's references to the wrapped model and optimizer
    return FitResult(
        steps=cfg.steps, tokens=tokens, seconds=seconds, tokens_per_s=(tokens - tokens0) / max(seconds, 1e-9),
        resumed_from=resumed_from, history=history,
    )


def downsample(history: list[dict], key: str = "loss", points: int = 100) -> list[list[float]]:
    """[[step, mean of `key`], ...]: at most `points` buckets of consecutive steps, for manifests and plots."""
    rows = [(r["step"], r[key]) for r in history if key in r]
    if not rows:
        return []
    size = math.ceil(len(rows) / points)
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        out.append([chunk[-1][0], sum(v for _, v in chunk) / len(chunk)])
    return out


# -- dynamic batch loading (Sheared-LLaMA, Xia et al. 2023, arXiv 2310.06694, section 2.2, Algorithm 1)


def update_domain_weights(
    w: torch.Tensor, loss: torch.Tensor, ref: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-4
) -> torch.Tensor:
    """One step of Algorithm 1: Δ = max(ℓ - ℓ_ref, 0); α = w · exp(η Δ); w' = α / Σα; then smoothing.

    The paper uses η = 1; its code (LLM-Shearing) also mixes in a uniform floor as DoReMi does,
    w' = (1 - c) w' + c / k with c = 1e-4, so no domain's weight reaches exactly zero. smoothing=0 gives
    the paper's formula alone (then a domain with zero excess keeps its weight ratio to the others exactly).
    All [k]; computed in float64.
    """
    w, loss, ref = (torch.as_tensor(x, dtype=torch.float64) for x in (w, loss, ref))
    delta = (loss - ref).clamp(min=0)                          # Δ_t[i]: excess loss over the reference
    alpha = torch.softmax(torch.log(w) + eta * delta, dim=0)   # = w·exp(ηΔ) / Σ w·exp(ηΔ), overflow-safe
    k = w.numel()
    alpha = (1 - smoothing) * alpha + smoothing / k
    return alpha / alpha.sum()


def _seed(*ints: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for some types)."""
    digest = hashlib.sha256(",".join(map(str, ints)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DomainMixture:
    """Endless micro-batches {"input_ids": [B, T]} whose rows are drawn from k domains in proportions `weights`.

    Every draw samples the domain of each of the B * world_size rows of one global micro-batch
    (multinomial, with replacement) from a generator seeded by (seed, draw number), then takes each
    domain's next block in a per-epoch shuffled order; this process keeps rows [rank*B, (rank+1)*B). All
    processes do the same draws, so the state (JSON: weights, draw count, cursors) is the same everywhere
    and a resume continues the exact sequence. Set `weights` (any positive [k]) to change the mixture.
    """

    def __init__(self, blocks: dict[str, torch.Tensor], batch_size: int, weights=None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not blocks:
            raise CompressError("a domain mixture needs at least one domain")
        for name, x in blocks.items():
            if x.ndim != 2 or len(x) == 0:
                raise CompressError(
                    f"domain {name!r} has no token blocks (shape {tuple(x.shape)}); "
                    "give it more text or a shorter seq_len"
                )
        self.names = list(blocks)
        self.blocks = [blocks[n] for n in self.names]  # each [n_i, T]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.weights = torch.ones(len(self.names), dtype=torch.float64) if weights is None else weights  # normalised
        self.draws = 0
        self.cursors = [0] * len(self.names)
        self.epochs = [0] * len(self.names)
        self.rows_seen = [0] * len(self.names)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    @weights.setter
    def weights(self, w) -> None:
        w = torch.as_tensor(w, dtype=torch.float64).flatten()
        if w.numel() != len(self.names) or not bool((w >= 0).all()) or not w.sum() > 0:
            raise CompressError(
                f"domain weights must be {len(self.names)} non-negative numbers with a positive sum, got {w.tolist()}"
            )
        self._weights = w / w.sum()

    def tokens_seen(self) -> dict[str, int]:
        """Tokens drawn so far per domain, all processes together."""
        return {n: r * self.blocks[i].shape[1] for i, (n, r) in enumerate(zip(self.names, self.rows_seen))}

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(_seed(self.seed, self.draws))
        domains = torch.multinomial(self._weights, self.batch_size * self.world_size, replacement=True, generator=g)
        rows = [self._take(d) for d in domains.tolist()]  # every process takes every row, keeping cursors in step
        self.draws += 1
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return {"input_ids": torch.stack(mine)}  # [B, T]

    def _take(self, d: int) -> torch.Tensor:
        n = len(self.blocks[d])
        if self.cursors[d] == n:
            self.cursors[d], self.epochs[d] = 0, self.epochs[d] + 1
        epoch, perm = self._perms.get(d, (None, None))
        if epoch != self.epochs[d]:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, d, self.epochs[d])))
            self._perms[d] = (self.epochs[d], perm)
        row = self.blocks[d][perm[self.cursors[d]]]
        self.cursors[d] += 1
        self.rows_seen[d] += 1
        return row

    def state_dict(self) -> dict:
        return {"names": self.names, "weights": self._weights.tolist(), "draws": self.draws,
                "cursors": self.cursors, "epochs": self.epochs, "rows_seen": self.rows_seen}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise CompressError(
                f"checkpointed domains {state['names']} differ from {self.names}; delete the stage's work folder"
            )
        self.weights = state["weights"]
        self.draws, self.cursors = state["draws"], state["cursors"]
        self.epochs, self.rows_seen = state["epochs"], state["rows_seen"]


@torch.no_grad()
def domain_losses(
    model, val_blocks: dict[str, torch.Tensor], batch_size: int, loss_fn=causal_lm_loss
) -> dict[str, float]:
    """Mean validation loss per domain (`loss_fn` as in fit, on {"input_ids": [b, T]}), sharded over processes.

    Every block weighs the same (equal-length blocks, so this is the token mean for causal_lm_loss). Runs in
    eval mode with bf16 autocast on CUDA; restores the model's mode. Under several processes, create the
    state first with process_state(ctx).
    """
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    lockstep = distributed.is_sharded(model)  # under FSDP a forward is a collective: every process runs as many
    for name, x in val_blocks.items():  # x: [n, T]
        mine = x[state.process_index::state.num_processes]
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of block losses, blocks]
        rows = math.ceil(len(x) / state.num_processes) if lockstep else len(mine)  # the most any process has
        for i in range(0, rows, batch_size):
            b = mine[i:i + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = loss_fn(model, {"input_ids": b if len(b) else x[:1].to(device)})
            total[0] += loss.double() * len(b)  # a stand-in block (len(b) == 0) counts for nothing
            total[1] += len(b)
        total = reduce(total, "sum")
        if total[1] == 0:
            raise CompressError(f"domain {name!r} has no validation blocks; give it more text or a shorter seq_len")
        out[name] = float(total[0] / total[1])
    model.train(was_training)
    return out


class DynamicBatchLoading:
    """Algorithm 1's outer loop: every `update_every` steps measure each domain's validation loss ℓ_t and
    reweight `mixture` with update_domain_weights(w, ℓ_t, ℓ_ref). Use as (or inside) fit's on_step:

        dbl = DynamicBatchLoading(mixture, val_blocks, reference, update_every=50)
        fit(model, mixture, loss_fn, cfg, ctx, on_step=lambda s, logs: dbl(model, s), state_objects={"dbl": dbl})

    `loss_fn` measures ℓ_t (prune passes its masked-model loss, the paper's L(θ, z, D_val)). `history` holds
    [{"step", "weights": {domain: w}, "loss": {domain: ℓ} | None}], step 0 = the initial weights.
    """

    def __init__(self, mixture: DomainMixture, val_blocks: dict[str, torch.Tensor], reference: dict[str, float],
                 update_every: int, eta: float = 1.0, smoothing: float = 1e-4, batch_size: int = 8,
                 loss_fn=causal_lm_loss):
        if set(val_blocks) != set(mixture.names) or set(reference) != set(mixture.names):
            raise CompressError(
                f"dynamic batch loading needs validation blocks and a reference loss for every domain: {mixture.names}"
            )
        self.mixture, self.val_blocks, self.update_every = mixture, val_blocks, update_every
        self.ref = torch.tensor([reference[n] for n in mixture.names], dtype=torch.float64)
        self.eta, self.smoothing, self.batch_size, self.loss_fn = eta, smoothing, batch_size, loss_fn
        self.history = [{"step": 0, "weights": self._named(mixture.weights), "loss": None}]

    def _named(self, w: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.mixture.names, w.tolist()))

    def __call__(self, model, step: int) -> dict | None:
        if step % self.update_every:
            return None
        losses = domain_losses(model, self.val_blocks, self.batch_size, self.loss_fn)
        loss = torch.tensor([losses[n] for n in self.mixture.names], dtype=torch.float64)
        self.mixture.weights = update_domain_weights(self.mixture.weights, loss, self.ref, self.eta, self.smoothing)
        self.history.append({"step": step, "weights": self._named(self.mixture.weights), "loss": losses})
        return {f"weight/{n}": w for n, w in self._named(self.mixture.weights).items()}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]


# -- optimizer and checkpoint internals (safetensors for tensors, JSON for the rest; no pickle)


def _adamw(named, extra: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable `named` parameters (matrices decayed, vectors not) and the extra groups."""
    params = [p for _, p in named]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups + extra if g["params"]]
    if not groups:
        raise CompressError(f"{cfg.name}: nothing to train (no parameter requires grad)")
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch) -> int:
    """Tokens in a micro-batch: its attention mask's ones when it has one (padded rows), else every id."""
    if isinstance(batch, dict) and torch.is_tensor(batch.get("attention_mask")):
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def _fingerprint(cfg: TrainConfig, named, extra, world_size: int, sharded: bool = False) -> str:
    """What a checkpoint must match to be resumed: config, trainable shapes, extra groups, process count, and
    whether it holds FSDP shards (one file per process) or whole tensors."""
    desc = {
        "cfg": json.loads(json.dumps(asdict(cfg))),
        "params": [[n, list(p.shape)] for n, p in named],
        "extra": [[list(p.shape) for p in g["params"]] for g in extra],
        "world_size": world_size,
    }
    if sharded:
        desc["fsdp"] = True
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _trainable_tensors(named, extra) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p for n, p in named}
    for gi, g in enumerate(extra):
        for pi, p in enumerate(g["params"]):
            out[f"extra.{gi}.{pi}"] = p
    return out


def _flatten(obj, tensors: dict, prefix: str):
    """JSON skeleton of `obj`; tensors are moved to `tensors` and replaced by {"__tensor__": key}."""
    if torch.is_tensor(obj):
        local = obj.to_local() if distributed.is_dtensor(obj) else obj  # an FSDP shard: this process's part
        tensors[prefix] = local.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}  # int keys
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r} (tensors, dicts, lists, JSON scalars)")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _save_tree(obj, folder: Path, stem: str) -> None:
    tensors: dict = {}
    skeleton = _flatten(obj, tensors, stem)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps(skeleton))


def _load_tree(folder: Path, stem: str):
    return _unflatten(json.loads((folder / f"{stem}.json").read_text()), load_file(str(folder / f"{stem}.safetensors")))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    version, internal, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor([version, *internal], dtype=torch.int64)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _save_checkpoint(root: Path, state: dict, tensors: dict, optimizer, objects: dict, accelerator,
                     sharded: bool = False) -> None:
    """Write step-NNNNNNNN/ through a temporary folder; state.json last, then rename, then drop older ones.

    Whole tensors come from the main process (DDP keeps replicas identical); under FSDP (`sharded`) every process
    writes its own shards of the parameters and AdamW states (model-RRRRR.safetensors, optimizer-RRRRR.*): no
    process gathers the whole optimizer state, and resuming needs the same number of processes (the checkpoint
    key already requires it).
    """
    tmp = root / f".tmp-step-{state['step']:08d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_state(accelerator.device), str(tmp / f"rng-{rank}.safetensors"))
    if sharded:
        _save_tree({k: p.detach() for k, p in tensors.items()}, tmp, f"model-{rank:05d}")
        _save_tree(optimizer.state_dict(), tmp, f"optimizer-{rank:05d}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not sharded:
            whole = {k: p.detach().to("cpu").contiguous() for k, p in tensors.items()}
            save_file(whole, str(tmp / "model.safetensors"))
            _save_tree(optimizer.state_dict(), tmp, "optimizer")
        _save_tree({k: o.state_dict() for k, o in objects.items()}, tmp, "objects")
        (tmp / "state.json").write_text(json.dumps(state))
        final = root / f"step-{state['step']:08d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(folder: Path, tensors: dict, optimizer, objects: dict, accelerator, ctx,
                     sharded: bool = False) -> None:
    rank = accelerator.process_index
    if sharded:
        if not (folder / f"model-{rank:05d}.safetensors").is_file():
            raise CompressError(f"checkpoint {folder} has no shards for process {rank}; delete {folder.parent}")
        weights = _load_tree(folder, f"model-{rank:05d}")
        opt_state = _load_tree(folder, f"optimizer-{rank:05d}")
    else:
        weights = load_file(str(folder / "model.safetensors"))
        opt_state = _load_tree(folder, "optimizer")
    if set(weights) != set(tensors):
        raise CompressError(
            f"checkpoint {folder} holds other parameters than the model being trained; delete {folder.parent}"
        )
    with torch.no_grad():
        for k, p in tensors.items():
            target = p.to_local() if distributed.is_dtensor(p) else p  # an FSDP shard: this process's part, in place
            target.copy_(weights[k].to(target.device, target.dtype))
    if sharded:
        opt_state = distributed.as_shards(opt_state, optimizer)
    optimizer.load_state_dict(opt_state)
    saved_objects = _load_tree(folder, "objects")
    for name, obj in objects.items():
        if name not in saved_objects:
            raise CompressError(f"checkpoint {folder} has no state for {name!r}; delete {folder.parent}")
        obj.load_state_dict(saved_objects[name])
    rng = folder / f"rng-{accelerator.process_index}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)), accelerator.device)
    else:
        ctx.log(f"[{folder.parent.name}] {folder.name} has no RNG state for process {accelerator.process_index}; "
                "continuing with the current one")
