"""GGUF export on tiny models (CPU, seconds): block formats, exact GPTQ re-encoding, the writer, llama.cpp checks.

The llama.cpp tests run when llama-cpp-python is installed and are skipped (with the reason) otherwise.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from compress.algorithms.gptq import QuantLinear, rtn
from compress.context import Context
from compress.errors import CompressError
from compress.export import arch as archs
from compress.export import ggml, llamacpp, vocab
from compress.export.writer import write_gguf
from compress.stages import gptq as gptq_stage

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")



def _layer(bits: int, group_size: int, sym: bool, seed: int = 0, shape=(48, 256)) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * torch.linspace(0.2, 3, shape[1])  # uneven column scales
    return QuantLinear.from_result(rtn(W, bits, group_size, sym), None)


def _gptq_model(tmp_path, monkeypatch, **kw):
    """A tiny Llama quantized by the gptq stage (calibration tokens patched in, as tests/test_gptq.py does)."""
    from compress.tiny import build
    from conftest import TINY_LLAMA

    model, tok = build(TINY_LLAMA, seed=0)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(gptq_stage, "calibration_tokens",
                        lambda t, cfg, ctx: (tokens, gptq_stage.calibration_fingerprint(tokens, "test", 0)))
    ctx = Context.for_tests(tmp_path, data={"calibration": "test"})
    cfg = gptq_stage.Config(nsamples=8, seq_len=32, batch_size=4, **kw)
    model, _ = gptq_stage.run(model, tok, cfg, ctx)
    return model.float(), tok


def _read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def _dequant(t) -> torch.Tensor:
    """A GGUFReader tensor as float32 [rows, K] (gguf.quants' dequantizer, independent of our encoders)."""
    return ggml.dequantize(np.asarray(t.data), t.tensor_type)


# ----------------------------------------------------------------------------------------------------------------
# Block formats and the GPTQ re-encoding


@pytest.mark.parametrize("bits,group_size,qtype", [(4, 32, "q4_0"), (4, 128, "q4_0"), (4, -1, "q4_0"),
                                                   (8, 32, "q8_0"), (8, 64, "q8_0"), (4, 32, "q4_1")])
def test_symmetric_gptq_reencodes_bit_exact(bits, group_size, qtype):
    layer = _layer(bits, group_size, sym=True)
    if bits == 8:  # the code that becomes int8 -128, outside llama.cpp's own quantizer's range, is exercised
        assert bool((layer.codes() == 0).any())
    data = ggml.encode_quantlinear(layer, qtype)
    assert data.shape == ggml.byte_shape((48, 256), ggml.TYPES[qtype])
    assert torch.equal(ggml.dequantize(data, ggml.TYPES[qtype]), layer.dequantize())


def test_reencoding_follows_a_row_order_exactly():
    layer = _layer(4, 32, sym=True)
    rows = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    data = ggml.encode_quantlinear(layer, "q4_0", rows=rows, chunk_rows=7)  # chunks that do not divide 48
    assert torch.equal(ggml.dequantize(data, ggml.TYPES["q4_0"]), layer.dequantize()[rows])


def test_asymmetric_q4_1_within_documented_bound():
    layer = _layer(4, 32, sym=False)
    got = ggml.dequantize(ggml.encode_quantlinear(layer, "q4_1"), ggml.TYPES["q4_1"])   # (N, K)
    want = layer.dequantize()
    s, z = layer.scales.float(), layer.zeros().float()                                   # (G, N)
    g = layer.g_idx.long()
    bound = (2.0**-11 * (s * z).abs() + 2.0**-25)[g].t()                                 # (N, K)
    err = (got - want).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) > 0  # a real rounding: the bound is tested, not trivially met
    exact = ggml.gptq_offset_error(layer.scales, layer.zeros()) == 0                    # (G, N)
    assert torch.equal(err[exact[g].t()], torch.zeros(int(exact[g].t().sum())))         # m exact -> values exact
    assert float(ggml.gptq_offset_error(layer.scales, layer.zeros()).max()) <= 15 * 2.0**-11


