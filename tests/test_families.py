"""Every stage, and the prune -> distill -> gptq chain, on every family of compress/families.py (tiny configs, CPU,
seconds): it runs, or refuses in one line that names the family, exactly as bench/results/families.json records
(which the README's support table is made from); never another exception. MoE experts are quantized per expert
and reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress import checkpoint, families, manifest, moe, support
from compress.context import Context
from compress.errors import CompressError
from compress.tiny import build
from conftest import REPO

RECORD = json.loads((REPO / "bench" / "results" / "families.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(support.CORPUS_TEXT)
    return str(p)


@pytest.mark.parametrize("stage", support.COLUMNS)
@pytest.mark.parametrize("family", support.FAMILIES)
def test_stage_runs_or_refuses_as_recorded(family, stage, corpus, tmp_path):
    """compress.support's cell: the planner's prediction, the stage, the save and the round-trip reload; a refusal
    is one line that names the family (prune refuses families whose attention ties head_dim to hidden / heads;
    quantization stages refuse to leave most of the blocks' linears alone). It must be what the record says."""
    fam = families.of(json.loads((REPO / "configs" / "models" / f"tiny-{family}.json").read_text()))
    result = support.run_cell(family, stage, corpus, tmp_path)
    assert result == "ok" or (result.startswith("refused: ") and fam.name in result), result
    assert result == RECORD[family][stage], "rerun `python bench/families.py` if this change is meant"


def test_readme_support_table_is_the_record():
    assert support.markdown(RECORD, grouped=True) in (REPO / "README.md").read_text()
    assert set(RECORD) == set(support.FAMILIES) and all(list(c) == support.COLUMNS for c in RECORD.values())


@pytest.mark.parametrize("config", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_unfused_experts_compute_the_same_logits(config):
    model, _ = build(REPO / "configs" / "models" / f"{config}.json", seed=0)
    ids = checkpoint.probe_input(model, 3, 24)
    ref = checkpoint.outputs(model, ids)
    assert moe.unfuse(model) == 4 * 4  # 4 experts in each of 4 layers
    assert torch.equal(checkpoint.outputs(model, ids), ref)


def _gptq(model, tok, tmp_path, **kw):
    from compress.stages import gptq

    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = gptq.Config(**{"nsamples": 8, "seq_len": 32, "batch_size": 4, **kw})
    return model, gptq.quantize_model(model, cfg, Context.for_tests(tmp_path), tokens if cfg.method == "gptq" else None)


def _dense_twin(tmp_path, moe_config: dict) -> dict:
    """A Llama of the Mixtral's size: the same hidden size, layers and vocabulary, one MLP as wide as all experts."""
    dense = json.loads((REPO / "configs" / "models" / "tiny-llama.json").read_text())
    dense.update({k: moe_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")})
    dense["intermediate_size"] = moe_config["intermediate_size"] * moe_config["num_local_experts"]
    p = tmp_path / "dense.json"
    p.write_text(json.dumps(dense))
    return p


def test_mixtral_experts_are_stored_in_4_bits_like_a_dense_model(tmp_path):
    """A tiny Mixtral after gptq: every expert a 4-bit QuantLinear (per-expert Hessians), bits per weight within 20%
    of a dense model of the same size, per-expert names as Mixtral checkpoints spell them, identical reload."""
    from safetensors import safe_open

    path = REPO / "configs" / "models" / "tiny-mixtral.json"
    model, tok = build(path, seed=0)
    model, stats = _gptq(model, tok, tmp_path)
    assert stats["experts"] == {"experts": 16, "rtn_fallback": 0, "rtn_fallback_linears": 0}
    assert stats["quantized_fraction"]["of_block_linears"] == 1.0 and stats["quantized_linears"] == 4 * (4 + 12)
    assert all(s["tokens"] > 0 for n, s in stats["layers"][0]["linears"].items() if ".experts." in f".{n}")
    expert = model.model.layers[0].mlp.experts[2]
    assert all(type(getattr(expert, n)).__name__ == "QuantLinear" for n in ("w1", "w3", "w2"))
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float16  # the router: not quantized
    checkpoint.save(model, tok, tmp_path / "moe")
    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
    rt, reloaded = checkpoint.round_trip(model, tmp_path / "moe", "cpu")
    assert rt["max_rel_error"] == 0.0
    for name, q in reloaded.named_modules():  # the codes themselves reload bit for bit
        if hasattr(q, "qweight"):
            assert torch.equal(q.qweight, model.get_submodule(name).qweight)
    moe_bits = manifest.size_of(model, tmp_path / "moe")["bits_per_weight"]

    dense, dtok = build(_dense_twin(tmp_path, json.loads(path.read_text())), seed=0)
    assert abs(manifest.count_params(dense) - manifest.count_params(model)) < 0.02 * manifest.count_params(model)
    dense, _ = _gptq(dense, dtok, tmp_path)
    checkpoint.save(dense, dtok, tmp_path / "dense")
    dense_bits = manifest.size_of(dense, tmp_path / "dense")["bits_per_weight"]
    assert abs(moe_bits - dense_bits) <= 0.2 * dense_bits, (moe_bits, dense_bits)


def test_expert_without_calibration_tokens_falls_back_to_rtn(tmp_path, monkeypatch):
    """A router that never picks expert 3: its linears get RTN codes, and the stats say how many."""
    from compress.stages import gptq

    model, tok = build(REPO / "configs" / "models" / "tiny-qwen3-moe.json", seed=0)

    def never_3(self, hidden):  # the router with expert 3 masked out
        logits = torch.nn.functional.linear(hidden.reshape(-1, self.hidden_dim), self.weight)
        logits[:, 3] = float("-inf")
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), idx

    monkeypatch.setattr(type(model.model.layers[0].mlp.gate), "forward", never_3)
    down = model.model.layers[0].mlp.experts.down_proj[3].clone()  # [H, I]
    model, stats = _gptq(model, tok, tmp_path)
    assert stats["experts"]["rtn_fallback"] == 4 and stats["experts"]["rtn_fallback_linears"] == 12
    lin = stats["layers"][0]["linears"]
    assert lin["mlp.experts.3.down_proj"]["tokens"] == 0 and "error" not in lin["mlp.experts.3.down_proj"]
    assert lin["mlp.experts.0.gate_proj"]["tokens"] > 0 and "error" in lin["mlp.experts.0.gate_proj"]
    q = model.model.layers[0].mlp.experts[3].down_proj
    assert torch.equal(q.dequantize(), gptq.rtn(down, 4, 128, True).Q)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_skipping_most_block_linears_is_refused_before_any_work(tiny_llama, tmp_path, method):
    model, tok = tiny_llama
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CompressError, match=r"only \d+% of the linear weights in the blocks of Llama"):
        _gptq(model, tok, tmp_path, method=method, skip=["lm_head", "gate_proj", "up_proj", "down_proj"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_int8_refuses_mostly_unquantized_and_quantizes_experts(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from compress.stages import int8

    model, tok = tiny_llama
    with pytest.raises(CompressError, match=r"only \d+% of the linear weights in the blocks of Llama"):
        int8.run(model, tok, int8.Config(skip=["lm_head", "gate_proj", "up_proj", "down_proj"], calibration_samples=0),
                 Context.for_tests(tmp_path))
    model, tok = build(REPO / "configs" / "models" / "tiny-mixtral.json", seed=0)
    model, stats = int8.run(model, tok, int8.Config(calibration_samples=0), Context.for_tests(tmp_path))
    assert type(model.model.layers[0].mlp.experts[1].w3).__name__ == "Linear8bitLt"
    assert stats["quantized_fraction"]["of_block_linears"] == 1.0 and stats["experts"] == {"experts": 16}
    checkpoint.save(model, tok, tmp_path / "q")
    assert checkpoint.round_trip(model, tmp_path / "q", "cpu")[0]["max_rel_error"] <= 1e-2


@pytest.mark.parametrize("config,dtype", [("tiny-gemma2", "bfloat16"), ("tiny-gemma3", "bfloat16"),
                                          ("tiny-llama", "float16")])
def test_unquantized_parts_avoid_float16_where_it_overflows(config, dtype, tmp_path):
    """gptq's dtype auto: bfloat16 for Gemma (activations overflow float16), float16 for the others; a set dtype
    wins."""
    model, tok = build(REPO / "configs" / "models" / f"{config}.json", seed=0)
    model, stats = _gptq(model, tok, tmp_path, method="rtn")
    assert stats["dtype"] == dtype and model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    model, tok = build(REPO / "configs" / "models" / f"{config}.json", seed=0)
    assert _gptq(model, tok, tmp_path, method="rtn", dtype="float32")[1]["dtype"] == "float32"


def test_quantized_fraction_counts_what_stays_16_bit(tiny_llama, tmp_path):
    model, tok = tiny_llama
    total = sum(p.numel() for p in model.parameters())
    model, stats = _gptq(model, tok, tmp_path, method="rtn", skip=["lm_head", "self_attn.o_proj"])
    frac = stats["quantized_fraction"]
    o = 4 * model.model.layers[0].self_attn.o_proj.weight.numel()
    assert frac["block_linear_params"] == stats["quantized_params"] + o
    assert frac["of_params"] == round(stats["quantized_params"] / total, 4)
    assert frac["of_block_linears"] == round(stats["quantized_params"] / (stats["quantized_params"] + o), 4)


def test_planner_counts_family_widths_and_experts():
    from compress import memory

    gpt2 = memory.describe(REPO / "configs" / "models" / "tiny-gpt2.json")
    assert gpt2.intermediate == 128 and len(gpt2.linears) == 4 and gpt2.logits  # n_inner, Conv1D, LM head
    opt = memory.describe(REPO / "configs" / "models" / "tiny-opt.json")
    assert opt.intermediate == json.loads((REPO / "configs" / "models" / "tiny-opt.json").read_text())["ffn_dim"]
    mixtral = memory.describe(REPO / "configs" / "models" / "tiny-mixtral.json")
    attention = 2 * 64 * 64 + 2 * 64 * 32  # q, o [64, 64]; k, v [32, 64]
    assert len(mixtral.linears) == 4 + 3 * 4 and mixtral.linear_params == 4 * (attention + 4 * 3 * 64 * 64)
    gemma = memory.describe(REPO / "configs" / "models" / "tiny-gemma3.json")
    assert gemma.with_changes(num_hidden_layers=2).layers == 2  # layer_types follow
