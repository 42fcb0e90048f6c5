"""Sheared-LLaMA targeted structured pruning: hard-concrete (L0) masks, Lagrangian shape targets, materialisation.

Xia, Gao, Zeng, Chen 2023, "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning",
https://arxiv.org/abs/2310.06694. Gates are the hard-concrete distribution of Louizos, Welling, Kingma 2018,
"Learning Sparse Neural Networks through L0 Regularization", https://arxiv.org/abs/1712.01312.

Plain torch, no files or YAML. The pieces, in the order a pruning run uses them:

    Shape / resolve_target / derive_shape   the target: layers, hidden, heads, kv_heads, intermediate
    Shearer                                 the gates z (log_alpha) and multipliers lambda for one model
      .sample()          training masks (reparameterised, gradients reach log_alpha)
      .lagrangian(p)     sum over quantities of lambda1 (s_hat - t) + lambda2 (s_hat - t)^2   (paper eq. 2)
      .deterministic()   eval masks that keep exactly the target count of every quantity
    MaskedForward                           forward hooks applying a Masks to an unmodified HF decoder
    materialize(model, masks)               -> a smaller dense model of the same class (plain from_pretrained)
    first_k_masks(base, target)             the naive baseline: keep the first k of everything

Design choices:

* Where the masks act (as the paper): z_head scales each query head's output before o_proj, z_int the MLP
  intermediate before down_proj, z_layer each layer's two residual updates, z_hidden the embedding output,
  every RMSNorm output and every residual update (o_proj / down_proj outputs).
* GQA. Query head h belongs to kv group h // r (r = heads / kv_heads, HF's repeat_kv order). Two gates: z_kv
  per (layer, kv group) prunes whole groups (q heads + k/v heads), z_head per (layer, query head) prunes query
  heads inside groups; a head's effective gate is z_kv[g(h)] * z_head[h]. Deterministic masks keep the top kv_heads
  groups and, inside each kept group, the top heads/kv_heads query heads, so every layer ends with the same
  (heads, kv_heads) and heads % kv_heads == 0: a valid uniform config. A gate exists only for a quantity the
  target shrinks (MHA: r = 1, only z_kv).
* RMSNorm. A pruned hidden dim is exactly 0 in the residual stream, so a smaller model's RMSNorm averages x^2
  over the kept dims only. The masked forward does the same (as the paper's code): each norm's output is
  rescaled by sqrt((mean_all(x^2) + eps) / (mean_kept(x^2) + eps)), then by z_hidden. With that the materialised
  model equals the masked one exactly (up to float rounding), not approximately.
* Folding kept mask values: z_head into o_proj columns, z_int into down_proj columns, z_layer * z_hidden into
  o_proj / down_proj rows (and biases), z_hidden into the embedding and every RMSNorm weight except the final
  norm of a tied model (there the tied embedding already carries z_hidden into lm_head).
* Deterministic mask values: kept units take Louizos' test-time estimate clamp(sigmoid(log_alpha) (zeta - gamma)
  + gamma, 0, 1) (the paper's code uses a different soft value); units outside the top-k are 0. Which units
  survive is carried separately (Masks.keep), so a kept unit whose estimate is 0 still counts as kept (shape
  and RMS denominator stay right; its weights fold to 0).
* Targets: a shape (any of the five numbers) or a parameter count, turned into a shape by derive_shape (widths
  x f, depth x sqrt f, closest count). Shearer.target_fractions(progress) ramps each target linearly from the
  full model to the final shape (the paper's warmup); the caller passes progress = step / warmup_steps.
* Lagrangian terms are per quantity on kept fractions (expected count / full count) as the paper's code does, per
  layer for per-layer quantities (averaged), so one multiplier pair scale fits layers, heads and dims alike.

Supported: LlamaForCausalLM (SmolLM2 included), MistralForCausalLM, Qwen2ForCausalLM. Not supported: other
norms (LayerNorm with bias, Gemma's 1 + w), per-layer non-uniform shapes, quantized models, pruning head_dim.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from types import SimpleNamespace

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from compress.errors import CompressError

BETA = 2 / 3                                   # temperature of the concrete distribution
GAMMA, ZETA = -0.1, 1.1                        # stretch limits of s in (0, 1) before clamping to [0, 1]
EPS = 1e-6                                     # keeps the uniform noise away from 0 and 1
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -math.log(100), math.log(100)  # keeps every gate's gradient alive
SUPPORTED = ("llama", "mistral", "qwen2")
TARGET_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate")


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    """The five numbers structured pruning changes; everything else (vocab, head_dim) is kept."""

    layers: int
    hidden: int
    heads: int          # query heads per layer
    kv_heads: int       # key/value heads per layer
    intermediate: int

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
        )

    def config_fields(self) -> dict:
        return {"num_hidden_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "intermediate_size": self.intermediate}

    def as_dict(self) -> dict:
        return asdict(self)


def _default_kv_heads(heads: int, base: Shape) -> int | None:
    """kv heads for `heads` query heads: whole kv groups (the base GQA ratio) if possible, else the most groups."""
    r = base.heads // base.kv_heads
    if heads % r == 0 and heads // r <= base.kv_heads:
        return heads // r
    for k in range(base.kv_heads, 0, -1):
        if heads % k == 0 and heads // k <= r:
            return k
    return None


def resolve_target(base: Shape, target: dict) -> Shape:
    """A target shape from a dict of some of layers/hidden/heads/kv_heads/intermediate (missing = keep)."""
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise CompressError(f"prune target has unknown key(s) {', '.join(unknown)}; valid: {', '.join(TARGET_KEYS)}")
    vals = {}
    for key in ("layers", "hidden", "heads", "intermediate"):
        v = target.get(key, getattr(base, key))
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= getattr(base, key):
            raise CompressError(f"prune target {key}={v!r} must be an integer in 1..{getattr(base, key)} (the model's)")
        vals[key] = v
    r = base.heads // base.kv_heads
    kv = target.get("kv_heads")
    if kv is None:
        kv = _default_kv_heads(vals["heads"], base)
        if kv is None:
            raise CompressError(
                f"prune target heads={vals['heads']} cannot be split into kv groups of this model "
                f"({base.kv_heads} kv heads x {r} query heads); use kv_heads * (query heads per group <= {r})"
            )
    if not isinstance(kv, int) or not 1 <= kv <= base.kv_heads:
        raise CompressError(f"prune target kv_heads={kv!r} must be an integer in 1..{base.kv_heads} (the model's)")
    if vals["heads"] % kv or vals["heads"] // kv > r:
        raise CompressError(
            f"prune target heads={vals['heads']} with kv_heads={kv}: heads must be kv_heads x (1..{r}) "
            f"(each kv group keeps at most its {r} query heads)"
        )
    return Shape(kv_heads=kv, **vals)


@dataclass(frozen=True)
class Arch:
    """What a parameter count needs besides the Shape: vocab, head_dim, tying and which linears have biases."""

    vocab: int
    head_dim: int
    tied: bool
    bias: dict  # q, k, v, o, gate, up, down, lm_head -> bool

    @classmethod
    def of(cls, model) -> "Arch":
        p = parts(model)
        a, m = p.layers[0].self_attn, p.layers[0].mlp
        linears = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                   "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj, "lm_head": p.lm_head}
        return cls(vocab=p.embed.weight.shape[0], head_dim=head_dim(model), tied=is_tied(model),
                   bias={k: lin.bias is not None for k, lin in linears.items()})

    def layer_params(self, d, H, K, I):
        """Parameters of one decoder layer (floats allowed: expected sizes)."""
        b, hd = self.bias, self.head_dim
        attn = d * hd * (H + 2 * K) + hd * (H * b["q"] + K * b["k"] + K * b["v"]) + H * hd * d + d * b["o"]
        mlp = 3 * d * I + I * (b["gate"] + b["up"]) + d * b["down"]
        return attn + mlp + 2 * d  # + input and post-attention RMSNorm weights

    def outer_params(self, d):
        """Embedding, final norm and (untied) lm_head."""
        return self.vocab * d * (1 if self.tied else 2) + d + self.vocab * self.bias["lm_head"]

    def count(self, s: Shape) -> int:
        return int(self.outer_params(s.hidden) + s.layers * self.layer_params(s.hidden, s.heads, s.kv_heads, s.intermediate))


def target_config(model, shape: Shape, layers: list[int] | None = None):
    """The model's config with `shape` (head_dim kept; per-layer lists such as layer_types cut to `layers`)."""
    cfg = copy.deepcopy(model.config)
    for k, v in shape.config_fields().items():
        setattr(cfg, k, v)
    cfg.head_dim = head_dim(model)
    if isinstance(getattr(cfg, "layer_types", None), list):
        keep = layers if layers is not None else range(shape.layers)
        cfg.layer_types = [cfg.layer_types[l] for l in keep]
    return cfg