@pytest.mark.parametrize("kw,qtype,match", [
    (dict(bits=4, sym=True, group_size=16), "q4_0", "group_size 16"),
    (dict(bits=4, sym=True, group_size=48), "q4_0", "group_size 48"),
    (dict(bits=4, sym=True, group_size=128, desc_act=True), "q4_0", "act_order"),
    (dict(bits=4, sym=False, group_size=32), "q4_0", "zero points"),
    (dict(bits=8, sym=True, group_size=32), "q4_0", "8-bit"),
    (dict(bits=4, sym=True, group_size=32), "q8_0", "8-bit codes"),
])
def test_non_matching_grids_refused_in_one_line(kw, qtype, match):
    with pytest.raises(CompressError, match=match) as e:
        ggml.check_gptq(qtype, **kw)
    assert "\n" not in str(e.value) and "q4_0 <- gptq {bits: 4, sym: true}" in str(e.value)
    assert ggml.gptq_mismatch("q4_0", 4, True, 128, desc_act=True, static_groups=True) is None
    assert ggml.gptq_mismatch("q4_1", 4, False, 64) is None


def test_layer_checks_catch_what_the_config_hides():
    layer = _layer(4, 32, sym=True)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    layer.g_idx.copy_(layer.g_idx[perm])  # act_order-like g_idx: blocks span groups
    with pytest.raises(CompressError, match="two groups"):
        ggml.encode_quantlinear(layer, "q4_0")
    with pytest.raises(CompressError, match="zero point"):
        ggml.encode_quantlinear(_layer(4, 32, sym=False), "q4_0")


# ----------------------------------------------------------------------------------------------------------------
# Architecture: the RoPE row order


def _rope(x: torch.Tensor, interleaved: bool, base: float = 10000.0) -> torch.Tensor:
    """RoPE on x [T, hd]: HF's rotate-half pairs (i, i + hd/2), or adjacent pairs (2i, 2i + 1), same frequencies."""
    T, hd = x.shape
    ang = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    cos, sin = ang.cos(), ang.sin()                                                    # (T, hd/2)
    if interleaved:
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(T, hd)
    a, b = x[:, : hd // 2], x[:, hd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def test_rope_row_order_keeps_attention_scores():
    g = torch.Generator().manual_seed(0)
    heads, hd, d = 3, 16, 24
    Wq, Wk, X = (torch.randn(heads * hd, d, generator=g, dtype=torch.float64),
                 torch.randn(heads * hd, d, generator=g, dtype=torch.float64),
                 torch.randn(10, d, generator=g, dtype=torch.float64))
    rows = archs.rope_row_order(heads, hd)
    assert sorted(rows.tolist()) == list(range(heads * hd)) and not torch.equal(rows, torch.arange(heads * hd))
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        hf = _rope(X @ Wq[sl].t(), False) @ _rope(X @ Wk[sl].t(), False).t()          # (T, T) scores, HF layout
        cpp = _rope(X @ Wq[rows][sl].t(), True) @ _rope(X @ Wk[rows][sl].t(), True).t()
        torch.testing.assert_close(cpp, hf)


# ----------------------------------------------------------------------------------------------------------------
# Writer round trip (gguf.GGUFReader)


def _expected_weight(model, hf_name: str) -> torch.Tensor:
    w = dict(model.named_parameters())[hf_name].detach().float()
    rows = archs.Names(archs.arch_of(model.config), model.config.num_hidden_layers).rope_rows(hf_name, model.config)
    return w if rows is None else w[rows]


@pytest.mark.parametrize("type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_writer_round_trip_float_model(tiny_llama, tmp_path, type):
    model, tok = tiny_llama
    path = tmp_path / f"tiny.{type}.gguf"
    stats = write_gguf(model, tok, path, type=type)
    kv, tensors = _read(path)
    assert stats["bytes"] == path.stat().st_size and not list(tmp_path.glob("*.tmp"))
    cfg = model.config
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == int(
        {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}[type])
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.feed_forward_length"]) == (4, 64, 160)
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (4, 2)
    assert kv["llama.rope.dimension_count"] == 16 and kv["llama.context_length"] == cfg.max_position_embeddings
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "default"
    assert kv["tokenizer.ggml.merges"] == [] and len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size == 264
    assert kv["tokenizer.ggml.tokens"][256] == "<s>" and kv["tokenizer.ggml.tokens"][263] == "[PAD263]"
    types = kv["tokenizer.ggml.token_type"]
    assert types[97] == gguf.TokenType.NORMAL and types[256] == gguf.TokenType.CONTROL and types[263] == gguf.TokenType.UNUSED
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    # tied embeddings: written once, no output.weight
    assert "output.weight" not in tensors and len(tensors) == 2 + 4 * 9 == sum(stats["tensors"].values())
    names = archs.Names(archs.arch_of(cfg), 4)
    for hf_name, p in model.named_parameters():
        t = tensors[names(hf_name)[0]]
        want = _expected_weight(model, hf_name)
        if p.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(_dequant(t).view(-1), want)
            continue
        if hf_name == "model.embed_tokens.weight" and type in ("q4_0", "q4_1"):
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0  # the tied output matrix, as llama-quantize
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = ggml.TYPES[type]
            assert t.tensor_type == qtype
        ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), qtype), qtype)))
        assert torch.equal(_dequant(t), ref.float()), hf_name


