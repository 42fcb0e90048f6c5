"""GPTQ/RTN core, v1 packing, QuantLinear, prepare_for_load and the gptq stage on tiny models (CPU, seconds)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from compress.algorithms.gptq import (
    GPTQ, QuantLinear, pack_cols, pack_rows, prepare_for_load, quant_params, rtn, unpack_cols, unpack_rows,
)
from compress.context import Context
from compress.errors import CompressError
from compress.modeling import decoder_layers, linears, sequential_groups
from compress.stages import gptq as stage



def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] inputs with strongly correlated features and uneven scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d // 4, generator=g)
    A = torch.randn(d // 4, d, generator=g)
    return Z @ A + 0.1 * torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - Q X||^2 / n_tokens (X is [n, d])."""
    return float(((X @ (W - Q).t()) ** 2).sum() / X.shape[0])


def gptq_on(W, X, **kw):
    g = GPTQ(W)
    for chunk in X.split(256):
        g.add_batch(chunk)
    return g.quantize(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=4, group_size=128, sym=True),
        dict(bits=4, group_size=96, sym=False, act_order=True),  # partial last group (160 = 96 + 64)
        dict(bits=3, group_size=-1, sym=True, act_order=True, static_groups=True),
        dict(bits=2, group_size=32, sym=False),
        dict(bits=4, group_size=64, sym=True, group_aware=True),  # GAR, partial last group (160 = 2 x 64 + 32)
    ],
)
def test_gptq_error_below_rtn_and_objective_exact(kw):
    torch.manual_seed(0)
    W = torch.randn(48, 160)
    X = correlated_inputs(1024, 160)
    res = gptq_on(W, X, **kw)
    base = rtn(W, kw["bits"], kw["group_size"], kw["sym"])
    e_gptq, e_rtn = output_error(W, res.Q, X), output_error(W, base.Q, X)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # the reported per-row objective is the real mean squared output error
    assert float(res.error.sum()) == pytest.approx(e_gptq, rel=1e-3)


