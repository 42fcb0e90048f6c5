"""Tiny models built from a config, for smoke runs and tests: no weights, no hub, seconds on a CPU.

`model: tiny:configs/models/tiny-llama.json` in a pipeline builds the architecture in that config.json
with random weights (seeded by the pipeline's `seed`) and a byte-level tokenizer (256 bytes + <s>, </s>,
<pad>), so every code path (save, reload, eval, quantize) runs for real on a model of a few hundred
thousand parameters. The numbers such a model gives mean nothing; the code paths they exercise do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from compress.errors import CompressError

SPECIALS = ["<s>", "</s>", "<pad>", "<mask>"]
BYTE_VOCAB = 256 + len(SPECIALS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: ids 0..255 are the bytes (as GPT-2's printable map), then specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the 256 bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>",
        unk_token="<pad>",
    )


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode map for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def read_config(config_path: str | Path) -> dict:
    """The config.json of a tiny model as a dict, or a one-line error."""
    path = Path(config_path)
    if not path.is_file():
        raise CompressError(f"tiny model config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"tiny model config {path} is not valid JSON: {e}") from None
    if "model_type" not in raw:
        raise CompressError(f"tiny model config {path} has no 'model_type'")
    return raw


def build(config_path: str | Path, seed: int = 0):
    """Build (model, tokenizer) from a config.json with seeded random weights.

    The head is chosen from the config's `architectures` by the rule checkpoint loading uses
    (compress.checkpoint.auto_class: …ForCausalLM and …LMHeadModel such as GPT-2's get a causal-LM head,
    …ForMaskedLM a masked-LM head, else a bare model), so a tiny model is built as its checkpoint reloads.
    """
    from compress.checkpoint import auto_class

    path = Path(config_path)
    raw = read_config(path)
    config = AutoConfig.for_model(**raw)
    auto = auto_class(raw)
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    model.eval()
    tok = byte_tokenizer()
    if config.vocab_size < BYTE_VOCAB:
        raise CompressError(f"tiny model config {path}: vocab_size must be >= {BYTE_VOCAB} for the byte tokenizer")
    # Keep generation defaults consistent with the tokenizer.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, name):
            setattr(model.config, name, getattr(tok, name))
    return model, tok
