"""The `lora` stage (compress/stages/lora.py, compress/algorithms/lora.py): tiny Llama, CPU, seconds."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from compress import checkpoint, config, manifest, memory, pipeline
from compress.context import Context
from compress.errors import CompressError
from compress.stages import gptq as gptq_stage
from compress.stages import int8 as int8_stage
from compress.stages import lora
from conftest import TINY_LLAMA

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
requires_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")



def _ids(n=2, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was)
    return out


def _cfg(**kw) -> lora.Config:
    base = dict(rank=4, alpha=8.0, tokens=20 * 4 * 32, batch_size=4, seq_len=32, lr=1e-2, save_every=0,
                eval_tokens=4 * 32, loss="lm")
    return lora.Config(**{**base, **kw})


def _ctx(tmp_path, text_file, **kw) -> Context:
    return Context.for_tests(tmp_path, data={"train": [str(text_file)]}, **kw)


def _quantized(kind: str, tmp_path, bits: int = 4):
    """The tiny Llama as the gptq (RTN, fp16 rest) or int8 stage leaves it, and its tokenizer."""
    from compress.tiny import build

    model, tok = build(TINY_LLAMA, seed=0)
    ctx = Context.for_tests(tmp_path / f"q-{kind}")
    if kind == "gptq":
        return gptq_stage.run(model, tok, gptq_stage.Config(method="rtn", bits=bits, group_size=32), ctx)[0], tok
    return int8_stage.run(model, tok, int8_stage.Config(calibration_samples=0), ctx)[0], tok


def _base_state(model) -> dict[str, torch.Tensor]:
    """The frozen model's own tensors (adapter layers swapped out), cloned."""
    from compress.algorithms import lora as core

    with core.without_adapters(model) as base:
        return {k: v.detach().clone() for k, v in base.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- the adapters


@pytest.mark.parametrize("kind", ["plain", "gptq", pytest.param("int8", marks=requires_bnb)])
def test_zero_initialised_adapter_changes_no_logit(kind, tiny_llama, tmp_path):
    from compress.algorithms import lora as core

    model, _ = tiny_llama if kind == "plain" else _quantized(kind, tmp_path)
    ids = _ids()
    before = _logits(model, ids)
    torch.manual_seed(0)
    adapted = core.add_adapters(model, lora.target_names(model, None), r=4, alpha=8, dropout=0.0)
    layers = core.adapter_layers(adapted)
    assert len(layers) == 4 * 7  # every linear of the 4 blocks
    assert all(float(m.lora_A["default"].weight.detach().abs().sum()) > 0 for m in layers.values())  # A random, B zero
    assert torch.equal(_logits(adapted, ids), before)
    assert all(("lora_" in n) == p.requires_grad for n, p in adapted.named_parameters())


def test_quantlinear_is_dequantized_on_the_fly_with_the_cached_gradients(tmp_path):
    """QLoRA-style: no [out, in] weight is saved for the backward, and the gradients equal the cached path's."""
    from compress.algorithms import gptq as gptq_core
    from compress.algorithms import lora as core

    model, _ = _quantized("gptq", tmp_path)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, gptq_core.QuantLinear)
    x = torch.randn(3, 5, q.in_features, generator=torch.Generator().manual_seed(0))
    grads = {}
    for cache in (True, False):
        q.cache, q._cached = cache, None
        xi = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = core.dequant_linear(q, xi)
        (y ** 2).sum().backward()
        grads[cache] = xi.grad
        weight_saved = any(sorted(shape) == sorted((q.out_features, q.in_features)) for shape in saved)
        assert weight_saved == cache, saved
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-6)


# -- the stage


def test_training_moves_only_adapter_weights(tiny_llama, text_file, tmp_path):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, stats = lora.run(model, tok, _cfg(), _ctx(tmp_path, text_file))
    assert _same(_base_state(out), before)
    bs = [p for n, p in out.named_parameters() if "lora_B" in n]
    assert len(bs) == 28 and all(float(p.abs().max()) > 0 for p in bs)  # every adapter moved from B = 0
    assert stats["trainable_params"] == 4 * sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                                                          (64, 160), (64, 160), (160, 64)])
    assert stats["adapter_bytes"] == 4 * stats["trainable_params"]
    assert stats["trained_against"]["loss"] == "lm" and stats["trained_against"]["tokens"] == 20 * 4 * 32


