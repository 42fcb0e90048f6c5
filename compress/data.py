"""Text sources -> documents -> disjoint train/validation/test splits -> token blocks.

A data *spec* names a text source:
- `zoo:NAME`: a packaged corpus (compress/zoo.py: `zoo:shakespeare`, `zoo:austen`); one document per work.
- `path/file.txt`: UTF-8 text, ONE document; its blank-line paragraphs are what gets split (below).
- `path/file.jsonl`: one JSON object per line with a string field "text"; one document per line.
- `hf:DATASET[:CONFIG]` (e.g. `hf:wikitext:wikitext-2-raw-v1`): `datasets.load_dataset`, field "text", one
  document per row, the dataset's own splits concatenated in the order train, validation, test, others.
  Works online or from the local HF datasets cache only. A row-per-line dataset (wikitext) gives one
  document per row, so its token stream carries an EOS between paragraphs. Numbers are therefore on our
  splits, not comparable with published wikitext perplexities.

Splits (`split_documents`), deterministic and disjoint at chunk level:
1. Each document is cut at blank lines into paragraphs; consecutive paragraphs are grouped greedily into
   chunks of at least CHUNK_CHARS (2,000) characters (a document's last chunk may be shorter; a single
   longer paragraph is one chunk). Paragraphs inside a chunk are joined by a blank line.
2. Each chunk goes to a split by u = sha256("compress-split-v1\\0" + chunk) read as a fraction in [0, 1):
   train if u < 0.90, validation if u < 0.95, else test. The assignment depends on the chunk's text only:
   identical chunks land in the same split, and adding documents never moves existing chunks.
3. Every split must be non-empty: if test got no chunk, the chunk with the largest u moves to test; then
   if validation got none, the train chunk with the largest u moves there. Fewer than 3 chunks is an error.
4. Within a split, consecutive chunks of one document are joined back (blank line between), so a split is
   a list of contiguous passages in document order.
`fingerprint` of a split = sha256 over its passages (each prefixed by its UTF-8 length).

Tokens (`token_ids`, `token_blocks`): each passage is tokenized without special tokens; passages are
joined with the tokenizer's EOS (else SEP) between them, none after the last. This id stream is cached as
`$COMPRESS_CACHE/tokens/<key>.npy` (int32; key = sha256 of tokenizer fingerprint, split fingerprint and
split name; loaded with allow_pickle=False). `token_blocks` cuts it into non-overlapping blocks from its
start: with bos=True a block is [BOS] + the next seq_len-1 stream tokens (BOS = the tokenizer's BOS, else
CLS), with bos=False seq_len stream tokens. The cap max_tokens bounds n_blocks * seq_len (tokens fed,
BOS included); a trailing partial block is dropped. `calibration_blocks` takes n windows of the same shape
at seeded random offsets of the TRAIN stream (windows may overlap).

Not supported: other file types, datasets without a "text" field, streaming datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.zoo import cache_dir

SPLITS = ("train", "validation", "test")
CHUNK_CHARS = 2000                        # target chunk size: the unit assigned to a split
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)      # train / validation / test, by hashed chunk
_SPLIT_SALT = b"compress-split-v1\0"      # change it and every split changes: bump with care
_TOKENS_VERSION = "tokens-v1"             # part of the token cache key (the cache layout above)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


# ----------------------------------------------------------------------------- specs and documents


def check_spec(spec: str) -> None:
    """Cheap validation (for --dry-run): known zoo corpus, existing .txt/.jsonl file, or hf: syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise CompressError(f"data source must be a non-empty string, got {spec!r}")
    if spec.startswith("zoo:"):
        from compress import zoo

        name = spec.removeprefix("zoo:")
        if name not in zoo.CORPORA:
            known = ", ".join(f"zoo:{n}" for n in zoo.CORPORA)
            raise CompressError(f"unknown zoo corpus {spec!r}; known: {known}")
        return
    if spec.startswith("hf:"):
        _parse_hf(spec)
        return
    path = Path(spec)
    if path.suffix not in (".txt", ".jsonl"):
        raise CompressError(
            f"unknown data source {spec!r}: use zoo:NAME, a .txt or .jsonl file, or hf:DATASET[:CONFIG]"
        )
    if not path.is_file():
        raise CompressError(f"data file not found: {spec}")


