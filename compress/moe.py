"""Mixture-of-experts blocks as per-expert linears, so that weight quantizers see (and can quantize) every expert.

transformers 5 keeps a MoE block's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (per expert [gate rows I;
up rows I]) and `mlp.experts.down_proj` [E, H, I], applied with F.linear inside a loop over the experts that got
tokens; the router (`mlp.gate.weight` [E, H]) is a bare parameter. Nothing that walks nn.Linear modules (GPTQ, RTN,
bitsandbytes) sees the experts, so they stayed in 16 bits while the model was called quantized.

`unfuse(model)` swaps each fused experts module for `Experts`: a ModuleList of `ExpertMLP`, one per expert, each
holding its gate, up and down projections as nn.Linear. Its forward has the same inputs, routing and arithmetic as
transformers' (experts in ascending order, tokens in the same order, the routing weight applied to each expert's
output, `index_add_` into zeros), so the logits are those of the fused model (tests/test_families.py checks it).
The router is left as it is (a small [E, H] matrix that decides where tokens go: it is never quantized).

Names: the linears of expert e are `<experts>.e.<gate>/<up>/<down>` with the names of the family's original
per-expert checkpoints (`families.FFN.expert_names`): Qwen3-MoE `gate_proj/up_proj/down_proj`, Mixtral `w1/w3/w2`
(and Mixtral's checkpoints call the block `block_sparse_moe`, `Family.saved_names`). That is the layout
`save_pretrained` writes for these models, the one GPTQModel and vLLM (FusedMoE's expert-params mapping) read for
quantized MoE checkpoints, so the quantized checkpoints compress writes load there as well as in
`compress.checkpoint.load` (which unfuses its skeleton the same way before loading the tensors).

Not supported: fused experts stored transposed ([E, H, 2I], gpt-oss style), experts with biases, shared experts
(Qwen2-MoE): `unfuse` refuses a fused module whose shapes are not [E, 2I, H] and [E, H, I].
"""

from __future__ import annotations

import torch
from torch import nn

from compress import families
from compress.errors import CompressError
from compress.modeling import is_linear, linear_shape


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its three linears named as the family's checkpoints name them.
    Built on the meta device (no storage, no random init): `unfuse_block` gives it storage and fills it."""

    def __init__(self, hidden: int, intermediate: int, act, names: tuple, dtype=None):
        super().__init__()
        self.names = tuple(names)  # (gate, up, down)
        with torch.device("meta"):
            for name, (i, o) in zip(self.names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
                setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The experts of one MoE block as a list of ExpertMLP, called like transformers' fused experts module:
    forward(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()  # ascending, as transformers visits them
        for e in hit:
            if e >= len(self):  # transformers' padding index (num_experts) means "no expert"
                continue
            pos, token = torch.where(top_k_index.t() == e)  # [k, N] order: transformers' expert_mask[e]
            y = self[e](hidden_states[token]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def fused_experts(block: nn.Module, fam: families.Family | None) -> list[tuple[str, nn.Module]]:
    """(name relative to the block, module) of the fused experts modules in one decoder block (none for dense
    blocks, e.g. Qwen3-MoE's mlp_only_layers, and for families without experts)."""
    if fam is None or not fam.is_moe():
        return []
    path = ".".join(p for p in (fam.ffn.path, fam.ffn.experts) if p)
    m = fam.get(block, path)
    if m is None or isinstance(m, Experts) or not isinstance(getattr(m, "gate_up_proj", None), torch.Tensor):
        return []
    return [(path, m)]


def _sizes(name: str, m: nn.Module, fam: families.Family) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused experts module, or a one-line error for layouts not handled."""
    gu, down = m.gate_up_proj, m.down_proj
    if gu.dim() != 3 or down.dim() != 3:
        raise CompressError(f"{fam.name}: {name} holds {gu.dim()}-D experts; per-expert conversion needs 3-D "
                            "gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2) or getattr(m, "gate_up_proj_bias", None) is not None:
        raise CompressError(f"{fam.name}: {name} has gate_up_proj {tuple(gu.shape)} and down_proj "
                            f"{tuple(down.shape)}; per-expert conversion handles [E, 2I, H] and [E, H, I] without bias")
    return E, H, two_i // 2


def planned_linears(block: nn.Module, fam: families.Family | None = None) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the linears a weight quantizer will see in this block: its linears
    (nn.Linear, Conv1D) and, for fused experts, the per-expert linears `unfuse_block` makes of them. Works on
    meta-device models (the planner counts with it)."""
    out = {name: linear_shape(m) for name, m in block.named_modules() if name and is_linear(m)}
    for path, m in fused_experts(block, fam):
        E, H, I = _sizes(path, m, fam)
        gate, up, down = fam.ffn.expert_names
        for e in range(E):
            out.update({f"{path}.{e}.{gate}": (H, I), f"{path}.{e}.{up}": (H, I), f"{path}.{e}.{down}": (I, H)})
    return out


def linear_like_params(block: nn.Module) -> int:
    """Parameters in the block's linear-like weights, quantized or not: linears (nn.Linear and its subclasses,
    Conv1D, GPTQ QuantLinear counted as in x out) and stacked (3-D) expert tensors. The denominator of the
    quantized fraction; the router (a bare [E, H] parameter) is not counted."""
    total = 0
    for m in block.modules():
        if hasattr(m, "qweight"):
            total += m.in_features * m.out_features
        elif is_linear(m):
            total += m.weight.numel()
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False) if p.dim() == 3)
    return total


@torch.no_grad()
def unfuse_block(block: nn.Module, fam: families.Family | None, copy: bool = True) -> int:
    """Replace the fused experts module(s) of one block by `Experts` (in place); returns how many experts were made.

    copy=True: the expert linears get the fused weights (the same numbers, on the same device and dtype; the
    fused tensors are released). copy=False: empty skeletons, for loading a checkpoint into.
    """
    made = 0
    for path, m in fused_experts(block, fam):
        E, H, I = _sizes(path, m, fam)
        gu, down = m.gate_up_proj, m.down_proj
        experts = Experts([ExpertMLP(H, I, m.act_fn, fam.ffn.expert_names, dtype=gu.dtype) for _ in range(E)])
        if gu.device.type != "meta":
            experts.to_empty(device=gu.device)
        if copy and gu.device.type != "meta":
            gate, up, dn = fam.ffn.expert_names
            for e, ex in enumerate(experts):
                getattr(ex, gate).weight.copy_(gu[e, :I])   # [I, H]
                getattr(ex, up).weight.copy_(gu[e, I:])     # [I, H]
                getattr(ex, dn).weight.copy_(down[e])       # [H, I]
        block.set_submodule(path, experts)
        made += E
    return made


def unfuse(model: nn.Module, copy: bool = True) -> int:
    """unfuse_block on every decoder block of a model of a family with experts; returns the experts made (0 for
    dense families)."""
    fam = families.find(model)
    if fam is None or not fam.is_moe():
        return 0
    return sum(unfuse_block(block, fam, copy) for block in fam.layer_list(model))


def expert_lists(block: nn.Module) -> list[str]:
    """Names (relative to the block) of its per-expert `Experts` lists."""
    return [name for name, m in block.named_modules() if isinstance(m, Experts)]
