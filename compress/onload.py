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
from compress.modeling import block_output, capture_block_inputs, decoder_layers_with_name, outside_on, set_submodule


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`module` on `device` for the block, then back where it was; on a CPU, its memory-mapped pages paged out and
    its caches (dequantized GPTQ weights) dropped, so only the block that runs is resident."""
    device = torch.device(device)
    home = next(module.parameters(), torch.empty(0)).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        for m in module.modules():
            if hasattr(m, "clear_cache"):
                m.clear_cache()
        if home.type == "cpu":
            measure.page_out_mapped(list(module.state_dict().values()))


class _Replay(nn.Module):
    """Stands in for the block list in the tail forward: returns the last block's recorded output of batch `b`."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs, self.batch = outputs, 0

    def forward(self, *args, **kwargs):
        return self.outputs[self.batch]


@torch.no_grad()
def logits_by_block(model: nn.Module, batches: list[torch.Tensor], device, **kwargs) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, logits) of each batch of token ids [B, T], computed one block at a time on `device`."""
    device = torch.device(device)
    layers_name, layers = decoder_layers_with_name(model)
    inputs = capture_block_inputs(model, batches, device)            # per batch: block 0's hidden, every block's args
    hidden = [x["hidden"] for x in inputs]
    outputs: list = []
    for i, block in enumerate(layers):
        with onloaded(block, device):
            outputs = [block(h, *x["args"][i][0], **x["args"][i][1]) for h, x in zip(hidden, inputs)]
        hidden = [block_output(o) for o in outputs]
    replay = _Replay(outputs)
    set_submodule(model, layers_name, nn.ModuleList([replay]))
    try:
        with outside_on(model, layers_name, device):
            for b, ids in enumerate(batches):
                replay.batch = b
                yield b, model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
    finally:
        set_submodule(model, layers_name, layers)
        outside = [t for n, t in model.state_dict().items() if not n.startswith(layers_name + ".")]
        measure.page_out_mapped(outside)  # the head and embeddings the tail read (CPU, memory-mapped)