@pytest.mark.parametrize("kw,type", [(dict(method="rtn", bits=4, group_size=32), "q4_0"),
                                     (dict(bits=4, group_size=128), "q4_0"),
                                     (dict(bits=8, group_size=32), "q8_0"),
                                     (dict(bits=4, group_size=64, act_order=True, static_groups=True), "q4_0"),
                                     (dict(method="rtn", bits=4, group_size=32, sym=False), "q4_1")])
def test_writer_reencodes_gptq_model(tmp_path, monkeypatch, kw, type):
    model, tok = _gptq_model(tmp_path, monkeypatch, **kw)
    path = tmp_path / "gptq.gguf"
    stats = write_gguf(model, tok, path, type=type)
    assert stats["sources"]["gptq"] == 28
    _, tensors = _read(path)
    names = archs.Names(archs.arch_of(model.config), 4)
    n = 0
    for full, m in model.named_modules():
        if isinstance(m, QuantLinear):
            rows = names.rope_rows(full + ".weight", model.config)
            want = m.dequantize() if rows is None else m.dequantize()[rows]
            got = _dequant(tensors[names(full + ".weight")[0]])
            if type == "q4_1":
                assert float((got - want).abs().max()) <= 15 * 2.0**-11 * float(m.scales.float().max())
            else:
                assert torch.equal(got, want), full
            n += 1
    assert n == 28
    if type == "q4_1":
        assert 0 < stats["q4_1_offset_error_steps"]["max"] <= 15 * 2.0**-11


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=16), dict(bits=4, group_size=32, act_order=True)])
def test_writer_refuses_non_matching_gptq_before_writing(tmp_path, monkeypatch, kw):
    model, tok = _gptq_model(tmp_path, monkeypatch, **kw)
    path = tmp_path / "refused.gguf"
    with pytest.raises(CompressError, match="exact matches") as e:
        write_gguf(model, tok, path, type="q4_0")
    assert "\n" not in str(e.value)
    assert list(tmp_path.glob("*.gguf*")) == []
    write_gguf(model, tok, path, type="f16")  # a float type takes any grid (dequantized)
    assert path.is_file()


def test_writer_refuses_unsupported_model_in_one_line(tiny_bert, tmp_path):
    model, tok = tiny_bert
    with pytest.raises(CompressError, match="model_type llama"):
        write_gguf(model, tok, tmp_path / "bert.gguf", type="f16")
    assert not list(tmp_path.glob("*.gguf*"))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer metadata