def shape_error(model, shape: Shape) -> str | None:
    """Why the model's config class refuses `shape` (its own validators, e.g. Llama's hidden % heads), or None."""
    validate = getattr(target_config(model, shape), "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except (StrictDataclassError, ValueError) as e:
        return str(e.__cause__ or e).strip().splitlines()[-1]
    return None


def check_shape(model, shape: Shape) -> None:
    err = shape_error(model, shape)
    if err:
        raise CompressError(f"prune target {shape.as_dict()} is not a valid {type(model.config).__name__}: {err}")


def _align(n: int) -> int:
    """Granularity a shrunk width is rounded to: the largest of 64, 32, 8 dividing it with >= 32 steps, else 1."""
    return next(a for a in (64, 32, 8, 1) if n % a == 0 and n >= 32 * a)


def derive_shape(model, n_params: int) -> Shape:
    """A Shape whose parameter count is closest to `n_params`.

    Rule: widths (hidden, heads, intermediate) shrink by one factor f and depth by sqrt(f), as Sheared-LLaMA's
    7B -> 1.3B target does (width x 1/2, depth x 3/4); hidden and intermediate are rounded to multiples of 64
    (32, 8 for smaller widths, see _align), heads to the nearest count that fits the kv groups (whole groups
    first). f is scanned
    in steps of 0.001 and the closest count wins (the larger model on ties).
    """
    base, arch = Shape.of(model.config), Arch.of(model)
    full = arch.count(base)
    if not 0 < n_params < full:
        raise CompressError(f"prune target of {n_params:,} parameters must be below the model's {full:,}")
    r = base.heads // base.kv_heads
    feasible_heads = sorted({k * q for k in range(1, base.kv_heads + 1) for q in range(1, r + 1)})

    def shrink(n, f, a):
        return min(n, max(a, a * round(n * f / a)))

    best, best_err, valid = None, None, {}
    for i in range(1000, 0, -1):
        f = i / 1000
        heads = min(feasible_heads, key=lambda h: (abs(h - base.heads * f), -h))
        depth = round(base.layers * math.sqrt(f))
        a = _align(base.hidden)
        for hidden, layers in itertools.product(
            (shrink(base.hidden, f, a), shrink(base.hidden, f, math.lcm(a, heads))),  # 2nd: for hidden % heads == 0
            (depth, depth - 1, depth + 1),                                            # +-1 layer: finer steps
        ):
            s = Shape(layers=min(max(1, layers), base.layers), hidden=hidden, heads=heads,
                      kv_heads=_default_kv_heads(heads, base), intermediate=shrink(base.intermediate, f, _align(base.intermediate)))
            err = abs(arch.count(s) - n_params)
            if best_err is not None and err >= best_err:
                continue
            if s not in valid:  # the config class's own rules, e.g. LlamaConfig wants hidden % heads == 0
                valid[s] = shape_error(model, s) is None
            if valid[s]:
                best, best_err = s, err
    if best is None:
        raise CompressError(f"no valid shape of {type(model.config).__name__} found near {n_params:,} parameters; give a shape")
    return best


# ------------------------------------------------------------------------------------------------ model access


def check_supported(model) -> None:
    """Raise CompressError unless `model` is a plain (unquantized) Llama-family causal LM this module can prune."""
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED:
        raise CompressError(f"prune supports model types {', '.join(SUPPORTED)}, not {mt!r}")
    if getattr(model.config, "quantization_config", None):
        raise CompressError("prune needs an unquantized model; put prune before gptq/int8")
    try:
        p = parts(model)
        for layer in p.layers:
            _ = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                 layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.input_layernorm,
                 layer.post_attention_layernorm)
    except AttributeError as e:
        raise CompressError(f"prune cannot find the Llama block structure in this model ({e})") from None


