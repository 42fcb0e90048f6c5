"""Model-agnostic helpers for layer-by-layer algorithms (GPTQ, and anything else that walks decoder blocks).

One `decoder_layers(model)` serves Llama/Mistral/Qwen (`model.layers`), GPT-2 (`transformer.h`), BERT-likes
(`encoder.layer`), NeoX, OPT...: it picks the ModuleList of identical blocks that holds most parameters, so no
per-model driver is needed. `linears(block)` lists the weight layers of a block (nn.Linear and GPT-2's Conv1D),
`capture_layer_inputs` records what the model feeds its first block (hidden states plus keyword arguments such as
the attention mask and the rotary position embeddings) by stopping the forward with a sentinel exception, and
`sequential_groups` derives GPTQ's "true sequential" order (q/k/v, then o, then gate/up, then down) from one traced
forward of a block: linears that read the same input tensor form a group, groups come in execution order.

Not supported: encoder-decoder models (two stacks of blocks), blocks that call a linear more than once per forward.
Mixture-of-experts blocks are walked once their experts are per-expert linears (compress/moe.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from compress import measure
from compress.errors import CompressError

try:  # GPT-2 style models use a transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs have been recorded."""


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), the layers GPTQ quantizes."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view; Conv1D stores it transposed)."""
    return module.weight.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Make `weight` [out_features, in_features] the module's weight tensor (no copy; Conv1D gets its transpose)."""
    module.weight.data = weight.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear or Conv1D."""
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def decoder_layers_with_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the model's repeated blocks: the homogeneous ModuleList with most weights.

    Blocks qualify when they hold a linear layer (or an already quantized one, recognised by a `qweight` buffer).
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(is_linear(m) or hasattr(m, "qweight") for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in (*module.parameters(), *module.buffers()))  # quantized blocks keep buffers
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise CompressError(
            f"{type(model).__name__} has no list of repeated blocks with linear layers; "
            "layer-by-layer stages support decoder/encoder stacks (Llama, Mistral, Qwen, GPT-2, BERT...)"
        )
    return best


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks (decoder layers of Llama/Mistral/Qwen/GPT-2, encoder layers of BERT-likes)."""
    return decoder_layers_with_name(model)[1]


def linears(block: nn.Module) -> dict[str, nn.Module]:
    """Named linear layers (nn.Linear, Conv1D) inside one block, in registration order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


# A quantization stage that would leave more than half of the blocks' linear weights unquantized is refused: its
# result would be reported as quantized while mostly 16-bit (MoE experts that no linear-walker saw did exactly that).
MIN_QUANTIZED_FRACTION = 0.5


def quantized_fraction(quantized: int, total: int, quantized_in_blocks: int, block_linear: int) -> dict:
    """What share of a model a quantization stage really quantized (for its stats): of all parameters, and of the
    linear-like weights of the blocks (linears and MoE experts: what a weight quantizer is expected to cover)."""
    return {"of_params": round(quantized / max(total, 1), 4),
            "of_block_linears": round(quantized_in_blocks / max(block_linear, 1), 4),
            "quantized_params": quantized, "params": total, "block_linear_params": block_linear}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (Llama returns a tensor, older blocks and BERT a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors (also inside tuples/lists/dicts) to device; floating ones to dtype when given."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_to(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def move(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Public form of `_to`: tensors in nested containers to device (and floating ones to dtype)."""
    return _to(value, device, dtype)


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Turn off the key/value cache during calibration forwards (blocks must not get a Cache object)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None and old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and old is not None:
            config.use_cache = old


def outside_tensors(model: nn.Module, layers_name: str) -> list[torch.Tensor]:
    """The parameters and buffers of `model` outside its block list (embeddings, final norm, head, rotary tables)."""
    prefix = layers_name + "."
    return [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(prefix)]


