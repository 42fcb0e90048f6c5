"""Sheared-LLaMA pruning: hard-concrete masks, Lagrangian, masked forward and materialisation on every family that
supports it, shapes that deploy, the prune stage."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compress import families
from compress.algorithms import shear, shear_model
from compress.context import Context
from compress.errors import CompressError
from compress.stages import prune

from conftest import REPO

PRUNABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi", "olmo2", "granite", "mixtral",
            "qwen3-moe"]
REFUSED = ["stablelm", "gpt-neox", "falcon", "gpt2", "opt"]


def _ids(n=2, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_gates(shearer, seed=1):
    """Spread log_alpha so deterministic masks keep a non-trivial subset with non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in shearer.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 2)


def _masked_logits(model, masks, x):
    with shear_model.MaskedForward(model) as mf, torch.no_grad():
        mf.masks = masks
        return model(input_ids=x).logits


def _tiny(model_type: str, tied: bool):
    """A tiny seeded decoder of another supported family (Mistral, Qwen2: q/k/v biases)."""
    cfg = AutoConfig.for_model(model_type, vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                               max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_all_ones_masks_give_identical_logits(tiny_llama):
    model, _ = tiny_llama
    x = _ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    out = _masked_logits(model, shear.Masks.ones(shear.Shape.of(model.config)), x)
    assert (out - ref).abs().max().item() <= 1e-6
    # hooks removed on exit: the model is untouched
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)


def test_masks_change_the_output(tiny_llama):
    """The hooks really act: closing one intermediate dim / one head / the hidden dims changes the logits."""
    model, _ = tiny_llama
    base, x = shear.Shape.of(model.config), _ids()
    ref = _masked_logits(model, shear.Masks.ones(base), x)
    for name in ("head", "intermediate", "hidden", "layer"):
        m = shear.Masks.ones(base)
        z = getattr(m, name)
        z.view(-1)[0] = 0.0
        assert (_masked_logits(model, m, x) - ref).abs().max() > 1e-4, name


@pytest.mark.parametrize(
    "target",
    [
        {"layers": 3, "hidden": 40, "heads": 2, "intermediate": 96},                 # whole kv groups (kv 2 -> 1)
        {"layers": 2, "hidden": 48, "heads": 2, "kv_heads": 2, "intermediate": 80},  # heads inside groups
        {"hidden": 56},                                                              # hidden only
        {"layers": 3},                                                               # depth only
    ],
)
def test_materialized_equals_masked_and_hits_target(tiny_llama, target, tmp_path):
    model, tok = tiny_llama
    base = shear.Shape.of(model.config)
    t = shear.resolve_target(base, target)
    shearer = shear.Shearer(model, t)
    _random_gates(shearer)
    masks = shearer.deterministic()
    x = _ids()
    masked = _masked_logits(model, masks, x)
    small = shear_model.materialize(model, masks)
    with torch.no_grad():
        out = small(input_ids=x).logits
    assert (out - masked).abs().max().item() <= 1e-5 * max(1.0, masked.abs().max().item())

    # the target shape exactly, in the config and in every tensor
    c = small.config
    assert shear.Shape.of(c) == t
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim == 16
    hd = c.head_dim
    assert small.model.embed_tokens.weight.shape == (264, t.hidden)
    assert len(small.model.layers) == t.layers
    for layer in small.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (t.heads * hd, t.hidden)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (t.kv_heads * hd, t.hidden)
        assert a.o_proj.weight.shape == (t.hidden, t.heads * hd)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (t.intermediate, t.hidden)
        assert m.down_proj.weight.shape == (t.hidden, t.intermediate)
        assert layer.input_layernorm.weight.shape == (t.hidden,)
    assert small.num_parameters() == shear.Arch.of(model).count(t) < model.num_parameters()

    # a genuinely smaller plain checkpoint: save_pretrained / from_pretrained give the same logits
    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - out).abs().max().item() <= 1e-6


