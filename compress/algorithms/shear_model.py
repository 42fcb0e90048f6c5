"""How Sheared-LLaMA masks act on a model of any supported family: the masked forward and the smaller dense model.

compress/algorithms/shear.py is the algorithm (gates, Lagrangian, targets); this module applies its Masks to a
transformers model described in compress/families.py, without forking the family's modelling code:

    with MaskedForward(model) as mf:                          # forward hooks on the unmodified model
        mf.masks = shearer.sample()
        loss = model(input_ids=x, labels=x).loss
    small = materialize(model, shearer.deterministic())      # same class, smaller config, plain from_pretrained

Where the masks act (as the paper): z_head scales each query head's output before the output projection, z_int
the FFN intermediate before the down projection (per expert in a mixture of experts), z_layer each layer's two
residual updates, z_hidden the embedding output, every norm output on the residual stream and every update.

Norms. A pruned hidden dim is exactly 0 in the residual stream, so a smaller model's norm averages over the kept
dims only, and the masked forward does the same: RMSNorms (plain, or Gemma's 1 + w) rescale their output by
sqrt((mean_all(x^2) + eps) / (mean_kept(x^2) + eps)); LayerNorms recompute mean and variance over the kept dims.
A norm on a sublayer's output inside the residual branch (Gemma, OLMo 2) first sees its input restricted to the
kept dims, and its output is the residual update. OLMo 2's q/k norms span all heads: they are restricted to the
kept heads the same way. So the materialised model equals the masked one up to float rounding, not roughly.

Folding kept mask values into weights: z_head into output-projection columns, z_int into down-projection
columns, z_layer * z_hidden into whatever writes the residual update (output / down projection rows and bias, or
the post-norm's scale), z_hidden into the embedding and every norm on the stream except the final norm of a tied
model (the tied embedding already carries it into lm_head). Gemma multiplies embeddings by sqrt(hidden_size): a
smaller model uses sqrt(pruned hidden), so the ratio is folded into the embedding (tied: its inverse into the
final norm). Any other tensor (rotary tables, per-head q/k norms, routers' rows) is copied as it is.

Not supported: families whose attention derives head_dim from hidden / heads (their entry in families.py says
why), MoE models with some dense layers, quantized models.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from compress import families
from compress.algorithms.shear import Masks, Shape, check_shape, head_dim, target_config
from compress.errors import CompressError


@dataclass
class _Block:
    """The modules of one decoder layer that pruning touches, by role (None when the family has none)."""
    attn: nn.Module
    ffn: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None
    o: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    gate: nn.Module | None
    up: nn.Module | None
    gate_up: nn.Module | None
    down: nn.Module | None
    experts: nn.Module | None
    router: nn.Module | None
    norms: dict = field(default_factory=dict)  # role -> norm module


def blocks(model, fam: families.Family) -> list[_Block]:
    out = []
    a, f = fam.attention, fam.ffn
    for layer in fam.layer_list(model):
        attn, ffn = fam.get(layer, a.path), fam.get(layer, f.path)
        out.append(_Block(
            attn=attn, ffn=ffn, q=fam.get(attn, a.q), k=fam.get(attn, a.k), v=fam.get(attn, a.v),
            qkv=fam.get(attn, a.qkv), o=fam.get(attn, a.o), q_norm=fam.get(attn, a.q_norm),
            k_norm=fam.get(attn, a.k_norm), gate=fam.get(ffn, f.gate), up=fam.get(ffn, f.up),
            gate_up=fam.get(ffn, f.gate_up), down=fam.get(ffn, f.down), experts=fam.get(ffn, f.experts),
            router=fam.get(ffn, f.router),
            norms={role: fam.get(layer, name) for role, name in fam.norms.items() if fam.get(layer, name) is not None},
        ))
    return out


def check_supported(model) -> families.Family:
    """The model's Family when `prune` can shrink it; else one line saying why and what it supports."""
    fam = families.of(model)
    if fam.prune is not None:
        names = ", ".join(families.supported(lambda f: f.prune is None))
        raise CompressError(f"prune does not support {fam.name}: {fam.prune}; it supports {names}")
    if getattr(model.config, "quantization_config", None):
        raise CompressError("prune needs an unquantized model; put prune before gptq/int8")
    if fam.is_moe() and any(b.experts is None for b in blocks(model, fam)):
        raise CompressError(f"prune supports {fam.name} models whose every layer is a mixture of experts; this one "
                            "has dense layers (mlp_only_layers / decoder_sparse_step)")
    return fam


