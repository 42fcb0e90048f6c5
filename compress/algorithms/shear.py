"""Sheared-LLaMA targeted structured pruning: hard-concrete (L0) masks, Lagrangian shape targets, shapes and counts.

Xia, Gao, Zeng, Chen 2023, "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning",
https://arxiv.org/abs/2310.06694. Gates are the hard-concrete distribution of Louizos, Welling, Kingma 2018,
"Learning Sparse Neural Networks through L0 Regularization", https://arxiv.org/abs/1712.01312.

Plain torch, no files or YAML. This module is the algorithm; how masks act on a model of each family (the masked
forward and the smaller dense model) is compress/algorithms/shear_model.py. The pieces:

    Shape / resolve_target / derive_shape   the target: layers, hidden, heads, kv_heads, intermediate
    Arch                                    parameter count of any shape of a model's family
    Shearer                                 the gates z (log_alpha) and multipliers lambda for one model
      .sample()          training masks (reparameterised, gradients reach log_alpha)
      .lagrangian(p)     sum over quantities of lambda1 (s_hat - t) + lambda2 (s_hat - t)^2   (paper eq. 2)
      .deterministic()   eval masks that keep exactly the target count of every quantity
    first_k_masks(base, target)             the naive baseline: keep the first k of everything

Design choices:

* GQA. Query head h belongs to kv group h // r (r = heads / kv_heads, HF's repeat_kv order). Two gates: z_kv
  per (layer, kv group) prunes whole groups (q heads + k/v heads), z_head per (layer, query head) prunes query
  heads inside groups; a head's effective gate is z_kv[g(h)] * z_head[h]. Deterministic masks keep the top kv_heads
  groups and, inside each kept group, the top heads/kv_heads query heads, so every layer ends with the same
  (heads, kv_heads) and heads % kv_heads == 0: a valid uniform config. A gate exists only for a quantity the
  target shrinks (MHA: r = 1, only z_kv).
* Mixture of experts: every expert's FFN has its own intermediate gates (L, E, I) and keeps the same number of
  dims (one `moe_intermediate` in the config), the router is kept whole.
* Deterministic mask values: kept units take Louizos' test-time estimate clamp(sigmoid(log_alpha) (zeta - gamma)
  + gamma, 0, 1) (the paper's code uses a different soft value); units outside the top-k are 0. Which units
  survive is carried separately (Masks.keep), so a kept unit whose estimate is 0 still counts as kept.
* Targets: a shape (any of the five numbers) or a parameter count, turned into a shape by derive_shape (widths
  x f, depth x sqrt f, closest count). Widths are multiples of `multiple_of` (see derive_shape). The target ramps
  linearly from the full model to the final shape (the paper's warmup): target_fractions(progress).
* Lagrangian terms are per quantity on kept fractions (expected count / full count) as the paper's code does, per
  layer for per-layer quantities (averaged), so one multiplier pair scale fits layers, heads and dims alike.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from compress import families
from compress.errors import CompressError

BETA = 2 / 3                                   # temperature of the concrete distribution
GAMMA, ZETA = -0.1, 1.1                        # stretch limits of s in (0, 1) before clamping to [0, 1]
EPS = 1e-6                                     # keeps the uniform noise away from 0 and 1
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -math.log(100), math.log(100)  # keeps every gate's gradient alive
TARGET_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate")


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    """The five numbers structured pruning changes; everything else (vocab, head_dim, experts) is kept.
    `intermediate` is each expert's width in a mixture of experts."""

    layers: int
    hidden: int
    heads: int          # query heads per layer
    kv_heads: int       # key/value heads per layer
    intermediate: int

    @classmethod
    def of(cls, config) -> "Shape":
        fam = families.of(config)
        heads = fam.config_value(config, "heads")
        width = "moe_intermediate" if fam.is_moe() and fam.keys.moe_intermediate else "intermediate"
        hidden = fam.config_value(config, "hidden")
        return cls(layers=fam.config_value(config, "layers"), hidden=hidden, heads=heads,
                   kv_heads=fam.config_value(config, "kv_heads", heads),
                   intermediate=fam.config_value(config, width, 4 * hidden))

    def config_fields(self, fam: families.Family) -> dict:
        """config.json keys of this shape for `fam`."""
        k = fam.keys
        out = {k.layers: self.layers, k.hidden: self.hidden, k.heads: self.heads,
               (k.moe_intermediate if fam.is_moe() and k.moe_intermediate else k.intermediate): self.intermediate}
        if k.kv_heads:
            out[k.kv_heads] = self.kv_heads
        return out

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
    """What a parameter count needs besides the Shape, read from one model of the family (compress/families.py)."""

    vocab: int
    head_dim: int
    tied: bool
    experts: int            # experts per MoE layer (0: a dense FFN)
    ffn_mats: int           # [I, d]-sized matrices per FFN (expert): 3 gated, 2 plain
    bias: dict              # q, k, v, o, gate, up, down, lm_head -> bool
    layer_norms: int        # hidden-sized norms per layer
    norm_bias: bool         # LayerNorm: a weight and a bias per norm
    qk_norm: str | None     # "head": one norm over head_dim for q and one for k; "width": over all heads' dims
    final_norms: int        # norms after the last layer

    @classmethod
    def of(cls, model) -> "Arch":
        fam = families.of(model)
        layer = fam.layer_list(model)[0]
        attn, ffn, a, f = fam.get(layer, fam.attention.path), fam.get(layer, fam.ffn.path), fam.attention, fam.ffn

        def bias(parent, name):
            m = fam.get(parent, name)
            return m is not None and getattr(m, "bias", None) is not None

        bias_of = {"q": bias(attn, a.qkv or a.q), "k": bias(attn, a.qkv or a.k), "v": bias(attn, a.qkv or a.v),
                   "o": bias(attn, a.o), "gate": bias(ffn, f.gate_up or f.gate), "up": bias(ffn, f.gate_up or f.up),
                   "down": bias(ffn, f.down), "lm_head": bias(model, fam.lm_head)}
        norms = [fam.get(layer, n) for n in fam.norms.values() if fam.get(layer, n) is not None]
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        qk = None if not a.q_norm else ("head" if a.qk_norm_per_head else "width")
        return cls(vocab=in_emb.weight.shape[0], head_dim=head_dim(model),
                   tied=out_emb is not None and out_emb.weight is in_emb.weight,
                   experts=fam.config_value(model.config, "experts", 0) if fam.is_moe() else 0,
                   ffn_mats=3 if (f.gate or f.gate_up or fam.is_moe()) else 2, bias=bias_of, layer_norms=len(norms),
                   norm_bias=any(getattr(n, "bias", None) is not None for n in norms), qk_norm=qk,
                   final_norms=int(fam.get(model, fam.final_norm) is not None))

    def layer_params(self, d, H, K, I):
        """Parameters of one decoder layer (floats allowed: expected sizes)."""
        b, hd = self.bias, self.head_dim
        attn = d * hd * (H + 2 * K) + hd * (H * b["q"] + K * b["k"] + K * b["v"]) + H * hd * d + d * b["o"]
        attn += {"head": 2 * hd, "width": (H + K) * hd, None: 0}[self.qk_norm]
        if self.experts:  # every expert's gate, up and down, and the router [E, d]
            ffn = self.experts * (self.ffn_mats * d * I + d)
        else:
            ffn = self.ffn_mats * d * I + I * (b["gate"] + b["up"]) + d * b["down"]
        return attn + ffn + self.layer_norms * d * (2 if self.norm_bias else 1)

    def outer_params(self, d):
        """Embedding, final norm and (untied) lm_head."""
        return (self.vocab * d * (1 if self.tied else 2) + self.final_norms * d * (2 if self.norm_bias else 1)
                + self.vocab * self.bias["lm_head"])

    def count(self, s: Shape) -> int:
        return int(self.outer_params(s.hidden) + s.layers * self.layer_params(s.hidden, s.heads, s.kv_heads, s.intermediate))


