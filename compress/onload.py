"""Sequential onloading: run a model bigger than the device one decoder block at a time.

The model stays on the host, memory-mapped from its safetensors files (how compress.checkpoint.load leaves it on
a CPU); each block is moved to the device while it runs and back after, and on a CPU the pages of a block that is
done are handed back to the kernel (measure.page_out_mapped) and its dequantized caches dropped, so resident
memory holds one block and the activations, not the model:

    for b, logits in logits_by_block(model, batches, device):   # the same logits a whole-model forward gives
        ...

Layer by layer rather than batch by batch: every batch goes through block 0, then block 1, ..., so each block is
read from disk once, not once per batch; the hidden states of all batches are what is kept between blocks. The
embeddings, rotary tables and masks come from the model's own forward (every block's, captured with the blocks
stood in for: layer types give blocks different masks and rotary tables), and the
final norm, head and any logit scaling from the model's own code too (the blocks replayed by their recorded
outputs), so the result is the whole-model forward's, bit for bit. GPTQ walks blocks the same way
(compress/stages/gptq.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from compress import measure
from compress.modeling import (
    block_output, capture_block_inputs, decoder_layers_with_name, outside_on, outside_tensors, set_submodule,
)


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """`module` on `device` for the block, then back where it was; on a CPU, its memory-mapped pages paged out and
    its caches (dequantized GPTQ weights) dropped, so only the block that runs is resident. compute_dtype: its
    float16 tensors computed in that dtype meanwhile (see `computed_in`)."""
    device = torch.device(device)
    home = next(module.parameters(), torch.empty(0)).device
    module.to(device)
    try:
        with computed_in([*module.parameters(), *module.buffers()], compute_dtype):
            yield module
    finally:
        module.to(home)
        for m in module.modules():
            if hasattr(m, "clear_cache"):
                m.clear_cache()
        if home.type == "cpu":
            measure.page_out_mapped(list(module.state_dict().values()))


@contextlib.contextmanager
def computed_in(tensors: list, dtype: torch.dtype | None) -> Iterator[None]:
    """The float16 ones of `tensors` hold float32 (or `dtype`) copies while inside, their own data again after:
    a float16 model computed in float32 on a CPU (evaluate.upcast_float16_on_cpu) a block at a time, with
    nothing of the copies kept. None: nothing changes."""
    swapped = []
    if dtype is not None:
        for t in {id(t): t for t in tensors}.values():
            if t.dtype == torch.float16 and dtype != torch.float16:
                swapped.append((t, t.data))
                t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, data in swapped:
            t.data = data


class _Replay(nn.Module):
    """Stands in for the block list in the tail forward: returns the last block's recorded output of batch `b`."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs, self.batch = outputs, 0

    def forward(self, *args, **kwargs):
        return self.outputs[self.batch]