def _fold(kind: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A norm weight that scales its output by `scale` more: w * s, or for Gemma's (1 + w): (1 + w) * s - 1."""
    return (1 + w.float()) * scale - 1 if kind == "rms_unit_offset" else w.float() * scale


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", 1e-6) if eps is None else eps


# ------------------------------------------------------------------------------------------------ masked forward


class MaskedForward:
    """Forward hooks that apply `self.masks` (a Masks, or None = off) to an unmodified model of a supported family.

        with MaskedForward(model) as mf:
            mf.masks = shearer.sample()
            loss = model(input_ids=x, labels=x).loss
    """

    def __init__(self, model):
        self.fam = fam = check_supported(model)
        shape = Shape.of(model.config)
        self.masks: Masks | None = None
        self.heads, self.kv_heads, self.hd = shape.heads, shape.kv_heads, head_dim(model)
        self._stash: dict[int, torch.Tensor] = {}   # experts module id -> its down_proj while masked
        hooks = [fam.get(model, fam.embed).register_forward_hook(self._embed)]
        final = fam.get(model, fam.final_norm)
        if final is not None:
            hooks.append(final.register_forward_hook(self._stream_norm))
        for l, b in enumerate(blocks(model, fam)):
            for role, norm in b.norms.items():
                if role.endswith("_in"):
                    hooks.append(norm.register_forward_hook(self._stream_norm))
                else:  # on the sublayer's output: its input restricted to the kept dims, its output the update
                    hooks += [norm.register_forward_pre_hook(self._kept_hidden),
                              norm.register_forward_hook(partial(self._post_norm, l))]
            hooks.append(b.o.register_forward_pre_hook(partial(self._heads, l)))
            if "attn_out" not in b.norms:
                hooks.append(b.o.register_forward_hook(partial(self._update, l)))
            if b.experts is not None:
                hooks += [b.experts.register_forward_pre_hook(partial(self._experts_in, l)),
                          b.experts.register_forward_hook(self._experts_out)]
                if "ffn_out" not in b.norms:
                    hooks.append(b.ffn.register_forward_hook(partial(self._update, l)))
            else:
                hooks.append(b.down.register_forward_pre_hook(partial(self._intermediate, l)))
                if "ffn_out" not in b.norms:
                    hooks.append(b.down.register_forward_hook(partial(self._update, l)))
            if b.q_norm is not None and not fam.attention.qk_norm_per_head:
                for norm, kv in ((b.q_norm, False), (b.k_norm, True)):
                    hooks += [norm.register_forward_pre_hook(partial(self._kept_heads, l, kv)),
                              norm.register_forward_hook(partial(self._head_norm, l, kv))]
        self._handles = hooks

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- the residual stream

    def _embed(self, module, args, out):
        m = self.masks
        if m is None or m.hidden is None:
            return None
        return out * m.hidden.to(out.device, out.dtype)

    def _renorm(self, module, x: torch.Tensor, out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The norm's output as if it had seen only the `keep` dims of `x` (x is 0 elsewhere)."""
        keep = keep.to(x.device, torch.float32)
        n = keep.sum().clamp(min=1)
        eps = _norm_eps(module)
        xf = x.float()
        if self.fam.norm == "layer":
            mean = (xf * keep).sum(-1, keepdim=True) / n
            var = (((xf - mean) * keep) ** 2).sum(-1, keepdim=True) / n
            y = (xf - mean) * torch.rsqrt(var + eps) * module.weight.float()
            return (y + module.bias.float() if module.bias is not None else y).to(out.dtype)
        x2 = xf.pow(2)
        ms_all, ms_kept = x2.mean(-1, keepdim=True), (x2 * keep).sum(-1, keepdim=True) / n
        return out * torch.sqrt((ms_all + eps) / (ms_kept + eps)).to(out.dtype)

    def _stream_norm(self, module, args, out):
        m = self.masks
        if m is None or m.hidden is None:
            return None
        return self._renorm(module, args[0], out, m.kept("hidden")) * m.hidden.to(out.device, out.dtype)

    def _kept_hidden(self, module, args):
        m = self.masks
        if m is None or m.hidden is None:
            return None
        return (args[0] * m.kept("hidden").to(args[0].device, args[0].dtype),)

    def _post_norm(self, l, module, args, out):
        m = self.masks
        if m is not None and m.hidden is not None:
            out = self._renorm(module, args[0], out, m.kept("hidden"))
        return self._update(l, module, args, out)

    def _update(self, l, module, args, out):
        """A residual update (output projection, down projection, MoE block or post-norm output) times z_layer[l]
        and z_hidden."""
        m = self.masks
        if m is None or (m.layer is None and m.hidden is None):
            return None
        first = out[0] if isinstance(out, tuple) else out
        if m.layer is not None:
            first = first * m.layer[l].to(first.device, first.dtype)
        if m.hidden is not None:
            first = first * m.hidden.to(first.device, first.dtype)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    # -- heads and the FFN intermediate

    def _heads(self, l, module, args):
        m = self.masks
        if m is None or m.head is None:
            return None
        x = args[0]                                                       # (B, T, H * hd)
        z = m.head[l].to(x.device, x.dtype)
        return ((x.unflatten(-1, (self.heads, -1)) * z[:, None]).flatten(-2),)  # (B, T, H, hd) -> (B, T, H * hd)

    def _head_keep(self, l, kv: bool) -> torch.Tensor:
        keep = self.masks.kept("head")[l]                                 # (H,)
        if kv:  # a kv head survives while any query head of its group does
            keep = keep.unflatten(-1, (self.kv_heads, -1)).any(-1)
        return keep.repeat_interleave(self.hd)

    def _kept_heads(self, l, kv, module, args):
        m = self.masks
        if m is None or m.head is None:
            return None
        return (args[0] * self._head_keep(l, kv).to(args[0].device, args[0].dtype),)

    def _head_norm(self, l, kv, module, args, out):
        m = self.masks
        if m is None or m.head is None:
            return None
        return self._renorm(module, args[0], out, self._head_keep(l, kv))

    def _intermediate(self, l, module, args):
        m = self.masks
        if m is None or m.intermediate is None:
            return None
        x = args[0]                                                       # (B, T, I)
        return (x * m.intermediate[l].to(x.device, x.dtype),)

    def _experts_in(self, l, module, args):
        """Experts run inside one module on 3-D weights: mask each expert's intermediate through its down_proj
        columns (down_proj [E, H, I] x z[l] [E, I]) for this forward; the parameter is put back after it."""
        m = self.masks
        if m is None or m.intermediate is None:
            return None
        W = self._stash.pop(id(module), None)
        W = module._parameters["down_proj"] if W is None else W
        self._stash[id(module)] = W
        module._parameters["down_proj"] = W * m.intermediate[l].to(W.device, W.dtype)[:, None, :]
        return None

    def _experts_out(self, module, args, out):
        W = self._stash.pop(id(module), None)
        if W is not None:
            module._parameters["down_proj"] = W
        return None


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
    layer (and expert) (Shearer.deterministic() does). Kept mask values are folded into the kept weights.
    """
    fam = check_supported(model)
    base, hd = Shape.of(model.config), head_dim(model)
    L, d, H, K, I = base.layers, base.hidden, base.heads, base.kv_heads, base.intermediate
    r = H // K
    embed = fam.get(model, fam.embed)
    dev, dtype = embed.weight.device, embed.weight.dtype
    old = blocks(model, fam)
    inter_shape = tuple(old[0].experts.down_proj.shape[:1]) if old[0].experts is not None else ()

    def get(name, shape):
        z = getattr(masks, name)
        if z is None:
            return torch.ones(shape, device=dev), torch.ones(shape, dtype=torch.bool, device=dev)
        return z.to(dev).float(), masks.kept(name).to(dev)

    z_layer, keep_layer = get("layer", (L,))
    z_head, keep_head = get("head", (L, H))
    z_int, keep_int = get("intermediate", (L, *inter_shape, I))
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
    new = type(model)(target_config(model, shape, layers)).to(device=dev, dtype=dtype)
    written: set[int] = set()

    def put(dst: torch.Tensor, value: torch.Tensor) -> None:
        dst.copy_(value)
        written.add(dst.data_ptr())

    def take(dst: nn.Module, src: nn.Module, rows, cols, row_scale=None, col_scale=None):
        W = src.weight[rows][:, cols].float()
        if row_scale is not None:
            W = W * row_scale[:, None]
        if col_scale is not None:
            W = W * col_scale[None, :]
        put(dst.weight, W)
        if src.bias is not None:
            b = src.bias[rows].float()
            put(dst.bias, b if row_scale is None else b * row_scale)

    def norm(dst: nn.Module, src: nn.Module, scale: torch.Tensor) -> None:
        put(dst.weight, _fold(fam.norm, src.weight[h], scale))
        if getattr(src, "bias", None) is not None:
            put(dst.bias, src.bias[h].float() * scale)

    h = keep_hid.nonzero().flatten()                                       # kept hidden dims
    zh = z_hid[h]
    c = math.sqrt(d / len(h)) if fam.embed_scale else 1.0                  # Gemma: sqrt(d) -> sqrt(d') at load
    put(fam.get(new, fam.embed).weight, embed.weight[:, h] * zh * c)
    tied = new.get_output_embeddings() is not None and new.get_output_embeddings().weight is new.get_input_embeddings().weight
    final_old, final_new = fam.get(model, fam.final_norm), fam.get(new, fam.final_norm)
    if final_old is not None:  # tied: the embedding already carries z_hidden (and Gemma's c) into lm_head
        norm(final_new, final_old, torch.full_like(zh, 1 / c) if tied else zh)
    if not tied and fam.lm_head is not None:
        head_old, head_new = fam.get(model, fam.lm_head), fam.get(new, fam.lm_head)
        put(head_new.weight, head_old.weight[:, h])
        if head_old.bias is not None:
            put(head_new.bias, head_old.bias)

    for j, (l, b) in enumerate(zip(layers, blocks(new, fam))):
        a = old[l]
        out_scale = z_layer[l] * zh                                        # (d',) on every residual update
        qh = keep_head[l].nonzero().flatten()                              # kept query heads
        kvh = keep_kv[l].nonzero().flatten()
        q_rows, kv_rows = _rows(qh, hd), _rows(kvh, hd)
        if a.qkv is not None:  # split layout: rows [q heads | k heads | v heads]
            take(b.qkv, a.qkv, torch.cat([q_rows, H * hd + kv_rows, (H + K) * hd + kv_rows]), h)
        else:
            take(b.q, a.q, q_rows, h)
            take(b.k, a.k, kv_rows, h)
            take(b.v, a.v, kv_rows, h)
        post_attn = "attn_out" in a.norms
        take(b.o, a.o, h, q_rows, row_scale=None if post_attn else out_scale,
             col_scale=z_head[l][qh].repeat_interleave(hd))
        if a.q_norm is not None and not fam.attention.qk_norm_per_head:   # OLMo 2: norms over all heads' dims
            put(b.q_norm.weight, a.q_norm.weight[q_rows])
            put(b.k_norm.weight, a.k_norm.weight[kv_rows])
        post_ffn = "ffn_out" in a.norms
        if a.experts is not None:
            put(b.router.weight, a.router.weight[:, h])
            gu_new, down_new = [], []
            for e in range(a.experts.down_proj.shape[0]):
                i = keep_int[l, e].nonzero().flatten()
                gu_new.append(a.experts.gate_up_proj[e][torch.cat([i, I + i])][:, h].float())
                W = a.experts.down_proj[e][h][:, i].float() * z_int[l, e][i][None, :]
                down_new.append(W if post_ffn else W * out_scale[:, None])
            put(b.experts.gate_up_proj, torch.stack(gu_new))
            put(b.experts.down_proj, torch.stack(down_new))
        else:
            i = keep_int[l].nonzero().flatten()                            # kept intermediate dims
            if a.gate_up is not None:                                      # fused rows [gate | up]
                take(b.gate_up, a.gate_up, torch.cat([i, I + i]), h)
            else:
                take(b.up, a.up, i, h)
                if a.gate is not None:
                    take(b.gate, a.gate, i, h)
            take(b.down, a.down, h, i, row_scale=None if post_ffn else out_scale, col_scale=z_int[l][i])
        for role, src in a.norms.items():
            norm(b.norms[role], src, zh if role.endswith("_in") else out_scale)

    _copy_rest(model, new, fam, layers, written)
    if head_dim(new) != hd or Shape.of(new.config) != shape:
        raise CompressError(f"{type(model).__name__} did not accept the pruned shape {shape} with head_dim={hd}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def _copy_rest(model, new, fam: families.Family, layers: list[int], written: set[int]) -> None:
    """Copy every tensor of `new` that materialize did not write from the same place in `model` (its layer
    renumbered): per-head q/k norms, routers' biases, persistent buffers. A tensor whose shape changed and that
    nothing wrote would be a pruning rule missing from this module: an error, not a silent copy."""
    src = model.state_dict()
    prefix = fam.layers + "."
    for name, t in new.state_dict().items():
        if t.data_ptr() in written:
            continue
        old_name = name
        if name.startswith(prefix):
            j, rest = name[len(prefix):].split(".", 1)
            old_name = f"{prefix}{layers[int(j)]}.{rest}"
        if old_name not in src or src[old_name].shape != t.shape:
            raise CompressError(f"cannot materialise {name}: no pruning rule for it in compress/algorithms/shear_model.py")
        t.copy_(src[old_name])