def _parse_hf(spec: str) -> tuple[str, str | None]:
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise CompressError(f"bad HF dataset spec {spec!r}: write hf:DATASET or hf:DATASET:CONFIG")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def load_documents(spec: str) -> list[str]:
    """The documents of a source (see the module docstring for what a document is per kind)."""
    check_spec(spec)
    if spec.startswith("zoo:"):
        from compress import zoo

        docs = zoo.corpus_documents(spec.removeprefix("zoo:"))
    elif spec.startswith("hf:"):
        docs = _hf_documents(*_parse_hf(spec))
    elif spec.endswith(".txt"):
        docs = [Path(spec).read_text(encoding="utf-8")]
    else:
        docs = _jsonl_documents(Path(spec))
    docs = [d.replace("\r\n", "\n") for d in docs if d.strip()]
    if not docs:
        raise CompressError(f"data source {spec} holds no text")
    return docs


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CompressError(f"{path}:{i}: each line must be a JSON object with a string field \"text\"")
        docs.append(row["text"])
    return docs


def _hf_documents(name: str, config: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CompressError("hf: data sources need the `datasets` package: pip install datasets") from None
    try:
        dd = datasets.load_dataset(name, config)
    except Exception as e:  # offline / unknown dataset / bad config: all surface as one readable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CompressError(
            f"cannot load hf:{name}{':' + config if config else ''} ({type(e).__name__}: {first[:200]}); "
            "HF datasets need the internet or a copy in the local HF cache"
        ) from None
    order = sorted(dd.keys(), key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    docs = []
    for split in order:
        if "text" not in dd[split].column_names:
            raise CompressError(f"hf:{name} split {split!r} has no 'text' column (has {dd[split].column_names})")
        docs.extend(dd[split]["text"])
    return docs


# ----------------------------------------------------------------------------- splits


def _chunks(doc: str) -> list[str]:
    """Blank-line paragraphs of `doc`, grouped greedily into chunks of >= CHUNK_CHARS characters."""
    chunks, current, size = [], [], 0
    for para in _PARAGRAPH_BREAK.split(doc):
        para = para.strip("\n")
        if not para.strip():
            continue
        current.append(para)
        size += len(para)
        if size >= CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _unit(chunk: str) -> float:
    """The chunk's deterministic position in [0, 1) that picks its split."""
    return int(hashlib.sha256(_SPLIT_SALT + chunk.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def split_documents(docs: list[str]) -> dict[str, list[str]]:
    """Deterministic, disjoint train/validation/test passages (algorithm in the module docstring)."""
    chunks = [(d, c, _unit(c)) for d, doc in enumerate(docs) for c in _chunks(doc)]  # (doc index, text, u)
    if len(chunks) < 3:
        raise CompressError(
            f"too little text to split: {len(chunks)} chunk(s) of ~{CHUNK_CHARS} characters, need at least 3"
        )
    t_train, t_val = SPLIT_FRACTIONS[0], SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]
    assign = ["train" if u < t_train else "validation" if u < t_val else "test" for _, _, u in chunks]
    if "test" not in assign:
        assign[max(range(len(chunks)), key=lambda i: chunks[i][2])] = "test"
    if "validation" not in assign:
        train = [i for i, s in enumerate(assign) if s == "train"]
        assign[max(train, key=lambda i: chunks[i][2])] = "validation"
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    prev = None  # (doc index, split) of the previous chunk: contiguous same-split chunks are re-joined
    for (d, text, _), split in zip(chunks, assign):
        if prev == (d, split):
            out[split][-1] += "\n\n" + text
        else:
            out[split].append(text)
        prev = (d, split)
    return out


def fingerprint(texts: list[str]) -> str:
    """sha256 hex of a list of texts (each prefixed by its UTF-8 byte length, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(f"{len(b)}:".encode())
        h.update(b)
    return h.hexdigest()


def split_texts(spec: str, split: str) -> list[str]:
    """The passages of one split of a source."""
    if split not in SPLITS:
        raise CompressError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return split_documents(load_documents(spec))[split]


# ----------------------------------------------------------------------------- tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: class, full tokenizer definition (or vocab), special-token ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "sep", "cls", "pad", "mask")]
    h.update(json.dumps(specials).encode())
    return h.hexdigest()


def bos_id(tokenizer) -> int:
    """The id put at the start of each block with bos=True: BOS, else CLS (BERT-style tokenizers)."""
    for tid in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)):
        if tid is not None:
            return int(tid)
    raise CompressError("the tokenizer has no BOS or CLS token: set bos: false")


def separator_id(tokenizer) -> int:
    """The id between documents in a token stream: EOS, else SEP."""
    for tid in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if tid is not None:
            return int(tid)
    raise CompressError("the tokenizer has no EOS or SEP token to separate documents")


def token_ids(tokenizer, spec: str, split: str) -> torch.Tensor:
    """The whole split as one LongTensor [n_tokens] (EOS between passages), cached as .npy."""
    texts = split_texts(spec, split)
    key = hashlib.sha256(
        f"{_TOKENS_VERSION}|{tokenizer_fingerprint(tokenizer)}|{fingerprint(texts)}|{split}".encode()
    ).hexdigest()[:32]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
    sep = np.asarray([separator_id(tokenizer)], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), 64):  # batches of passages bound the tokenizer's (Python list) memory
        batch = tokenizer(texts[start:start + 64], add_special_tokens=False, verbose=False)["input_ids"]
        for piece in batch:  # int32 at once: 4 bytes a token instead of a Python int's 8 to 36
            if pieces:
                pieces.append(sep)
            pieces.append(np.asarray(piece, dtype=np.int32))
        del batch
    arr = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    del pieces
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)
    return torch.from_numpy(arr.astype(np.int64))


def n_blocks(n_stream: int, seq_len: int, max_tokens: int | None, bos: bool) -> int:
    """How many non-overlapping blocks `token_blocks` cuts from a stream of n_stream tokens."""
    n = n_stream // (seq_len - 1 if bos else seq_len)
    return n if max_tokens is None else min(n, max_tokens // seq_len)


def token_blocks(tokenizer, spec: str, split: str, seq_len: int, max_tokens: int | None = None,
                 bos: bool = True) -> torch.Tensor:
    """Non-overlapping blocks [n_blocks, seq_len] from the start of the split's token stream."""
    _check_lengths(seq_len, max_tokens, bos)
    stream = token_ids(tokenizer, spec, split)
    c = seq_len - 1 if bos else seq_len  # stream tokens per block
    n = n_blocks(len(stream), seq_len, max_tokens, bos)
    if n == 0:
        raise CompressError(
            f"{spec} {split} split has {len(stream)} tokens: not one block of seq_len {seq_len}"
            + (f" within max_tokens {max_tokens}" if max_tokens is not None else "")
        )
    blocks = stream[: n * c].view(n, c)  # (n, c)
    if bos:
        blocks = torch.cat([torch.full((n, 1), bos_id(tokenizer), dtype=torch.long), blocks], dim=1)  # (n, seq_len)
    return blocks


def sentences(texts: list[str], n: int | None = None) -> list[str]:
    """The first n (None: all) sentences of 3..64 words in texts (split after . ! ? followed by whitespace)."""
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 3 <= len(s.split()) <= 64:
                out.append(s)
                if len(out) == n:
                    return out
    return out


def sentence_rows(tokenizer, spec: str, split: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """One sentence per row [n, seq_len]: the tokenizer's own special tokens (BERT: [CLS] ... [SEP]), truncated to
    seq_len, right-padded with its pad id; rows are taken in order until max_tokens real tokens (None: all).

    The input a sentence embedder sees (compress.evaluate's agreement embeds sentences the same way), for
    distilling one; positions holding the pad id are padding.
    """
    if tokenizer.pad_token_id is None:
        raise CompressError("sentence rows need a tokenizer with a pad token")
    sents = sentences(split_texts(spec, split))
    if not sents:
        raise CompressError(f"{spec} {split} split has no sentence of 3 to 64 words")
    rows, total = [], 0
    for start in range(0, len(sents), 1024):
        enc = tokenizer(sents[start:start + 1024], truncation=True, max_length=seq_len, padding="max_length",
                        return_tensors="pt", verbose=False)["input_ids"]      # (b, seq_len)
        rows.append(enc)
        total += int((enc != tokenizer.pad_token_id).sum())
        if max_tokens is not None and total >= max_tokens:
            break
    out = torch.cat(rows)
    if max_tokens is not None:
        real = (out != tokenizer.pad_token_id).sum(1).cumsum(0)
        out = out[: max(1, int((real < max_tokens).sum()) + 1)]
    return out


def calibration_blocks(tokenizer, spec: str, n: int, seq_len: int, seed: int, bos: bool = True) -> torch.Tensor:
    """n windows [n, seq_len] at seeded random offsets of the TRAIN stream (same block shape as token_blocks)."""
    _check_lengths(seq_len, None, bos)
    if n < 1:
        raise CompressError(f"number of calibration blocks must be >= 1, got {n}")
    stream = token_ids(tokenizer, spec, "train")
    c = seq_len - 1 if bos else seq_len
    if len(stream) < c:
        raise CompressError(f"{spec} train split has {len(stream)} tokens, fewer than seq_len {seq_len}")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(stream) - c + 1, (n,), generator=g)
    blocks = torch.stack([stream[s: s + c] for s in starts.tolist()])  # (n, c)
    if bos:
        blocks = torch.cat([torch.full((n, 1), bos_id(tokenizer), dtype=torch.long), blocks], dim=1)
    return blocks


def _check_lengths(seq_len: int, max_tokens: int | None, bos: bool) -> None:
    if not isinstance(seq_len, int) or seq_len < (3 if bos else 2):
        raise CompressError(f"seq_len must be an integer >= {3 if bos else 2}, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < seq_len):
        raise CompressError(f"max_tokens must be an integer >= seq_len ({seq_len}) or null, got {max_tokens!r}")