def _bpe_tokenizer(pre: str, text: str, vocab_size: int = 400):
    """A byte-level BPE trained on text, with the pre-tokenizer llama.cpp calls `pre`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = bl if pre == "gpt-2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), bl])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


CORPUS = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
          "of a wife. In 1811 and 1812, 2000 or 3000 pounds a year; 1811, 1812! Don't they'll?\n\n") * 4
SAMPLE = "A truth,  universally\tacknowledged: 18112 men in 1811 had £3,000 a year!\n\n Don't é 中 <|im_start|>x"


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_vocab_describes_bpe(pre):
    tok = _bpe_tokenizer(pre, CORPUS)
    d = vocab.describe(tok, len(tok) + 8)
    assert d["pre"] == pre and d["merges"] and all(len(m.split(" ")) == 2 for m in d["merges"])
    assert d["tokens"][1] == "<|im_start|>" and d["token_types"][1] == gguf.TokenType.CONTROL
    assert d["token_types"][-1] == gguf.TokenType.UNUSED and d["bos"] == 1 and d["eos"] == 2
    assert d["add_bos"] is False and d["add_eos"] is False


def test_vocab_refuses_unknown_pre_tokenizer_and_non_byte_level():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _bpe_tokenizer("gpt-2", CORPUS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    with pytest.raises(CompressError, match="no known llama.cpp equivalent"):
        vocab.describe(tok, len(tok))
    words = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(CompressError, match="byte-level BPE"):
        vocab.describe(PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]"), 3)


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp


def _windows(tok, n=3, T=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    ids[:, 0] = tok.bos_token_id
    scored = torch.ones(n, T, dtype=torch.bool)
    scored[:, 0] = False
    return ids, scored


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@needs_llamacpp
@pytest.mark.parametrize("type,tol", [("f32", 1e-3), ("f16", 3e-3)])
def test_llamacpp_logits_match_torch(tiny_llama, tmp_path, type, tol):
    model, tok = tiny_llama
    path = tmp_path / "tiny.gguf"
    write_gguf(model, tok, path, type=type)
    ids, scored = _windows(tok)
    ref = llamacpp.torch_logits(model)
    with llamacpp.GGUFModel(path, n_ctx=64) as g:
        for r in range(len(ids)):
            assert _rel(g.logits(ids[r]), ref(ids[r])) < tol
        res = llamacpp.compare(ids, scored, ref, {"gguf": g.logits})
        assert g.decode_speed([tok.bos_token_id, 97, 98], 8) > 0
    assert res["gguf"]["perplexity"] == pytest.approx(res["reference"]["perplexity"], rel=1e-4)
    assert 0 <= res["gguf"]["kld"] < 1e-5 and res["gguf"]["top1"] > 0.95


@needs_llamacpp
@pytest.mark.parametrize("kw,type", [(dict(method="rtn", bits=4, group_size=32), "q4_0"),
                                     (dict(method="rtn", bits=8, group_size=32), "q8_0"),
                                     (dict(method="rtn", bits=4, group_size=32, sym=False), "q4_1")])
def test_llamacpp_runs_reencoded_gptq(tmp_path, monkeypatch, kw, type):
    """llama.cpp quantizes activations to 8 bits for these weight types and the tied output is q8_0, so its
    logits are close to the GPTQ model's, not equal; the f32 test above holds the structure to 1e-3."""
    from compress.tiny import build
    from conftest import TINY_LLAMA

    model, tok = _gptq_model(tmp_path, monkeypatch, **kw)
    path = tmp_path / f"gptq.{type}.gguf"
    write_gguf(model, tok, path, type=type)
    float_model = build(TINY_LLAMA, seed=0)[0]
    ids, _ = _windows(tok, n=2)
    ref, base = llamacpp.torch_logits(model), llamacpp.torch_logits(float_model)
    with llamacpp.GGUFModel(path, n_ctx=64) as g:
        for r in range(len(ids)):
            got = g.logits(ids[r])
            assert _rel(got, ref(ids[r])) < 0.03
            if kw["bits"] == 4:  # it runs the GPTQ weights (8-bit ones are too close to the float model to tell)
                assert _rel(got, ref(ids[r])) < 0.5 * _rel(got, base(ids[r]))


@needs_llamacpp
@pytest.mark.parametrize("type", ["q8_0", "q4_0", "q4_1"])
def test_float_quantization_is_llamacpp_bit_for_bit(tiny_llama, tmp_path, type):
    model, tok = tiny_llama
    write_gguf(model, tok, tmp_path / "f32.gguf", type="f32")
    llamacpp.quantize_file(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", type, threads=1)
    write_gguf(model, tok, tmp_path / "ours.gguf", type=type)
    _, ours = _read(tmp_path / "ours.gguf")
    _, theirs = _read(tmp_path / "theirs.gguf")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)), name


@needs_llamacpp
@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_llamacpp_tokenizes_like_hf(tmp_path, pre):
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import TINY_LLAMA

    tok = _bpe_tokenizer(pre, CORPUS)
    raw = json.loads(TINY_LLAMA.read_text())
    raw["vocab_size"] = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))
    write_gguf(model, tok, tmp_path / "bpe.gguf", type="f32")
    with llamacpp.GGUFModel(tmp_path / "bpe.gguf", n_ctx=64) as g:
        assert g.tokenize(SAMPLE, special=True) == tok(SAMPLE, add_special_tokens=False)["input_ids"]
        assert g.metadata()["tokenizer.ggml.pre"] == pre


@needs_llamacpp
def test_llamacpp_load_failure_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(CompressError, match="cannot load") as e:
        llamacpp.GGUFModel(bad)
    assert "\n" not in str(e.value)
