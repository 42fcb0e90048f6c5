"""HF tokenizer -> GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), for llama.cpp.

Keys (GGUF spec, "Tokenizer"; read by llama.cpp's src/llama-vocab.cpp):
    tokenizer.ggml.model        "gpt2" = byte-level BPE (GPT-2, SmolLM2, Llama 3 style)
    tokenizer.ggml.pre          which pre-tokenizer (regex split before BPE) llama.cpp applies, by name
    tokenizer.ggml.tokens       the token strings by id, padded to the model's vocab_size with "[PAD<id>]"
    tokenizer.ggml.token_type   NORMAL, CONTROL (special added tokens), USER_DEFINED (other added tokens),
                                UNUSED (padding ids the tokenizer does not have)
    tokenizer.ggml.merges       "left right" in rank order
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template     the tokenizer's Jinja chat template, when it has one

`tokenizer.ggml.pre` is chosen from the structure of the tokenizer's own pre-tokenizer (tokenizer.json), not from a
list of known models: each entry of PRE_TOKENIZERS is a pre-tokenizer whose splitting is the same as the llama.cpp
regexes behind that name (llama-vocab.cpp, `LLAMA_VOCAB_PRE_TYPE_*`). llama.cpp's own converter instead hashes
the token ids of a fixed probe text and looks the hash up in a table of known models. Note SmolLM2 from the zoo: its
tokenizer.json was rebuilt by transformers from a GGUF file and lost the digit splitting of the original
(`Digits` before `ByteLevel`), so it maps to "gpt-2", which is what that tokenizer does; tests compare llama.cpp's
tokenization with the HF tokenizer's. A BPE with no merges (compress.tiny's byte tokenizer: one token per byte)
splits to bytes whatever the regex, so it gets "default".
add_bos_token / add_eos_token are read from what the tokenizer does (encode "a" with and without special tokens).

Not supported: SentencePiece / Unigram ("llama", "t5" vocabularies), WordPiece (BERT), byte-level BPE with
add_prefix_space (llama.cpp's BPE adds no prefix space), pre-tokenizers outside PRE_TOKENIZERS.
"""

from __future__ import annotations

import json

import gguf
from tokenizers import pre_tokenizers

from compress.errors import CompressError

# llama.cpp pre-tokenizer name <- the tokenizers pre_tokenizer (as in tokenizer.json, "type"s and the keys that
# change the split) that splits text the same way.
PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      {"type": "ByteLevel", "use_regex": True}]},
}
SPLIT_KEYS = ("type", "use_regex", "individual_digits", "pretokenizers", "pattern", "behavior", "invert")


def _split_shape(pre: dict | None):
    """The part of a pre_tokenizer description that decides how text is split (drops offsets/prefix options)."""
    if pre is None:
        return None
    out = {}
    for k in SPLIT_KEYS:
        if k in pre:
            out[k] = [_split_shape(p) for p in pre[k]] if k == "pretokenizers" else pre[k]
    return out


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json dict, or a CompressError."""
    if not spec["model"].get("merges"):
        return "default"
    shape = _split_shape(spec.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if shape == _split_shape(known):
            return name
    raise CompressError(f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no known "
                        f"llama.cpp equivalent; known: {', '.join(PRE_TOKENIZERS)}")


def _byte_level(pre: dict | None) -> dict | None:
    """The ByteLevel step of a pre-tokenizer, if any."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return pre
    for p in pre.get("pretokenizers") or []:
        found = _byte_level(p)
        if found is not None:
            return found
    return None


def _merges(spec: dict) -> list[str]:
    """BPE merges as "left right" strings (tokenizer.json stores either that or [left, right] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]


def describe(tokenizer, vocab_size: int) -> dict:
    """Everything `add_to_writer` writes, as plain Python values (also what tests compare)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CompressError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    byte_level = _byte_level(spec.get("pre_tokenizer"))
    if byte_level is None or kind not in ("BPE", "WordLevel"):
        raise CompressError(f"GGUF export supports byte-level BPE tokenizers; this one is {kind} "
                            f"(pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')})")
    if byte_level.get("add_prefix_space"):
        raise CompressError("the tokenizer adds a prefix space (ByteLevel add_prefix_space), which llama.cpp's BPE "
                            "does not do")
    if kind == "WordLevel":  # a byte vocabulary without merges is a BPE with no merges; anything else is not
        vocab = spec["model"]["vocab"]
        if not set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab):  # the 256 printable stand-ins for bytes
            raise CompressError("a WordLevel tokenizer exports to GGUF only when it holds all 256 byte-level tokens")
    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise CompressError(f"the tokenizer has {n_tok} tokens but the model only {vocab_size} embedding rows")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    names = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    for i in range(vocab_size):
        if i >= n_tok or names[i] is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(names[i])
            types.append(gguf.TokenType.NORMAL)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    return {
        "model": "gpt2",
        "pre": pre_tokenizer_name(spec),
        "tokens": tokens,
        "token_types": [int(t) for t in types],
        "merges": _merges(spec),
        "bos": bos, "eos": eos, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": bos is not None and len(with_special) > len(plain) and with_special[0] == bos,
        "add_eos": eos is not None and len(with_special) > len(plain) and with_special[-1] == eos,
        "chat_template": template if isinstance(template, str) else None,
    }


def add_to_writer(writer: gguf.GGUFWriter, d: dict) -> None:
    """Write a `describe` dict as GGUF keys. An empty merges list is written as an empty array (see writer.py)."""
    writer.add_tokenizer_model(d["model"])
    writer.add_tokenizer_pre(d["pre"])
    writer.add_token_list(d["tokens"])
    writer.add_token_types(d["token_types"])
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, d["merges"], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if d[key] is not None:
            add(int(d[key]))
    writer.add_add_bos_token(bool(d["add_bos"]))
    writer.add_add_eos_token(bool(d["add_eos"]))
    writer.add_add_space_prefix(False)
    if d["chat_template"]:
        writer.add_chat_template(d["chat_template"])