def parts(model) -> SimpleNamespace:
    """The modules pruning touches, by role (one accessor for Llama, Mistral, Qwen2)."""
    return SimpleNamespace(embed=model.model.embed_tokens, layers=model.model.layers, norm=model.model.norm,
                           lm_head=model.lm_head)


def head_dim(model) -> int:
    return parts(model).layers[0].self_attn.head_dim


def is_tied(model) -> bool:
    p = parts(model)
    return p.lm_head.weight.data_ptr() == p.embed.weight.data_ptr()


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", 1e-6) if eps is None else eps


# ------------------------------------------------------------------------------------------------ gates


class HardConcrete(nn.Module):
    """A block of L0 gates z in [0, 1] ~ stretched, clamped concrete(log_alpha, BETA) (Louizos et al. sec. 4)."""

    def __init__(self, shape: tuple[int, ...], init: float = 3.0, generator: torch.Generator | None = None):
        super().__init__()
        self.log_alpha = nn.Parameter(init + 0.01 * torch.randn(shape, generator=generator))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training gates: s = sigmoid((log u - log(1-u) + log_alpha) / beta), z = clamp(s (zeta-gamma) + gamma, 0, 1)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(EPS, 1 - EPS).to(self.log_alpha.device)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def score(self) -> torch.Tensor:
        """P(z != 0) = 1 - Q(0 | log_alpha): each gate's expected L0 contribution (differentiable)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def estimate(self) -> torch.Tensor:
        """Louizos' deterministic test-time gate: clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    @torch.no_grad()
    def constrain(self) -> None:
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly the k largest entries of each row (last dim)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)