def test_saved_adapter_reloads_with_peft_over_the_saved_base(tiny_llama, text_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama
    ids = _ids()
    plain = _logits(model, ids)
    out, _ = lora.run(model, tok, _cfg(), _ctx(tmp_path, text_file))
    expected = _logits(out, ids)
    assert (expected - plain).abs().max() > 1e-3  # the adapter does something
    folder = tmp_path / "saved"
    checkpoint.save(out, tok, folder)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (folder / "adapter").iterdir()}
    assert not any("lora" in k for k in __import__("safetensors.torch").torch.load_file(folder / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(folder)                  # the base as transformers reads it
    assert torch.equal(_logits(base, ids), plain)
    peft_model = PeftModel.from_pretrained(base, folder / "adapter")     # plain peft, no compress code
    assert torch.allclose(_logits(peft_model, ids), expected, atol=1e-6, rtol=0)
    reloaded, _ = checkpoint.load(folder)                                # what the pipeline evaluates
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-6, rtol=0)
    assert checkpoint.round_trip(out, folder, "cpu")[0]["max_rel_error"] < 1e-5
    # the adapter is part of the checkpoint's content
    h = checkpoint.content_hash(folder)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    assert checkpoint.content_hash(folder) != h


def test_merge_equals_the_unmerged_model(text_file, tmp_path):
    from compress.algorithms import lora as core
    from compress.tiny import build

    ids = _ids()
    outs = {}
    for merge in (False, True):
        model, tok = build(TINY_LLAMA, seed=0)
        outs[merge], stats = lora.run(model, tok, _cfg(merge=merge), _ctx(tmp_path / str(merge), text_file))
        assert stats["merged"] is merge
    merged = outs[True]
    assert not core.is_adapted(merged) and not core.adapter_layers(merged)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(_logits(merged, ids), _logits(outs[False], ids), atol=1e-5, rtol=1e-5)


def test_quantized_input_with_merge_is_refused_in_one_line(text_file, tmp_path):
    model, tok = _quantized("gptq", tmp_path)
    ctx = _ctx(tmp_path, text_file)  # no base_path: had the teacher been loaded first, it would fail otherwise
    with pytest.raises(CompressError, match=r"^lora\.merge: true folds adapters into plain weights, but this "
                                            r"input is gptq; set merge: false") as e:
        lora.run(model, tok, _cfg(merge=True, loss="kd"), ctx)
    assert "\n" not in str(e.value)
    from compress.algorithms import lora as core

    assert not core.adapter_layers(model) and not list((tmp_path / "work").iterdir())  # refused before any work
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # not even upcast
    state = memory.state_from_model(model)
    with pytest.raises(CompressError, match="but this input is gptq"):  # the planner refuses it too, before a run
        lora.predict_memory(_cfg(merge=True), state, memory.Where())


@pytest.mark.parametrize("kind", ["gptq", pytest.param("int8", marks=requires_bnb)])
def test_lora_over_a_quantized_model_trains_and_lowers_the_loss(kind, text_file, tmp_path):
    from compress.algorithms import lora as core

    model, tok = _quantized(kind, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, stats = lora.run(model, tok, _cfg(), _ctx(tmp_path, text_file))
    domain = str(text_file)
    assert stats["input_format"] == {"gptq": "gptq", "int8": "bnb-int8"}[kind]
    assert stats["val_end"]["lm"][domain] < stats["val_start"]["lm"][domain] - 0.2, stats
    curve = [v for _, v in stats["loss_curve"]]
    assert curve[-1] < curve[0] - 0.2
    layer_type = {"gptq": "QuantLinearLora", "int8": "Linear8bitLt"}[kind]
    assert {type(m).__name__ for m in core.adapter_layers(out).values()} == {layer_type}
    assert _same(_base_state(out), before)  # 16-bit tensors cast back exactly, packed weights untouched
    folder = tmp_path / "saved"
    checkpoint.save(out, tok, folder)
    assert checkpoint.round_trip(out, folder, "cpu")[0]["format"] == stats["input_format"]


def test_kd_lowers_the_kl_to_the_base_of_a_2_bit_model(text_file, tmp_path):
    from compress.tiny import build

    model, tok = build(TINY_LLAMA, seed=0)
    checkpoint.save(model, tok, tmp_path / "base")
    q, _ = _quantized("gptq", tmp_path, bits=2)
    out, stats = lora.run(q, tok, _cfg(loss="kd", lr=5e-3), _ctx(tmp_path, text_file, base_path=tmp_path / "base"))
    domain = str(text_file)
    assert stats["trained_against"]["teacher"]["ref"] == "base"
    assert stats["val_end"]["kl"][domain] < 0.7 * stats["val_start"]["kl"][domain], stats


def test_kd_with_the_model_as_its_own_teacher_has_loss_0_at_step_0(tiny_llama, text_file, tmp_path):
    model, tok = tiny_llama
    checkpoint.save(model, tok, tmp_path / "base")
    out, stats = lora.run(model, tok, _cfg(loss="kd"), _ctx(tmp_path, text_file, base_path=tmp_path / "base"))
    assert stats["loss_curve"][0] == [1, 0.0]  # B = 0: the student is the teacher, KL exactly 0
    assert stats["val_start"]["kl"][str(text_file)] == 0.0
    assert stats["loss_curve"][1][1] > 0  # then the adapters move and the loss is a real one


def test_bad_settings_are_one_line_compress_errors(tiny_llama, tiny_bert, text_file, tmp_path):
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"loss": "mse"}, {"targets": []}, {"merge": "yes"},
                {"seq_len": 2}, {"eval_tokens": 8}, {"mixed_precision": "fp16"}, {"teacher": ""}):
        with pytest.raises(CompressError, match=r"^lora\.") as e:
            _cfg(**bad)
        assert "\n" not in str(e.value)
    model, tok = tiny_llama
    with pytest.raises(CompressError, match=r"\['o_prj'\] match no linear .*self_attn\.o_proj"):
        lora.run(model, tok, _cfg(targets=["q_proj", "o_prj"]), _ctx(tmp_path, text_file))
    assert lora.target_names(model, ["q_proj", "mlp.down_proj"])[:2] == ["model.layers.0.self_attn.q_proj",
                                                                        "model.layers.0.mlp.down_proj"]
    with pytest.raises(CompressError, match=r"^lora\.teacher 'nowhere' is neither an earlier stage \(base\)"):
        lora.run(model, tok, _cfg(loss="kd", teacher="nowhere"), _ctx(tmp_path, text_file))
    with pytest.raises(CompressError, match="causal LMs"):
        lora.run(tiny_bert[0], tiny_bert[1], _cfg(), _ctx(tmp_path, text_file))