@torch.no_grad()
def logits_by_block(model: nn.Module, batches: list[torch.Tensor], device, compute_dtype: torch.dtype | None = None,
                    **kwargs) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, logits) of each batch of token ids [B, T], computed one block at a time on `device`;
    compute_dtype: float16 tensors computed in it (float32 on a CPU, as evaluate computes float16 models)."""
    device = torch.device(device)
    layers_name, layers = decoder_layers_with_name(model)
    with computed_in(outside_tensors(model, layers_name), compute_dtype):
        inputs = capture_block_inputs(model, batches, device)        # per batch: block 0's hidden, every block's args
    hidden = [x["hidden"] for x in inputs]
    outputs: list = []
    for i, block in enumerate(layers):
        with onloaded(block, device, compute_dtype):
            outputs = [block(h, *x["args"][i][0], **x["args"][i][1]) for h, x in zip(hidden, inputs)]
        hidden = [block_output(o) for o in outputs]
    replay = _Replay(outputs)
    set_submodule(model, layers_name, nn.ModuleList([replay]))
    try:
        with outside_on(model, layers_name, device), computed_in(outside_tensors(model, layers_name), compute_dtype):
            for b, ids in enumerate(batches):
                replay.batch = b
                yield b, model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
    finally:
        set_submodule(model, layers_name, layers)
        measure.page_out_mapped(outside_tensors(model, layers_name))  # the head and embeddings the tail read


def spill(modules: list[nn.Module], path, parameters: bool = False) -> None:
    """Write the buffers (and with `parameters` the parameters) of `modules` to the safetensors file `path` and
    hold them as views of that file, their pages handed back: a stage that builds its output block by block on a
    CPU (GPTQ's packed tensors, 3.4 GiB for Llama-3-8B; a cast's 16-bit weights) keeps it on disk rather than in
    RAM; saving the checkpoint reads it back a shard at a time. A tensor shared by two modules (tied weights) is
    written once and stays one tensor."""
    from safetensors.torch import load_file, save_file

    owners: dict[str, list] = {}  # file key -> [(module, kind, name)] holding that very tensor
    keys: dict[int, str] = {}
    for i, m in enumerate(modules):
        for kind in ("_buffers", "_parameters") if parameters else ("_buffers",):
            for b, t in getattr(m, kind).items():
                if t is None or t.device.type != "cpu":
                    continue
                key = keys.setdefault(id(t), f"{i}.{kind}.{b}")
                owners.setdefault(key, []).append((m, kind, b))
    if not owners:
        return
    first = {k: getattr(m, kind)[b] for k, [(m, kind, b), *_] in owners.items()}
    save_file({k: t.detach().contiguous() for k, t in first.items()}, path)
    for k, t in load_file(path).items():
        if isinstance(first[k], nn.Parameter):
            first[k].data = t  # the Parameter object stays (ties, optimizer-free references)
        else:
            for m, kind, b in owners[k]:
                getattr(m, kind)[b] = t
    measure.page_out_mapped([getattr(m, kind)[b] for ms in owners.values() for m, kind, b in ms])


def cast_paged(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype. A large CPU tensor is cast a slab of rows at a time, each source slab's pages handed back after
    (measure.page_out_mapped): a memory-mapped float32 embedding of a large vocabulary (Llama 3: 2 GiB) is then
    never resident whole next to its cast copy."""
    small = t.numel() * t.element_size() <= measure.CAST_SLAB_BYTES
    if t.device.type != "cpu" or t.dim() == 0 or not t.is_contiguous() or small:
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype)
    rows = max(1, measure.CAST_SLAB_BYTES // max(t[0].numel() * t.element_size(), 1))
    for s in range(0, t.shape[0], rows):
        out[s:s + rows] = t[s:s + rows]
        measure.page_out_mapped([t[s:s + rows]])
    return out


def cast_tensors(modules, dtype: torch.dtype, paged: bool = True, buffers: bool = True,
                 keep=lambda m: False) -> None:
    """Float parameters (and with `buffers` the persistent float buffers) of `modules`, not recursing, cast to
    `dtype` where they are not yet; paged: large CPU tensors a slab at a time (cast_paged). Modules for which
    `keep` is true are left alone (int8 linears). Non-persistent buffers (RoPE inv_freq) stay as built: they are
    recomputed in float32 at load time, so a cast copy would differ from the reloaded checkpoint."""
    to = (lambda t: cast_paged(t, dtype)) if paged else (lambda t: t.to(dtype))
    for module in modules:
        if keep(module):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = to(p.data)
        if not buffers:
            continue
        for name, b in module.named_buffers(recurse=False):
            if (b is not None and b.is_floating_point() and b.dtype != dtype
                    and name not in module._non_persistent_buffers_set):
                module._buffers[name] = to(b)


def cast_outside_spilled(model: nn.Module, layers_name: str, dtype: torch.dtype, scratch, buffers: bool = True,
                         keep=lambda m: False) -> None:
    """cast_tensors on the modules outside the block list, one module at a time, each spilled to `scratch`
    after its cast: the embedding and head (2 GiB each for Llama 3 8B in float32) are never resident together
    with their casts. A tied head is the embedding's very Parameter: cast and written once."""
    from pathlib import Path

    done: set[int] = set()
    for n, m in model.named_modules():
        own = [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None and id(t) not in done]
        if n == layers_name or n.startswith(layers_name + ".") or not own:
            continue
        read = [t.detach() for t in own]  # the input's tensors themselves (a Parameter gets new data below)
        cast_tensors([m], dtype, buffers=buffers, keep=keep)
        spill([m], Path(scratch) / f"outside-{len(done):05d}.safetensors", parameters=True)
        measure.page_out_mapped(read)  # the input's pages the cast read, handed back
        del read
        done |= {id(t) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}