@dataclass
class Masks:
    """One realisation of the gates. None = that quantity is not pruned (all ones)."""

    layer: torch.Tensor | None = None         # (L,)   scales each layer's attention and MLP residual updates
    head: torch.Tensor | None = None          # (L, H) scales each query head's output before o_proj (z_kv x z_head)
    intermediate: torch.Tensor | None = None  # (L, I) scales the MLP intermediate before down_proj
    hidden: torch.Tensor | None = None        # (d,)   scales the residual stream's dimensions
    keep: dict = field(default_factory=dict)  # name -> bool tensor (same shape): units that survive; default z != 0

    def kept(self, name: str) -> torch.Tensor:
        return self.keep[name] if name in self.keep else getattr(self, name) != 0

    @classmethod
    def ones(cls, base: Shape) -> "Masks":
        """Every gate present and open: the masked model must equal the original."""
        L = base.layers
        return cls(layer=torch.ones(L), head=torch.ones(L, base.heads), intermediate=torch.ones(L, base.intermediate),
                   hidden=torch.ones(base.hidden))


class Shearer(nn.Module):
    """The gates (log_alpha) and Lagrange multipliers (lambda1, lambda2) that prune one model to `target`.

    Gate blocks, created only for quantities the target shrinks:
        layer (L,), kv (L, K), head (L, H), intermediate (L, I), hidden (d,)
    """

    def __init__(self, model, target: Shape, init: float = 3.0, seed: int = 0):
        super().__init__()
        self.base, self.target, self.arch = Shape.of(model.config), target, Arch.of(model)
        b, t = self.base, target
        self.r = b.heads // b.kv_heads               # query heads per kv group in the base model
        self.r_target = t.heads // t.kv_heads        # ... in the target
        self.generator = torch.Generator().manual_seed(seed)
        shapes = {"layer": ((b.layers,), t.layers < b.layers),
                  "kv": ((b.layers, b.kv_heads), t.kv_heads < b.kv_heads),
                  "head": ((b.layers, b.heads), self.r_target < self.r),
                  "intermediate": ((b.layers, b.intermediate), t.intermediate < b.intermediate),
                  "hidden": ((b.hidden,), t.hidden < b.hidden)}
        self.gates = nn.ModuleDict({n: HardConcrete(s, init, self.generator) for n, (s, on) in shapes.items() if on})
        self.lambdas = nn.ParameterDict({n: nn.Parameter(torch.zeros(2)) for n in self.gates})  # (lambda1, lambda2)
        self.to(next(model.parameters()).device)

    # --- targets and expected sizes ---

    def final_fractions(self) -> dict[str, float]:
        """Kept fraction each gate block must reach: target count / full count (head: within each kv group)."""
        b, t = self.base, self.target
        full = {"layer": t.layers / b.layers, "kv": t.kv_heads / b.kv_heads, "head": self.r_target / self.r,
                "intermediate": t.intermediate / b.intermediate, "hidden": t.hidden / b.hidden}
        return {n: full[n] for n in self.gates}

    def target_fractions(self, progress: float) -> dict[str, float]:
        """The target ramped linearly from the full model (progress 0) to the final target (progress >= 1)."""
        p = min(max(progress, 0.0), 1.0)
        return {n: 1 + (t - 1) * p for n, t in self.final_fractions().items()}

    def expected_fractions(self) -> dict[str, torch.Tensor]:
        """s_hat / full count per gate block: a scalar for layer/hidden, one value per layer for the others."""
        return {n: g.score().mean(-1) for n, g in self.gates.items()}

    def lagrangian(self, progress: float) -> tuple[torch.Tensor, dict]:
        """sum_q mean_layers[ lambda1_q (s_hat_q - t_q) + lambda2_q (s_hat_q - t_q)^2 ] (paper eq. 2).

        Minimised by the gates (pushing s_hat to t), maximised by the lambdas (gradient ascent).
        """
        targets, expected = self.target_fractions(progress), self.expected_fractions()
        loss = torch.zeros((), device=self.lambdas_device())
        info = {}
        for n, s in expected.items():
            lam1, lam2 = self.lambdas[n]
            gap = s - targets[n]
            loss = loss + (lam1 * gap + lam2 * gap**2).mean()
            info[n] = {"expected": s.mean().item(), "target": targets[n]}
        return loss, info

    def lambdas_device(self):
        return next(iter(self.lambdas.values())).device if len(self.lambdas) else torch.device("cpu")

    @torch.no_grad()
    def expected_shape(self) -> dict[str, float]:
        """Expected remaining layers / hidden / kv heads / heads / intermediate (per-layer ones averaged)."""
        b, s = self.base, {n: g.score().cpu() for n, g in self.gates.items()}
        L = b.layers
        kv = s["kv"] if "kv" in s else torch.ones(L, b.kv_heads)
        head = s["head"] if "head" in s else torch.ones(L, b.heads)
        heads = (head * kv.repeat_interleave(self.r, dim=-1)).sum(-1)  # (L,) expected surviving query heads
        inter = s["intermediate"].sum(-1) if "intermediate" in s else torch.full((L,), float(b.intermediate))
        layer = s["layer"] if "layer" in s else torch.ones(L)
        d = s["hidden"].sum().item() if "hidden" in s else float(b.hidden)
        params = self.arch.outer_params(d) + sum(
            layer[l].item() * self.arch.layer_params(d, heads[l].item(), kv[l].sum().item(), inter[l].item())
            for l in range(L)
        )
        return {"layers": layer.sum().item(), "hidden": d, "heads": heads.mean().item(),
                "kv_heads": kv.sum(-1).mean().item(), "intermediate": inter.mean().item(), "params": params}

    # --- masks ---

    def _assemble(self, z: dict, keep: dict) -> Masks:
        """Combine kv-group and head gates into one per-query-head mask."""
        head, head_keep = z.get("head"), keep.get("head")
        if "kv" in z:
            kv = z["kv"].repeat_interleave(self.r, dim=-1)  # (L, K) -> (L, H): head h is in group h // r
            head = kv if head is None else head * kv
            if keep:
                kv_keep = keep["kv"].repeat_interleave(self.r, dim=-1)
                head_keep = kv_keep if head_keep is None else head_keep & kv_keep
        m = Masks(layer=z.get("layer"), head=head, intermediate=z.get("intermediate"), hidden=z.get("hidden"))
        if keep:
            m.keep = {n: k for n, k in {"layer": keep.get("layer"), "head": head_keep,
                                        "intermediate": keep.get("intermediate"), "hidden": keep.get("hidden")}.items()
                      if k is not None}
        return m

    def sample(self) -> Masks:
        """Training masks: one hard-concrete sample per gate (shared by the batch), differentiable in log_alpha."""
        return self._assemble({n: g.sample(self.generator) for n, g in self.gates.items()}, {})

    @torch.no_grad()
    def deterministic(self) -> Masks:
        """Eval masks keeping exactly the target count of each quantity (top-k of log_alpha, same k every layer)."""
        t, z, keep = self.target, {}, {}
        for n, g in self.gates.items():
            la = g.log_alpha
            if n == "head":  # top r' query heads inside every kv group
                keep[n] = _top_k(la.unflatten(-1, (self.base.kv_heads, self.r)), self.r_target).flatten(-2)
            else:
                k = {"layer": t.layers, "kv": t.kv_heads, "intermediate": t.intermediate, "hidden": t.hidden}[n]
                keep[n] = _top_k(la, k)
            z[n] = g.estimate() * keep[n]
        return self._assemble(z, keep)

    def constrain(self) -> None:
        for g in self.gates.values():
            g.constrain()

    def gate_parameters(self):
        return [g.log_alpha for g in self.gates.values()]

    def lambda_parameters(self):
        return list(self.lambdas.values())