@contextlib.contextmanager
def outside_on(model: nn.Module, layers_name: str, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the blocks (embeddings, rotary, final norm...) to device, then back."""
    moved: list[tuple[torch.Tensor, torch.device]] = []
    for t in outside_tensors(model, layers_name):
        if t.device != device:
            moved.append((t, t.device))
            t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, dev in moved:
            t.data = t.data.to(dev)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: list[torch.Tensor], device: torch.device
) -> list[tuple[torch.Tensor, tuple, dict]]:
    """For each batch of token ids [B, T]: (hidden states, extra positional args, kwargs) fed to block 0.

    Runs the model with a pre-hook on block 0 that records its inputs and raises StopForward, so only the
    embeddings run. Kwargs (attention mask, position ids, rotary cos/sin...) are kept per batch: their shapes
    follow the batch.
    """
    layers_name, layers = decoder_layers_with_name(model)
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append((hidden, rest, dict(kwargs)))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with no_kv_cache(model), outside_on(model, layers_name, device):
            for ids in batches:
                try:
                    model(input_ids=ids.to(device))
                except StopForward:
                    pass
                else:
                    raise RuntimeError("block 0 was never called: cannot capture its inputs")
    finally:
        handle.remove()
    return captured


def call_block(block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    """Run one block on recorded inputs and return its output hidden states."""
    return block_output(block(hidden, *rest, **kwargs))


@torch.no_grad()
def trace_block(
    block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict, optional: tuple[str, ...] = ()
) -> tuple[list[list[str]], dict[str, int], dict[str, tuple[str, int, int]]]:
    """One traced forward of a block: (true-sequential groups, linears executed by the end of each submodule, tails).

    Groups: linears that read the very same input tensor (q/k/v; gate/up) form one group; groups follow execution
    order, so group g's inputs depend only on groups < g. Llama: [[q,k,v],[o],[gate,up],[down]].
    Spans: submodule name -> how many linears had run when it returned (submodules called more than once are left
    out). A submodule whose span only covers final linears computes a final output: it can be replayed.
    Tails: submodule name -> (linear, position, length) where the submodule returns, unchanged, the output of the
    last linear it ran: the very tensor, not modified in place since (position -1), or a tuple of `length` holding
    it at that position and None elsewhere. Llama: self_attn -> (o_proj, 0, 2), mlp -> (down_proj, -1, 0). Such a
    submodule's output is that linear applied to its recorded input, so it never has to run again.
    Linears under the submodules named in `optional` (MoE experts: only those the router picked run) may be left
    uncalled; any other linear the forward does not call is an error.
    """
    lin = linears(block)
    lin_ids = {id(m): n for n, m in lin.items()}
    order: list[tuple[str, int]] = []  # (linear name, id of its input tensor), in call order
    keep: list[torch.Tensor] = []  # hold the inputs and outputs so their ids stay unique during the trace
    spans: dict[str, int] = {}
    calls: dict[str, int] = {}
    outputs: dict[str, tuple[int, int]] = {}  # linear -> (id, version) of its output when it returned
    tails: dict[str, tuple[str, int, int]] = {}

    def pre(module, args):
        if id(module) in lin_ids:
            x = args[0] if args else None
            order.append((lin_ids[id(module)], id(x)))
            keep.append(x)

    def tail_of(out, last: str) -> int | None:
        if last not in outputs:
            return None
        def same(t):
            return isinstance(t, torch.Tensor) and (id(t), t._version) == outputs[last]
        if same(out):
            return -1
        if isinstance(out, tuple):
            hits = [k for k, o in enumerate(out) if same(o)]
            if len(hits) == 1 and all(o is None for k, o in enumerate(out) if k != hits[0]):
                return hits[0]
        return None

    def post(name):
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            spans[name] = len(order)
            if id(module) in lin_ids:
                if isinstance(out, torch.Tensor):
                    outputs[name] = (id(out), out._version)
                    keep.append(out)
            elif order:
                pos = tail_of(out, order[-1][0])
                if pos is not None:
                    tails[name] = (order[-1][0], pos, len(out) if pos >= 0 else 0)
        return hook

    handles = []
    for name, m in block.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post(name)))
    try:
        call_block(block, hidden, rest, kwargs)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    groups: list[list[str]] = []
    last_input = None
    for name, inp in order:
        if name in seen:
            raise CompressError(f"linear {name!r} is called twice in one block forward; GPTQ cannot order it")
        seen.add(name)
        if groups and inp == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    missing = [n for n in lin if n not in seen and not any(n.startswith(o + ".") for o in optional)]
    if missing:
        raise CompressError(f"linears {missing} in the block were not called during calibration; cannot quantize them")
    once = {n: k for n, k in spans.items() if calls[n] == 1}
    return groups, once, {n: t for n, t in tails.items() if n in once and t[0].startswith(n + ".")}


def sequential_groups(block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> list[list[str]]:
    """GPTQ's true-sequential order for this kind of block (see trace_block). Llama: [[q,k,v],[o],[gate,up],[down]]."""
    return trace_block(block, hidden, rest, kwargs)[0]


class _Recorder(nn.Module):
    """Stands in for one block while the model's forward runs: records the arguments the model passes it (they
    differ by layer where layer types differ: sliding or full attention masks, local or global rotary tables)
    and hands the hidden states on unchanged, in the block's own output structure."""

    def __init__(self, arity: int | None):
        super().__init__()
        self.arity, self.seen = arity, []

    def forward(self, hidden, *args, **kwargs):
        self.seen.append((hidden, args, kwargs))
        return hidden if self.arity is None else (hidden, *([None] * (self.arity - 1)))


@torch.no_grad()
def _stop(module, args):
    raise StopForward


def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> list[dict]:
    """For each batch of token ids: {"hidden": block 0's input, "args": [per block (extra args, kwargs)]}.

    capture_layer_inputs records block 0's inputs only; a model whose layers have types (Gemma 2/3, Qwen with
    sliding windows) passes each block its own mask and rotary table, so walking blocks needs every block's.
    The model's forward runs with every block replaced by a _Recorder (no block computes), then the blocks are put
    back."""
    layers_name, layers = decoder_layers_with_name(model)
    h, rest, kw = capture_layer_inputs(model, batches[:1], device)[0]
    first = layers[0]
    home = next(first.parameters()).device
    out = first.to(device)(h, *rest, **kw)  # the output structure the model expects back from a block
    first.to(home)
    arity = len(out) if isinstance(out, (tuple, list)) else None
    recorders = nn.ModuleList([_Recorder(arity) for _ in layers])
    set_submodule(model, layers_name, recorders)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    stop = head.register_forward_pre_hook(_stop) if head is not None else None  # every block's inputs are known there
    try:
        with no_kv_cache(model), outside_on(model, layers_name, device):
            for ids in batches:
                try:
                    model(input_ids=ids.to(device))
                except StopForward:
                    pass
    finally:
        set_submodule(model, layers_name, layers)
        if stop is not None:
            stop.remove()
        if torch.device(device).type == "cpu":  # a memory-mapped input: give back the embedding rows the tokens read
            measure.page_out_mapped(outside_tensors(model, layers_name))
    return [{"hidden": recorders[0].seen[b][0], "args": [(r.seen[b][1], r.seen[b][2]) for r in recorders]}
            for b in range(len(batches))]