def head_dim(model) -> int:
    """Dimensions per attention head: the config's head_dim, else hidden / heads (kept by pruning)."""
    fam, cfg = families.of(model), model.config
    explicit = getattr(cfg, fam.keys.head_dim, None) if fam.keys.head_dim else None
    return int(explicit or fam.config_value(cfg, "hidden") // fam.config_value(cfg, "heads"))


def target_config(model, shape: Shape, layers: list[int] | None = None):
    """The model's config with `shape` (head_dim kept; per-layer lists cut to `layers`, the first ones by default)."""
    fam = families.of(model)
    raw = fam.cut_layers(model.config.to_dict(), list(layers) if layers is not None else list(range(shape.layers)))
    raw.update(shape.config_fields(fam))
    if fam.keys.head_dim:
        raw[fam.keys.head_dim] = head_dim(model)
    return type(model.config).from_dict(raw)


def shape_error(model, shape: Shape) -> str | None:
    """Why the model's config class refuses `shape` (its own validators, e.g. Llama's hidden % heads), or None."""
    try:
        cfg = target_config(model, shape)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except (StrictDataclassError, ValueError, TypeError) as e:
        return str(e.__cause__ or e).strip().splitlines()[-1]
    return None


def check_shape(model, shape: Shape) -> None:
    err = shape_error(model, shape)
    if err:
        raise CompressError(f"prune target {shape.as_dict()} is not a valid {type(model.config).__name__}: {err}")


def multiples(base: Shape, hd: int, multiple_of: int) -> dict[str, int]:
    """The step each width may take: hidden and intermediate multiples of `multiple_of` (a width the base model
    has below that stays whole), query heads such that heads * head_dim is as aligned as the base model's."""
    def step(n):
        return multiple_of if n >= multiple_of and n % multiple_of == 0 else (n if n < multiple_of else 1)
    g = math.gcd(multiple_of, base.heads * hd)  # heads * hd % g == 0  <=>  heads % (g / gcd(g, hd)) == 0
    return {"hidden": step(base.hidden), "intermediate": step(base.intermediate), "heads": g // math.gcd(g, hd)}


def check_multiples(base: Shape, target: Shape, hd: int, multiple_of: int) -> None:
    """Refuse an explicit target shape whose widths are not multiples that deploy (see `multiples`)."""
    steps = multiples(base, hd, multiple_of)
    for key, unit in steps.items():
        v = getattr(target, key)
        if v != getattr(base, key) and v % unit:
            near = sorted({max(unit, v // unit * unit), -(-v // unit) * unit})
            raise CompressError(f"prune target {key}={v} is not a multiple of {unit} (multiple_of: {multiple_of}, so "
                                f"GPTQ packing and GPU kernels take it); use {' or '.join(map(str, near))}, or set "
                                "multiple_of: 1")


def derive_shape(model, n_params: int, multiple_of: int = 1) -> Shape:
    """A Shape whose parameter count is closest to `n_params`.

    Rule: widths (hidden, heads, intermediate) shrink by one factor f and depth by sqrt(f), as Sheared-LLaMA's
    7B -> 1.3B target does (width x 1/2, depth x 3/4); hidden and intermediate are rounded to multiples of
    `multiple_of` (see `multiples`), heads to the nearest count that fits the kv groups (whole groups first).
    f is scanned in steps of 0.001 and the closest count wins (the larger model on ties).
    """
    base, arch = Shape.of(model.config), Arch.of(model)
    full = arch.count(base)
    if not 0 < n_params < full:
        raise CompressError(f"prune target of {n_params:,} parameters must be below the model's {full:,}")
    steps = multiples(base, arch.head_dim, multiple_of)
    r = base.heads // base.kv_heads
    feasible_heads = sorted({k * q for k in range(1, base.kv_heads + 1) for q in range(1, r + 1)
                             if (k * q) % steps["heads"] == 0 or k * q == base.heads})

    def shrink(n, f, a):
        return min(n, max(a, a * round(n * f / a)))

    best, best_err, valid = None, None, {}
    for i in range(1000, 0, -1):
        f = i / 1000
        heads = min(feasible_heads, key=lambda h: (abs(h - base.heads * f), -h))
        depth = round(base.layers * math.sqrt(f))
        a = steps["hidden"]
        for hidden, layers in itertools.product(
            (shrink(base.hidden, f, a), shrink(base.hidden, f, math.lcm(a, heads))),  # 2nd: for hidden % heads == 0
            (depth, depth - 1, depth + 1),                                            # +-1 layer: finer steps
        ):
            s = Shape(layers=min(max(1, layers), base.layers), hidden=hidden, heads=heads,
                      kv_heads=_default_kv_heads(heads, base),
                      intermediate=shrink(base.intermediate, f, steps["intermediate"]))
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
    intermediate: torch.Tensor | None = None  # (L, I) or (L, E, I): the FFN intermediate before down_proj, per expert
    hidden: torch.Tensor | None = None        # (d,)   scales the residual stream's dimensions
    keep: dict = field(default_factory=dict)  # name -> bool tensor (same shape): units that survive; default z != 0

    def kept(self, name: str) -> torch.Tensor:
        return self.keep[name] if name in self.keep else getattr(self, name) != 0

    @classmethod
    def ones(cls, base: Shape, experts: int = 0) -> "Masks":
        """Every gate present and open: the masked model must equal the original."""
        L = base.layers
        inter = (L, experts, base.intermediate) if experts else (L, base.intermediate)
        return cls(layer=torch.ones(L), head=torch.ones(L, base.heads), intermediate=torch.ones(inter),
                   hidden=torch.ones(base.hidden))


class Shearer(nn.Module):
    """The gates (log_alpha) and Lagrange multipliers (lambda1, lambda2) that prune one model to `target`.

    Gate blocks, created only for quantities the target shrinks:
        layer (L,), kv (L, K), head (L, H), intermediate (L, I) or (L, E, I) with experts, hidden (d,)
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
                  "intermediate": ((b.layers, *((self.arch.experts,) if self.arch.experts else ()), b.intermediate),
                                   t.intermediate < b.intermediate),
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
        inter = inter.mean(-1) if inter.dim() > 1 else inter  # experts: their mean width
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


def first_k_masks(base: Shape, target: Shape, experts: int = 0) -> Masks:
    """The naive structured-pruning baseline: keep the first layers, kv groups, query heads in each kept group,
    intermediate and hidden dims (all values 1). materialize(model, first_k_masks(...)) is that smaller model."""
    L, K, r = base.layers, base.kv_heads, base.heads // base.kv_heads

    def first(n, k):
        return torch.arange(n) < k

    head = (first(K, target.kv_heads)[:, None] & first(r, target.heads // target.kv_heads)[None, :]).flatten()
    keep = {"layer": first(L, target.layers), "head": head.expand(L, -1).clone(),
            "intermediate": first(base.intermediate, target.intermediate).expand(
                L, *((experts,) if experts else ()), -1).clone(),
            "hidden": first(base.hidden, target.hidden)}
    return Masks(**{n: k.float() for n, k in keep.items()}, keep=keep)