@pytest.mark.parametrize("model_type,tied", [("mistral", False), ("qwen2", False), ("qwen2", True)])
def test_other_llama_family_decoders(model_type, tied, tmp_path):
    model = _tiny(model_type, tied)
    base = shear.Shape.of(model.config)
    t = shear.resolve_target(base, {"layers": 2, "hidden": 40, "heads": 4, "intermediate": 64})
    assert t.kv_heads == 2 and t.heads // t.kv_heads == 2  # 3 query heads per group -> 2, both groups kept
    shearer = shear.Shearer(model, t)
    _random_gates(shearer)
    masks = shearer.deterministic()
    x = _ids()
    masked = _masked_logits(model, masks, x)
    small = shear_model.materialize(model, masks)
    with torch.no_grad():
        out = small(input_ids=x).logits
    assert (out - masked).abs().max().item() <= 1e-5 * max(1.0, masked.abs().max().item())
    small.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert shear.Shape.of(reloaded.config) == t
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - out).abs().max().item() <= 1e-6


def test_gqa_targets(tiny_llama):
    model, _ = tiny_llama  # 4 heads, 2 kv heads: 2 query heads per group
    base = shear.Shape.of(model.config)
    assert shear.resolve_target(base, {"heads": 2}).kv_heads == 1              # a whole group
    assert shear.resolve_target(base, {"heads": 2, "kv_heads": 2}).kv_heads == 2
    with pytest.raises(CompressError, match="heads"):
        shear.resolve_target(base, {"heads": 3})                               # not kv x (1..2)
    with pytest.raises(CompressError, match="kv_heads"):
        shear.resolve_target(base, {"heads": 4, "kv_heads": 1})                # 4 per group > 2
    with pytest.raises(CompressError, match="unknown"):
        shear.resolve_target(base, {"width": 3})
    with pytest.raises(CompressError):
        shear.resolve_target(base, {"hidden": 65})
    # deterministic masks: the same (kv groups, heads per group) in every layer, whatever the gates learned
    for target in ({"heads": 2}, {"heads": 2, "kv_heads": 2}):
        t = shear.resolve_target(base, target)
        shearer = shear.Shearer(model, t)
        _random_gates(shearer, seed=3)
        keep = shearer.deterministic().kept("head").view(base.layers, base.kv_heads, -1)  # (L, K, r)
        per_group = keep.sum(-1)
        assert (per_group.gt(0).sum(-1) == t.kv_heads).all()
        assert (per_group[per_group > 0] == t.heads // t.kv_heads).all()


def test_derive_shape_from_param_count(tiny_llama):
    model, _ = tiny_llama
    arch, n = shear.Arch.of(model), model.num_parameters()
    assert arch.count(shear.Shape.of(model.config)) == n
    s = shear.derive_shape(model, n // 2)
    assert s.heads % s.kv_heads == 0 and s.layers <= 4 and s.hidden < 64
    assert abs(arch.count(s) - n // 2) / (n // 2) < 0.15
    assert prune.target_shape(model, prune.Config(target=0.5, multiple_of=1)) == s
    assert shear.shape_error(model, s) is None  # e.g. LlamaConfig's hidden % heads == 0
    with pytest.raises(CompressError, match="not a valid LlamaConfig"):
        prune.target_shape(model, prune.Config(target={"hidden": 50, "heads": 4}, multiple_of=1))
    with pytest.raises(CompressError):
        shear.derive_shape(model, 2 * n)


def test_lagrangian_sign(tiny_llama):
    """Gradient ascent on lambda raises the penalty while s_hat != t; descent on log_alpha moves s_hat to t."""
    model, _ = tiny_llama
    t = shear.resolve_target(shear.Shape.of(model.config), {"intermediate": 80})  # keep half
    shearer = shear.Shearer(model, t, init=3.0)
    lam_opt = torch.optim.SGD(shearer.lambda_parameters(), lr=1.0, maximize=True)
    gate_opt = torch.optim.SGD(shearer.gate_parameters(), lr=1.0)
    with torch.no_grad():
        shearer.lambdas["intermediate"].copy_(torch.tensor([0.5, 0.5]))  # non-zero so the gates feel the penalty
    s0 = shearer.expected_fractions()["intermediate"].mean().item()
    loss0, info = shearer.lagrangian(progress=1.0)
    assert s0 > info["intermediate"]["target"] == 0.5 and loss0.item() > 0
    loss0.backward()
    lam = shearer.lambdas["intermediate"]
    assert lam.grad[0].item() == pytest.approx(s0 - 0.5, rel=1e-4) and lam.grad[1].item() > 0
    lam_opt.step()
    gate_opt.step()
    loss1, _ = shearer.lagrangian(progress=1.0)
    s1 = shearer.expected_fractions()["intermediate"].mean().item()
    assert s1 < s0                                          # masks: descent shrinks the expected size toward t
    with torch.no_grad():                                   # lambdas: at the same s_hat, the penalty grew
        lam_before = torch.tensor([0.5, 0.5])
        gap = shearer.expected_fractions()["intermediate"] - 0.5
        assert (lam[0] * gap + lam[1] * gap**2).mean() > (lam_before[0] * gap + lam_before[1] * gap**2).mean()
    # warmup: progress 0 targets the full model, so a full-size s_hat costs ~nothing
    assert shearer.target_fractions(0.0)["intermediate"] == 1.0
    assert shearer.target_fractions(0.5)["intermediate"] == pytest.approx(0.75)


def test_hard_concrete_distribution():
    g = shear.HardConcrete((20000,), init=0.0, generator=torch.Generator().manual_seed(0))
    z = g.sample(torch.Generator().manual_seed(1))
    assert z.min() >= 0 and z.max() <= 1
    p_nonzero = (z > 0).float().mean().item()
    assert p_nonzero == pytest.approx(g.score().mean().item(), abs=0.02)  # score = P(z != 0)
    assert 0 < (z == 1).float().mean() < 1 and 0 < (z == 0).float().mean() < 1  # the stretch gives exact 0s and 1s
    z.sum().backward()
    assert g.log_alpha.grad.abs().sum() > 0


def test_config_checks():
    with pytest.raises(CompressError):
        prune.Config(target={"depth": 2})
    with pytest.raises(CompressError):
        prune.Config(target=-3)
    with pytest.raises(CompressError):
        prune.Config(target=1.5)
    with pytest.raises(CompressError):
        prune.Config(steps=0)
    with pytest.raises(CompressError):
        prune.Config(target_warmup=2.0)
    assert prune.Config(data="zoo:austen").data == ["zoo:austen"]


def test_stage_run_reduces_gap(tiny_llama, text_file, tmp_path):
    model, tok = tiny_llama
    params_before = model.num_parameters()
    ctx = Context.for_tests(tmp_path, data={"train": [str(text_file)]})
    target = {"layers": 3, "hidden": 48, "heads": 2, "intermediate": 96}
    cfg = prune.Config(target=target, steps=30, batch_size=2, seq_len=32, lr=1e-3, lr_masks=0.5, lr_lambdas=0.05,
                       target_warmup=0.25, log_every=5, multiple_of=16)
    small, stats = prune.run(model, tok, cfg, ctx)
    t = shear.resolve_target(shear.Shape.of(model.config), target)
    assert shear.Shape.of(small.config) == t
    assert stats["final_shape"] == t.as_dict() and stats["params_after"] == small.num_parameters() < params_before
    assert stats["params_before"] == params_before
    assert stats["gap"]["end"] < stats["gap"]["start"]
    assert stats["params_gap"]["end"] < stats["params_gap"]["start"] / 2
    assert stats["target_params"] == small.num_parameters()
    assert stats["expected_shape"][-1]["params"] < stats["expected_shape"][0]["params"]
    assert stats["materialize_max_rel_error"] < 1e-5
    assert len(stats["lm_loss"]) > 0 and set(stats["lambdas"]) == {"layer", "kv", "intermediate", "hidden"}
    assert all(torch.isfinite(p).all() for p in small.parameters())
    json.dumps(stats)  # manifest-ready


def test_first_k_baseline_hits_target(tiny_llama):
    model, _ = tiny_llama
    base = shear.Shape.of(model.config)
    t = shear.resolve_target(base, {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 2, "intermediate": 64})
    small = shear_model.materialize(model, shear.first_k_masks(base, t))
    assert shear.Shape.of(small.config) == t
    # the first query head of each group, the first dims: plain slices of the original weights
    q = model.model.layers[0].self_attn.q_proj.weight
    expect = torch.cat([q[0:16, :32], q[32:48, :32]])
    assert torch.equal(small.model.layers[0].self_attn.q_proj.weight, expect)


# ------------------------------------------------------------------------------------------ every family


def _family(name: str):
    from compress.tiny import build

    model, tok = build(REPO / "configs" / "models" / f"tiny-{name}.json", seed=0)
    return model.eval(), tok


def _component_masks(base, arch, name):
    """All-ones masks with one unit of `name` closed."""
    m = shear.Masks.ones(base, arch.experts)
    getattr(m, name).view(-1)[0] = 0.0
    return m


@pytest.mark.parametrize("name", PRUNABLE)
def test_every_prunable_family_masks_and_materialises_exactly(name, tmp_path):
    """On each family: open masks change nothing, each mask really acts, the parameter count of any shape is exact,
    and the materialised model computes what the masked one computes, then loads with plain from_pretrained."""
    model, _ = _family(name)
    base, arch = shear.Shape.of(model.config), shear.Arch.of(model)
    assert arch.count(base) == model.num_parameters()
    x = _ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert (_masked_logits(model, shear.Masks.ones(base, arch.experts), x) - ref).abs().max() <= 1e-5
    for component in ("head", "intermediate", "hidden", "layer"):
        assert (_masked_logits(model, _component_masks(base, arch, component), x) - ref).abs().max() > 1e-5, component
    t = shear.resolve_target(base, {"layers": base.layers - 1, "hidden": base.hidden - 16, "heads": 2,
                                    "intermediate": base.intermediate // 2})
    shearer = shear.Shearer(model, t)
    _random_gates(shearer)
    masks = shearer.deterministic()
    masked = _masked_logits(model, masks, x)
    small = shear_model.materialize(model, masks).eval()
    with torch.no_grad():
        out = small(input_ids=x).logits
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert shear.Shape.of(small.config) == t and small.num_parameters() == arch.count(t)
    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - out).abs().max() <= 1e-5 * out.abs().max()
    fam = families.of(model)
    for key in fam.layer_lists:  # per-layer lists follow the kept layers
        if isinstance(model.config.to_dict().get(key), list):
            kept = masks.kept("layer").nonzero().flatten().tolist()
            assert reloaded.config.to_dict()[key] == [model.config.to_dict()[key][i] for i in kept]


@pytest.mark.parametrize("name", REFUSED)
def test_families_whose_architecture_forbids_it_are_refused_in_one_line(name):
    model, _ = _family(name)
    with pytest.raises(CompressError) as e:
        shear_model.check_supported(model)
    message = str(e.value)
    assert "\n" not in message and families.of(model).name in message and "head_dim" in message
    assert all(families.of(n).name in message for n in ("llama", "gemma3_text", "phi3", "olmo2"))


def test_derived_shapes_are_multiples_that_deploy():
    """Half of SmolLM2-135M's parameters (meta device: no weights): every width a multiple of 64, so GPTQ packing
    at any bit width and the common GPU kernels take it; an explicit width that is not is refused with the nearest."""
    from compress.stages.prune import _meta_model

    smollm2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                   intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   tie_word_embeddings=True)
    model = _meta_model(smollm2)
    s = prune.target_shape(model, prune.Config(target=0.5))
    assert s.hidden % 64 == 0 and s.intermediate % 64 == 0 and (s.heads * 64) % 64 == 0
    n = shear.Arch.of(model).count(s)
    assert abs(n - 134_515_008 / 2) / (134_515_008 / 2) < 0.05
    with pytest.raises(CompressError, match="hidden=400 is not a multiple of 64.*use 384 or 448"):
        prune.target_shape(model, prune.Config(target={"hidden": 400}))
