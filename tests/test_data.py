"""compress.data: documents, disjoint deterministic splits, token streams, blocks and their cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from compress import data
from compress.errors import CompressError


def _paragraphs(splits: dict) -> dict:
    return {s: {p for passage in texts for p in passage.split("\n\n")} for s, texts in splits.items()}


def test_txt_splits_are_disjoint_complete_stable_and_nonempty(text_file):
    docs = data.load_documents(str(text_file))
    assert len(docs) == 1  # a .txt file is one document
    a, b = data.split_documents(docs), data.split_documents(docs)
    assert a == b
    assert all(a[s] for s in data.SPLITS), {s: len(v) for s, v in a.items()}
    paras = _paragraphs(a)
    assert not paras["train"] & paras["validation"]
    assert not paras["train"] & paras["test"]
    assert not paras["validation"] & paras["test"]
    every = {p.strip("\n") for p in text_file.read_text().split("\n\n") if p.strip()}
    assert paras["train"] | paras["validation"] | paras["test"] == every  # nothing lost, nothing invented
    fps = {s: data.fingerprint(a[s]) for s in data.SPLITS}
    assert fps == {s: data.fingerprint(b[s]) for s in data.SPLITS}
    assert len(set(fps.values())) == 3
    assert len(a["train"]) and sum(map(len, a["train"])) > sum(map(len, a["test"]))


def test_assignment_depends_on_chunk_text_only():
    rng = random.Random(0)
    words = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(700)) for _ in range(30)]
    docs = ["\n\n".join(w[i:i + 500] for i in range(0, len(w), 500)) for w in words]  # 500-char paragraphs
    a = data.split_documents(docs)
    b = data.split_documents(list(reversed(docs)))
    for s in data.SPLITS:
        assert _paragraphs(a)[s] == _paragraphs(b)[s]


def test_small_corpus_still_fills_every_split():
    docs = [f"Document {i}. " + "word " * 450 for i in range(3)]  # three chunks in all
    out = data.split_documents(docs)
    assert sorted(len(out[s]) for s in data.SPLITS) == [1, 1, 1]
    with pytest.raises(CompressError, match="too little text"):
        data.split_documents(["just a little text"])


def test_fingerprint_counts_boundaries():
    assert data.fingerprint(["ab", "c"]) != data.fingerprint(["a", "bc"])
    assert data.fingerprint(["x"]) == data.fingerprint(["x"])


def test_jsonl_documents_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert data.load_documents(str(p)) == ["first", "second"]
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CompressError, match=r"d.jsonl:2: .*\"text\""):
        data.load_documents(str(p))
    p.write_text("{not json\n")
    with pytest.raises(CompressError, match=r"d.jsonl:1: not valid JSON"):
        data.load_documents(str(p))


def test_check_spec(tmp_path, text_file):
    data.check_spec(str(text_file))
    data.check_spec("zoo:austen")
    data.check_spec("hf:wikitext:wikitext-2-raw-v1")
    data.check_spec("hf:org/name")
    for bad, msg in [("zoo:nope", "unknown zoo corpus"), ("zoo:smollm2-135m", "unknown zoo corpus"),
                     (str(tmp_path / "missing.txt"), "not found"), ("corpus.csv", "unknown data source"),
                     ("hf:", "bad HF dataset spec"), ("hf:a:b:c", "bad HF dataset spec"), ("", "non-empty")]:
        with pytest.raises(CompressError, match=msg):
            data.check_spec(bad)


def test_hf_source_offline_is_one_line_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompressError) as e:
        data.load_documents("hf:compress-tests/surely-not-a-dataset")
    assert "\n" not in str(e.value) and "hf:compress-tests/surely-not-a-dataset" in str(e.value)


def test_token_stream_and_blocks_layout(tiny_llama, text_file):
    _, tok = tiny_llama
    spec = str(text_file)
    stream = data.token_ids(tok, spec, "train")
    texts = data.split_texts(spec, "train")
    assert int((stream == tok.eos_token_id).sum()) == len(texts) - 1  # EOS between passages only
    assert tok.decode(stream[: len(texts[0].encode())]) == texts[0]

    blocks = data.token_blocks(tok, spec, "train", seq_len=64, max_tokens=640)
    assert blocks.shape == (10, 64) and blocks.dtype == torch.long
    assert (blocks[:, 0] == tok.bos_token_id).all()
    assert torch.equal(blocks[:, 1:].reshape(-1), stream[: 10 * 63])

    plain = data.token_blocks(tok, spec, "train", seq_len=64, max_tokens=None, bos=False)
    assert plain.shape == (len(stream) // 64, 64)
    assert torch.equal(plain.reshape(-1), stream[: plain.numel()])
    assert data.token_blocks(tok, spec, "train", seq_len=64, max_tokens=100).shape == (1, 64)


def test_token_cache_is_npy_and_is_used(tiny_llama, text_file, monkeypatch):
    _, tok = tiny_llama
    first = data.token_ids(tok, str(text_file), "test")
    files = list((data.cache_dir() / "tokens").glob("*.npy"))
    assert files and all(not f.name.endswith(".tmp.npy") for f in files)
    assert any(np.array_equal(np.load(f, allow_pickle=False), first.numpy()) for f in files)

    def boom(*a, **k):
        raise AssertionError("tokenizer called although the split is cached")

    monkeypatch.setattr(type(tok), "__call__", boom)
    assert torch.equal(data.token_ids(tok, str(text_file), "test"), first)


def test_cache_key_follows_the_text(tiny_llama, tmp_path):
    _, tok = tiny_llama
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(f"Paragraph {i} " + "abc " * 150 for i in range(12)))
    before = data.token_ids(tok, str(p), "train")
    p.write_text("\n\n".join(f"Paragraph {i} " + "xyz " * 150 for i in range(12)))
    after = data.token_ids(tok, str(p), "train")
    assert not torch.equal(before, after)


def test_calibration_blocks_are_seeded_windows_of_train(tiny_llama, text_file):
    _, tok = tiny_llama
    spec = str(text_file)
    a = data.calibration_blocks(tok, spec, n=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and (a[:, 0] == tok.bos_token_id).all()
    assert torch.equal(a, data.calibration_blocks(tok, spec, n=6, seq_len=32, seed=1))
    assert not torch.equal(a, data.calibration_blocks(tok, spec, n=6, seq_len=32, seed=2))
    train = data.token_ids(tok, spec, "train").tolist()
    joined = ",".join(map(str, train))
    for row in a[:, 1:].tolist():
        assert ",".join(map(str, row)) in joined


def test_length_errors(tiny_llama, text_file):
    _, tok = tiny_llama
    with pytest.raises(CompressError, match="seq_len"):
        data.token_blocks(tok, str(text_file), "test", seq_len=1)
    with pytest.raises(CompressError, match="max_tokens"):
        data.token_blocks(tok, str(text_file), "test", seq_len=64, max_tokens=10)
    with pytest.raises(CompressError, match="not one block"):
        data.token_blocks(tok, str(text_file), "test", seq_len=100_000)
    with pytest.raises(CompressError, match="unknown split"):
        data.token_ids(tok, str(text_file), "dev")


def test_sentence_rows_are_padded_sentences(text_file):
    from compress.tiny import build

    from conftest import TINY_BERT

    _, tok = build(TINY_BERT)  # byte-level: one id per byte, no special tokens added
    rows = data.sentence_rows(tok, str(text_file), "train", seq_len=48)
    first = data.sentences(data.split_texts(str(text_file), "train"), 1)[0]
    real = rows != tok.pad_token_id
    assert rows.shape[1] == 48 and rows.dtype == torch.long
    assert tok.decode(rows[0][real[0]]) == first[:48]  # one sentence per row, truncated to seq_len
    assert bool((real.long().diff(dim=1) <= 0).all())  # right padding: no token after a pad
    capped = data.sentence_rows(tok, str(text_file), "train", seq_len=48, max_tokens=200)
    assert torch.equal(capped, rows[: len(capped)])
    assert (capped != tok.pad_token_id).sum() >= 200 > (capped[:-1] != tok.pad_token_id).sum()