def test_predicted_memory_terms(tiny_llama):
    model, _ = tiny_llama
    state = memory.state_from_model(model)
    where = memory.Where(kind="cpu", states={"base": state}, input=state, loaded={"bitsandbytes"})
    lm = lora.predict_memory(_cfg(), state, where)
    P = 4 * sum(4 * (i + o) for _, i, o in state.shape.linears)
    assert lm.terms["adapter weights (float32)"] == 4 * P and lm.terms["AdamW states (m, v)"] == 8 * P
    assert lm.on_device_input == state.weights_bytes() and "teacher weights" not in lm.terms
    kd = lora.predict_memory(_cfg(loss="kd"), state, where)
    assert kd.terms["teacher weights"] == state.weights_bytes()
    half = lora.predict_memory(_cfg(batch_size=2), state, where)
    assert half.terms["activations"] * 2 == lm.terms["activations"]
    gq = memory.ModelState(state.shape, "float16", "gptq", bits=4, group_size=32)
    on_the_fly = lora.predict_memory(_cfg(), gq, where).terms
    cached = lora.predict_memory(_cfg(cache_dequantized=True), gq, where).terms
    assert cached["dequantized weight cache"] > 10 * on_the_fly["dequantized weight (one linear at a time)"]
    assert on_the_fly["float32 copy of 16-bit weights (upcast)"] == gq.float_numel() * 4


# -- through the pipeline


def test_pipeline_saves_the_adapter_and_evaluates_with_it(text_file, tmp_path):
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(textwrap.dedent(f"""
        name: lora-smoke
        model: tiny:{TINY_LLAMA}
        data: {{train: [{text_file}]}}
        eval: {{perplexity: [{text_file}], seq_len: 32, max_tokens: 256, speed: false}}
        stages:
          - gptq: {{method: rtn, bits: 2, group_size: 32}}
          - lora: {{loss: lm, rank: 4, alpha: 8, tokens: 2560, batch_size: 4, seq_len: 32, lr: 1.0e-2, eval_tokens: 128}}
    """))
    pipe = config.load(yaml_path)
    pipeline.run(pipe, tmp_path / "runs", log=lambda m: None, quiet=True)
    run = tmp_path / "runs" / "lora-smoke"
    m = manifest.read(run / "02-lora")
    assert m["format"] == "gptq" and m["round_trip"]["max_rel_error"] <= m["round_trip"]["tolerance"]
    assert (run / "02-lora" / "adapter" / "adapter_model.safetensors").is_file()
    before = manifest.read(run / "01-gptq")["accuracy"]["perplexity"][str(text_file)]["value"]
    after = m["accuracy"]["perplexity"][str(text_file)]["value"]
    assert after < 0.8 * before  # the evaluation ran with the adapter applied (test split of the trained text)
    assert m["stats"]["trained_against"] == {**m["stats"]["trained_against"], "loss": "lm", "teacher": None}
    assert m["memory"]["predicted_peak_bytes"] > 0