def test_group_aware_order_keeps_groups_whole_and_g_idx_monotone():
    from compress.algorithms.gptq import group_aware_order

    d = torch.rand(160, generator=torch.Generator().manual_seed(3))
    perm, group_of = group_aware_order(d, 64)  # groups 0, 1 of 64 and a partial group 2 of 32
    assert sorted(perm.tolist()) == list(range(160)) and group_of[-1] == 2 and sorted(group_of) == [0, 1, 2]
    for k, g in enumerate(group_of):  # processing chunk k is exactly original group g, most important column first
        chunk = perm[k * 64:(k + 1) * 64]
        assert set(chunk.tolist()) == set(range(g * 64, min((g + 1) * 64, 160)))
        assert bool((d[chunk].diff() <= 0).all())
    assert d[perm[:64]].max() >= d[perm[64:128]].max()  # full groups by decreasing max diag(H)
    torch.manual_seed(0)
    W, X = torch.randn(48, 160), correlated_inputs(1024, 160)
    res = gptq_on(W, X, bits=4, group_size=64, group_aware=True)
    assert torch.equal(res.g_idx, torch.arange(160, dtype=torch.int32) // 64)  # no desc_act needed to load it
    plain = gptq_on(W, X, bits=4, group_size=64)
    assert output_error(W, res.Q, X) < output_error(W, plain.Q, X)  # the important groups get the error budget


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (160, 96), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (160 * bits // 32, 96)
    assert torch.equal(unpack_rows(packed, bits, 160), codes.to(torch.int32))
    z = torch.randint(0, 2**bits, (5, 96), generator=g)
    pz = pack_cols(z, bits)
    assert pz.shape == (5, 96 * bits // 32)
    assert torch.equal(unpack_cols(pz, bits, 96), z.to(torch.int32))


def test_pack_layout_is_gptq_v1():
    """The word layout GPTQModel/AutoGPTQ use: code j of a word at bit j*bits; 3-bit codes form a bit stream."""
    codes = torch.arange(8).view(8, 1)  # 4 bits: 8 codes in one word
    assert pack_rows(codes, 4).item() == 0x76543210
    assert pack_rows(torch.full((8, 1), 15), 4).item() == -1  # all bits set, as int32
    c3 = torch.zeros(32, 1, dtype=torch.long)
    c3[10] = 0b101  # straddles words 0 and 1: low two bits at 30..31 of word 0, high bit at bit 0 of word 1
    c3[21] = 0b011  # straddles words 1 and 2: low bit at 31 of word 1, high two bits at 0..1 of word 2
    c3[22] = 0b111  # first full code of word 2 at bits 2..4
    w = pack_rows(c3, 3).view(-1).tolist()
    as_u32 = [x & 0xFFFFFFFF for x in w]
    assert as_u32 == [0b01 << 30, (1 << 0) | (1 << 31), 0b01 | (0b111 << 2)]


@pytest.mark.parametrize("bits,group_size,sym", [(2, 64, False), (3, 32, True), (4, 128, True), (8, -1, False)])
def test_quantlinear_dequantizes_to_result(bits, group_size, sym):
    torch.manual_seed(1)
    W = torch.randn(64, 160) * 0.05
    res = gptq_on(W, correlated_inputs(512, 160), bits=bits, group_size=group_size, sym=sym)
    bias = torch.randn(64)
    q = QuantLinear.from_result(res, bias)
    n_groups = -(-160 // (160 if group_size == -1 else group_size))
    assert q.qweight.shape == (160 * bits // 32, 64) and q.qzeros.shape == (n_groups, 64 * bits // 32)
    assert q.scales.shape == (n_groups, 64) and q.scales.dtype == torch.float16 and q.g_idx.shape == (160,)
    assert torch.equal(q.dequantize(), res.Q)
    assert torch.equal(q.codes().long(), res.codes.long())
    # v1 stores zero - 1
    stored = unpack_cols(q.qzeros, bits, 64)
    assert torch.equal(stored, res.zeros - 1)


def test_act_order_undone_through_g_idx():
    torch.manual_seed(2)
    W = torch.randn(32, 160)
    X = correlated_inputs(512, 160, seed=3)
    res = gptq_on(W, X, bits=4, group_size=32, act_order=True)
    g = res.g_idx.long()
    assert not torch.equal(g, g.sort().values)  # groups are interleaved in the original column order
    assert torch.bincount(g).tolist() == [32] * 5
    # each original column is dequantized with its own group's parameters
    expected = res.scales[g].t() * (res.codes.float() - res.zeros[g].t().float())
    assert torch.equal(expected, res.Q)
    assert torch.equal(QuantLinear.from_result(res, None).dequantize(), res.Q)
    static = gptq_on(W, X, bits=4, group_size=32, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(160) // 32)
    assert output_error(W, res.Q, X) < output_error(W, rtn(W, 4, 32).Q, X)


def test_quantlinear_forward_matches_linear():
    torch.manual_seed(3)
    res = rtn(torch.randn(48, 64), bits=4, group_size=32, sym=False)
    q = QuantLinear.from_result(res, torch.randn(48))
    x = torch.randn(2, 5, 64)
    W = q.dequantize()
    assert torch.equal(q(x), F.linear(x, W, q.bias.float()))
    xh = x.half()
    assert torch.equal(q(xh), F.linear(xh, W.half(), q.bias))
    # the cache follows the buffers
    q.scales.mul_(2)
    assert torch.allclose(q(x), F.linear(x, 2 * W, q.bias.float()), atol=1e-5)
    assert set(q.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


def test_asym_zero_points_never_wrap_in_v1():
    W = torch.rand(8, 64) + 0.01  # all-positive groups would get zero point 0
    scale, zero = quant_params(W, 4, sym=False)
    assert (zero >= 1).all() and ((W / scale[:, None]).round() + zero[:, None] <= 15).all()


def test_sequential_groups_llama(tiny_llama):
    model, _ = tiny_llama
    block = decoder_layers(model)[0]
    from compress.modeling import capture_layer_inputs

    (h, r, kw), = capture_layer_inputs(model, [torch.randint(0, 256, (2, 16))], torch.device("cpu"))
    assert sequential_groups(block, h, r, kw) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]


def test_block_tails_llama(tiny_llama):
    """self_attn returns o_proj's output (in a tuple), mlp returns down_proj's: both replay as one matmul."""
    from compress.modeling import capture_layer_inputs, trace_block

    model, _ = tiny_llama
    (h, r, kw), = capture_layer_inputs(model, [torch.randint(0, 256, (2, 16))], torch.device("cpu"))
    tails = trace_block(decoder_layers(model)[0], h, r, kw)[2]
    assert tails["self_attn"][:2] == ("self_attn.o_proj", 0) and tails["mlp"] == ("mlp.down_proj", -1, 0)


def test_tail_refused_when_output_changed_after_linear():
    """A submodule that modifies its last linear's output in place (or returns something else) is no tail."""
    from compress.modeling import trace_block

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.out(self.proj(x))
            return y.mul_(2)  # same tensor, changed after the linear

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Scaled(), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())

        def forward(self, x):
            return self.b(self.a(x))

    groups, spans, tails = trace_block(Block(), torch.randn(2, 8), (), {})
    assert groups == [["a.proj"], ["a.out"], ["b.0"]] and tails == {}  # b ends in ReLU, a in an in-place mul


def test_hessian_strips_equal_full_matmul():
    """On CPU only H's upper triangle is accumulated, in strips; the mirrored result is X^T X."""
    torch.manual_seed(0)
    for cols in (100, 300, 1100):  # one full matmul; strips of 128 with a partial last one; strips of 256
        g = GPTQ(torch.randn(4, cols))
        xs = [torch.randn(3, 50, cols) for _ in range(2)]
        for x in xs:
            g.add_batch(x)
        X = torch.cat([x.reshape(-1, cols) for x in xs]).double()
        H = g.hessian()
        assert torch.equal(H, H.t()) and g.nsamples == 300
        torch.testing.assert_close(H.double(), X.t() @ X, rtol=1e-5, atol=1e-3)


def _calib(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _run(model, tok, tmp_path, monkeypatch, **kw):
    tokens = _calib(kw.pop("n", 8))
    monkeypatch.setattr(stage, "calibration_tokens",
                        lambda tokenizer, cfg, ctx: (tokens, stage.calibration_fingerprint(tokens, "test", ctx.seed)))
    ctx = Context.for_tests(tmp_path, data={"calibration": "test"})
    return stage.run(model, tok, stage.Config(nsamples=8, seq_len=32, batch_size=4, **kw), ctx)


def _reload(model, build_fresh):
    """Fresh skeleton -> prepare_for_load(config) -> load_state_dict: what checkpoint.load does."""
    fresh = build_fresh()
    prepare_for_load(fresh, dict(model.config.quantization_config))
    for p in fresh.parameters():
        p.data = p.data.to(torch.float16)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    return fresh.eval()


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(bits=3, act_order=True, true_sequential=False, sym=False), dict(method="rtn", bits=8, group_size=-1)],
)
def test_tiny_llama_round_trip(tiny_llama, tmp_path, monkeypatch, kw):
    from compress.tiny import build
    from conftest import TINY_LLAMA

    model, tok = tiny_llama
    ids = _calib(2, 24, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
    model, stats = _run(model, tok, tmp_path, monkeypatch, **kw)
    qc = model.config.quantization_config
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["desc_act"] == kw.get("act_order", False) and qc["bits"] == kw.get("bits", 4)
    assert all(isinstance(m, QuantLinear) for m in linears(decoder_layers(model)[0]).values())
    assert model.lm_head.weight.dtype == torch.float16 and model.model.embed_tokens.weight.dtype == torch.float16
    assert stats["quantized_linears"] == 28 and len(stats["layers"]) == 4
    assert stats["bits_per_weight"] > kw.get("bits", 4)
    if kw.get("method", "gptq") == "gptq":
        assert stats["calibration"]["nsamples"] == 8 and len(stats["calibration"]["tokens_sha256"]) == 64
        assert all(s["error"] >= 0 for layer in stats["layers"] for s in layer["linears"].values())
    with torch.no_grad():
        out = model(ids).logits.float()
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()  # quantized, still close to the original
    fresh = _reload(model, lambda: build(TINY_LLAMA, seed=5)[0])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits.float(), out)


def test_replay_equals_recompute(tmp_path, monkeypatch):
    """Replaying recorded outputs of already quantized groups gives exactly what recomputing them gives."""
    from compress.tiny import build
    from conftest import TINY_LLAMA

    states = []
    for fits in (True, False):
        monkeypatch.setattr(stage, "_replay_fits", lambda *a, fits=fits: fits)
        model, tok = build(TINY_LLAMA, seed=0)
        model, _ = _run(model, tok, tmp_path, monkeypatch, act_order=True)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_true_sequential_runs_each_linear_once_per_batch(tiny_llama, monkeypatch):
    """The passes replay what is final and stop before the pass's own linears: one call per linear per batch
    and block (plus block 0's traced batch and the one call that learns what a block returns), attention and SiLU
    included."""
    import collections

    model, _ = tiny_llama
    calls = collections.Counter()
    names = {id(m): n.split(".", 3)[-1] for n, m in model.named_modules() if ".layers." in n}
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.update([names.get(id(self))]) or forward(self, x))
    ctx = Context(device=torch.device("cpu"), seed=0, quiet=True, log=lambda m: None)
    batches, blocks, expected = 2, len(decoder_layers(model)), set(linears(decoder_layers(model)[0]))
    stage.quantize_model(model, stage.Config(nsamples=4 * batches, seq_len=16, group_size=32, batch_size=4), ctx,
                         _calib(4 * batches, 16))
    assert set(calls) - {None} == expected
    assert all(calls[n] == blocks * batches + 2 for n in calls if n is not None), calls


def test_replay_refuses_outputs_modified_in_place():
    out = torch.ones(3)
    replay = stage._Replay([(out, stage._versions(out))], [0])
    assert replay(None) is out
    out.mul_(2)  # what a model mutating a projection's output would do
    with pytest.raises(RuntimeError, match="in place"):
        replay(None)


def test_skip_keeps_linears(tiny_llama, tmp_path, monkeypatch):
    from compress.tiny import build
    from conftest import TINY_LLAMA

    model, tok = tiny_llama
    model, stats = _run(model, tok, tmp_path, monkeypatch, skip=["lm_head", "mlp.down_proj", r"model\.layers\.0\..*q_proj"])
    layers = decoder_layers(model)
    assert isinstance(layers[1].mlp.down_proj, torch.nn.Linear) and isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(layers[1].self_attn.q_proj, QuantLinear)
    qc = model.config.quantization_config
    assert ["mlp.down_proj"] not in qc["modules_in_block_to_quantize"]
    assert "self_attn.q_proj" in sum(qc["modules_in_block_to_quantize"], [])  # quantized in blocks 1..3
    assert list(qc["dynamic"]) == [r"-:^model\.layers\.0\.self_attn\.q_proj$"]
    assert len(stats["skipped_linears"]) == 5
    ids = _calib(1, 16, seed=4)
    fresh = _reload(model, lambda: build(TINY_LLAMA, seed=5)[0])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_tiny_bert(tiny_bert, tmp_path, monkeypatch):
    from compress.tiny import build
    from conftest import TINY_BERT

    model, tok = tiny_bert
    model, stats = _run(model, tok, tmp_path, monkeypatch)
    assert stats["sequential_groups"] == [
        ["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
        ["intermediate.dense"], ["output.dense"],
    ]
    ids = _calib(2, 16, seed=4)
    fresh = _reload(model, lambda: build(TINY_BERT, seed=5)[0])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "gpt2", "architectures": ["GPT2ForCausalLM"], "vocab_size": 264, "n_embd": 64, "n_layer": 2,
         "n_head": 4, "n_positions": 128},  # Conv1D linears, fused c_attn (tiny.build picks the head by suffix)
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 264, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False},  # q/k/v with bias
    ],
)
def test_other_architectures(config, tmp_path, monkeypatch):
    import json

    from compress.tiny import build

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model, tok = build(path, seed=0)
    ids = _calib(2, 16, seed=4)
    with torch.no_grad():
        ref = model(ids).logits
    model, stats = _run(model, tok, tmp_path, monkeypatch, bits=8, group_size=32)
    assert stats["quantized_linears"] == 4 * 2 + (3 if config["model_type"] == "qwen2" else 0) * 2
    with torch.no_grad():
        out = model(ids).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8 bits: close to the original
    fresh = _reload(model, lambda: build(path, seed=3)[0])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits.float(), out)