def first_k_masks(base: Shape, target: Shape) -> Masks:
    """The naive structured-pruning baseline: keep the first layers, kv groups, query heads in each kept group,
    intermediate and hidden dims (all values 1). materialize(model, first_k_masks(...)) is that smaller model."""
    L, K, r = base.layers, base.kv_heads, base.heads // base.kv_heads

    def first(n, k):
        return torch.arange(n) < k

    head = (first(K, target.kv_heads)[:, None] & first(r, target.heads // target.kv_heads)[None, :]).flatten()
    keep = {"layer": first(L, target.layers), "head": head.expand(L, -1).clone(),
            "intermediate": first(base.intermediate, target.intermediate).expand(L, -1).clone(),
            "hidden": first(base.hidden, target.hidden)}
    return Masks(**{n: k.float() for n, k in keep.items()}, keep=keep)


# ------------------------------------------------------------------------------------------------ masked forward


class MaskedForward:
    """Forward hooks that apply `self.masks` (a Masks, or None = off) to an unmodified HF Llama-family model.

        with MaskedForward(model) as mf:
            mf.masks = shearer.sample()
            loss = model(input_ids=x, labels=x).loss
    """

    def __init__(self, model):
        check_supported(model)
        p = parts(model)
        self.masks: Masks | None = None
        self.heads = p.layers[0].self_attn.config.num_attention_heads
        hooks = [p.embed.register_forward_hook(self._embed), p.norm.register_forward_hook(self._norm)]
        for l, layer in enumerate(p.layers):
            hooks += [
                layer.input_layernorm.register_forward_hook(self._norm),
                layer.post_attention_layernorm.register_forward_hook(self._norm),
                layer.self_attn.o_proj.register_forward_pre_hook(partial(self._heads, l)),
                layer.self_attn.o_proj.register_forward_hook(partial(self._update, l)),
                layer.mlp.down_proj.register_forward_pre_hook(partial(self._intermediate, l)),
                layer.mlp.down_proj.register_forward_hook(partial(self._update, l)),
            ]
        self._handles = hooks

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _embed(self, module, args, out):
        m = self.masks
        if m is None or m.hidden is None:
            return None
        return out * m.hidden.to(out.device, out.dtype)

    def _norm(self, module, args, out):
        """RMS over the kept hidden dims only (pruned dims are 0 in the residual), then z_hidden."""
        m = self.masks
        if m is None or m.hidden is None:
            return None
        x2 = args[0].float().pow(2)                                       # (B, T, d)
        keep = m.kept("hidden").to(x2.device, x2.dtype)
        eps = _norm_eps(module)
        ms_all = x2.mean(-1, keepdim=True)
        ms_kept = (x2 * keep).sum(-1, keepdim=True) / keep.sum().clamp(min=1)
        return out * (torch.sqrt((ms_all + eps) / (ms_kept + eps)) * m.hidden.to(x2.device)).to(out.dtype)

    def _heads(self, l, module, args):
        m = self.masks
        if m is None or m.head is None:
            return None
        x = args[0]                                                       # (B, T, H * hd)
        z = m.head[l].to(x.device, x.dtype)
        return ((x.unflatten(-1, (self.heads, -1)) * z[:, None]).flatten(-2),)  # (B, T, H, hd) -> (B, T, H * hd)

    def _intermediate(self, l, module, args):
        m = self.masks
        if m is None or m.intermediate is None:
            return None
        x = args[0]                                                       # (B, T, I)
        return (x * m.intermediate[l].to(x.device, x.dtype),)

    def _update(self, l, module, args, out):
        """A residual update (o_proj or down_proj output) times z_layer[l] and z_hidden."""
        m = self.masks
        if m is None or (m.layer is None and m.hidden is None):
            return None
        if m.layer is not None:
            out = out * m.layer[l].to(out.device, out.dtype)
        if m.hidden is not None:
            out = out * m.hidden.to(out.device, out.dtype)
        return out


# ------------------------------------------------------------------------------------------------ materialise


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `size` rows each: (n,) -> (n * size,)."""
    return (units[:, None] * size + torch.arange(size, device=units.device)).flatten()


def _uniform(counts: torch.Tensor, what: str) -> int:
    values = counts.unique().tolist()
    if len(values) != 1:
        raise CompressError(f"cannot materialise: kept {what} differ between layers ({values}); use deterministic masks")
    return int(values[0])


@torch.no_grad()
def materialize(model, masks: Masks):
    """The smaller dense model (same class) that computes what `model` under `masks` computes.

    `masks` must keep the same number of heads (per kv group), kv heads and intermediate dims in every kept
    layer (Shearer.deterministic() does). Kept mask values are folded into the kept weights.
    """
    check_supported(model)
    base, p, hd = Shape.of(model.config), parts(model), head_dim(model)
    L, d, H, K, I = base.layers, base.hidden, base.heads, base.kv_heads, base.intermediate
    r = H // K
    dev = p.embed.weight.device

    def get(name, shape):
        z = getattr(masks, name)
        if z is None:
            return torch.ones(shape, device=dev), torch.ones(shape, dtype=torch.bool, device=dev)
        return z.to(dev).float(), masks.kept(name).to(dev)

    z_layer, keep_layer = get("layer", (L,))
    z_head, keep_head = get("head", (L, H))
    z_int, keep_int = get("intermediate", (L, I))
    z_hid, keep_hid = get("hidden", (d,))

    layers = keep_layer.nonzero().flatten().tolist()
    if not layers:
        raise CompressError("cannot materialise: every layer is pruned")
    kept_heads = keep_head[layers].unflatten(-1, (K, r))                   # (L', K, r)
    keep_kv = keep_head.unflatten(-1, (K, r)).any(-1)                      # (L, K): groups with a surviving head
    kv_new = _uniform(keep_kv[layers].sum(-1), "kv heads")
    r_new = _uniform(kept_heads.sum(-1)[keep_kv[layers]], "query heads per kv group")
    shape = Shape(layers=len(layers), hidden=int(keep_hid.sum()), heads=kv_new * r_new, kv_heads=kv_new,
                  intermediate=_uniform(keep_int[layers].sum(-1), "intermediate dims"))
    if min(shape.as_dict().values()) < 1:
        raise CompressError(f"cannot materialise an empty shape {shape}")

    check_shape(model, shape)
    cfg = target_config(model, shape, layers)
    dtype = p.embed.weight.dtype
    new = type(model)(cfg).to(device=dev, dtype=dtype)
    q = parts(new)

    h = keep_hid.nonzero().flatten()                                       # kept hidden dims
    zh = z_hid[h]
    tied = is_tied(new)
    q.embed.weight.copy_(p.embed.weight[:, h] * zh)
    # Tied: the embedding (= lm_head) already carries z_hidden, so the final norm must not fold it again.
    q.norm.weight.copy_(p.norm.weight[h] * (1 if tied else zh))
    if not tied:
        q.lm_head.weight.copy_(p.lm_head.weight[:, h])
        if p.lm_head.bias is not None:
            q.lm_head.bias.copy_(p.lm_head.bias)

    def take(dst: nn.Linear, src: nn.Linear, rows, cols, row_scale=None, col_scale=None):
        W = src.weight[rows][:, cols].float()
        if row_scale is not None:
            W = W * row_scale[:, None]
        if col_scale is not None:
            W = W * col_scale[None, :]
        dst.weight.copy_(W)
        if src.bias is not None:
            b = src.bias[rows].float()
            dst.bias.copy_(b if row_scale is None else b * row_scale)

    for j, l in enumerate(layers):
        a, b, na, nb = p.layers[l].self_attn, p.layers[l].mlp, q.layers[j].self_attn, q.layers[j].mlp
        out_scale = z_layer[l] * zh                                        # (d',) on every residual update
        qh = keep_head[l].nonzero().flatten()                              # kept query heads
        q_rows, kv_rows = _rows(qh, hd), _rows(keep_kv[l].nonzero().flatten(), hd)
        take(na.q_proj, a.q_proj, q_rows, h)
        take(na.k_proj, a.k_proj, kv_rows, h)
        take(na.v_proj, a.v_proj, kv_rows, h)
        take(na.o_proj, a.o_proj, h, q_rows, row_scale=out_scale, col_scale=z_head[l][qh].repeat_interleave(hd))
        i = keep_int[l].nonzero().flatten()                                # kept intermediate dims
        take(nb.gate_proj, b.gate_proj, i, h)
        take(nb.up_proj, b.up_proj, i, h)
        take(nb.down_proj, b.down_proj, h, i, row_scale=out_scale, col_scale=z_int[l][i])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(q.layers[j], norm).weight.copy_(getattr(p.layers[l], norm).weight[h] * zh)

    if head_dim(new) != hd or Shape.of(new.config) != shape:
        raise CompressError(f"{type(model).__name__} did not accept the pruned shape {shape} with head_dim={hd}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