def test_run_with_pipeline_calibration(tiny_llama, text_file, tmp_path):
    """run() reads calibration windows through compress.data from the pipeline's data.calibration."""
    model, tok = tiny_llama
    ctx = Context.for_tests(tmp_path, data={"calibration": str(text_file)})
    model, stats = stage.run(model, tok, stage.Config(nsamples=4, seq_len=64), ctx)
    cal = stats["calibration"]
    assert cal["source"] == str(text_file) and (cal["nsamples"], cal["seq_len"]) == (4, 64)
    again = stage.calibration_tokens(tok, stage.Config(nsamples=4, seq_len=64), ctx)[1]
    assert again["tokens_sha256"] == cal["tokens_sha256"]  # seeded: same windows, same fingerprint


def test_config_checks():
    with pytest.raises(CompressError, match="bits"):
        stage.Config(bits=5)
    with pytest.raises(CompressError, match="static_groups"):
        stage.Config(static_groups=True)
    with pytest.raises(CompressError, match="method"):
        stage.Config(method="awq")
    with pytest.raises(CompressError, match="damp"):
        stage.Config(damp_percent=0)


def test_missing_calibration_is_clear(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(CompressError, match="calibration"):
        stage.run(model, tok, stage.Config(), Context.for_tests(tmp_path))


def test_prepare_for_load_rejects_v2(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(CompressError, match="checkpoint_format"):
        prepare_for_load(model, {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"})


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw,backend",
    [
        # auto picks TorchAtenLinear on CPU: it computes in bf16 (so a looser tolerance) and needs in % group == 0
        (dict(group_size=32, act_order=True), None),
        (dict(group_size=32, act_order=True), "gptq_torch"),
        (dict(group_size=128), "gptq_torch"),  # partial group (160 = 128 + 32)
        (dict(bits=3, group_size=32, sym=False), "gptq_torch"),
        (dict(bits=2, group_size=64, act_order=True, static_groups=True), "gptq_torch"),
        (dict(bits=8, group_size=-1, sym=False), "gptq_torch"),
    ],
)
def test_transformers_optimum_gptqmodel_load_our_export(tiny_llama, tmp_path, monkeypatch, kw, backend):
    """Our v1 export loads through AutoModelForCausalLM + optimum + gptqmodel and gives our logits."""
    missing = [p for p in ("optimum", "gptqmodel") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (pip install optimum gptqmodel)")
    from transformers import AutoModelForCausalLM, GPTQConfig

    model, tok = tiny_llama
    model, _ = _run(model, tok, tmp_path, monkeypatch, **kw)
    ids = _calib(2, 24, seed=9)
    with torch.no_grad():
        ours = model(ids).logits.float()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    extra = {} if backend is None else {"quantization_config": GPTQConfig(bits=kw.get("bits", 4), backend=backend)}
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16, **extra)
    with torch.no_grad():
        theirs = loaded(ids).logits.float()
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel < (1e-2 if backend is None else 1e-3), rel
