"""Distillation (compress/algorithms/kd.py + the `distill` stage): tiny Llama / BERT, CPU, seconds."""

from __future__ import annotations

import copy

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress import checkpoint, config, manifest, pipeline
from compress.algorithms import kd
from compress.context import Context
from compress.errors import CompressError
from compress.stages import distill
from compress.tiny import build
from conftest import REPO, TINY_BERT, TINY_LLAMA



def _ids(n=2, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(tmp_path: Path, base: Path, name: str, **changes) -> Path:
    """A variant of a tiny model config (e.g. a bare BertModel, a wider init, another vocab)."""
    c = json.loads(base.read_text())
    c.update(changes)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(c))
    return p


def _cfg(**kw) -> distill.Config:
    base = dict(tokens=24 * 4 * 32, batch_size=4, seq_len=32, lr=2e-3, save_every=0, eval_tokens=8 * 32)
    return distill.Config(**{**base, **kw})


# -- the loss core


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_kd_loss_of_a_model_with_itself_is_zero(which, tiny_llama, tiny_bert):
    model, _ = tiny_llama if which == "llama" else tiny_bert
    with torch.no_grad():
        out = model(input_ids=_ids(), output_hidden_states=True)
    pairs = [(h, h) for h in out.hidden_states[1:]]
    w = kd.Weights(kl=5.0, lm=0.0, cos=1.0, mse=1.0, pool=1.0)
    total, logs = kd.distillation_loss(w, out.logits, out.logits, pairs)
    assert logs["kl"].item() == 0.0 and logs["mse"].item() == 0.0
    assert logs["cos"].item() < 1e-6 and logs["pool"].item() < 1e-6 and total.item() < 1e-5
    # masked-LM positions only
    mask = torch.zeros(out.logits.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    assert kd.soft_target_kl(out.logits, out.logits, 2.0, mask).item() == 0.0
    # the LM term is separate: it enters as alpha_lm * lm and is not part of "kd"
    lm = torch.tensor(3.5)
    total, logs = kd.distillation_loss(kd.Weights(lm=2.0), out.logits, out.logits, pairs[-1:], lm=lm)
    assert total.item() == pytest.approx(7.0 + logs["kd"].item()) and logs["kd"].item() < 1e-6


def test_soft_target_kl_on_hand_numbers():
    z_t = torch.tensor([[[2.0, 0.0, -1.0]]])   # (B=1, L=1, V=3)
    z_s = torch.tensor([[[0.0, 1.0, 0.0]]])
    T = 2.0
    p_t, p_s = F.softmax(z_t[0, 0] / T, -1), F.softmax(z_s[0, 0] / T, -1)
    expected = T * T * float((p_t * (p_t / p_s).log()).sum())
    assert kd.soft_target_kl(z_s, z_t, T).item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0
    # mean over positions: a second identical position leaves it unchanged, a zero-KL one halves it
    assert kd.soft_target_kl(z_s.repeat(1, 2, 1), z_t.repeat(1, 2, 1), T).item() == pytest.approx(expected, rel=1e-6)
    both_s, both_t = torch.cat([z_s, z_t], 1), torch.cat([z_t, z_t], 1)
    assert kd.soft_target_kl(both_s, both_t, T).item() == pytest.approx(expected / 2, rel=1e-6)
    # cosine: orthogonal -> 1, opposite -> 2
    a, b = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 3.0], [-2.0, 0.0]]])
    assert kd.cosine_loss(a, b).item() == pytest.approx(1.5)


def test_embedding_terms():
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    assert kd.similarity_loss(h_t[:, 0], h_t[:, 0]).item() < 1e-12
    assert kd.similarity_loss(h_s[:, 0], h_t[:, 0]).item() > 0.01
    assert kd.similarity_loss(2 * h_t[:, 0], h_t[:, 0]).item() < 1e-12  # scale-free, as cosine agreement is
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 3:] = False
    assert torch.allclose(kd.mean_pool(h_s, mask), h_s[:, :3].mean(1))
    # pool and sim use the last pair (the sentence embedding); cos averages over every pair
    w = kd.Weights(kl=0, lm=0, cos=1.0, pool=1.0, sim=1.0)
    _, logs = kd.distillation_loss(w, hidden_pairs=[(h_s, h_t), (h_t, h_t)])
    assert logs["pool"].item() < 1e-6 and logs["sim"].item() < 1e-12
    assert logs["cos"].item() == pytest.approx(kd.cosine_loss(h_s, h_t).item() / 2, rel=1e-5)


def test_layer_selection_and_map():
    assert kd.select_layers(12, 6, "alternate") == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert kd.select_layers(30, 15, "alternate") == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert kd.select_layers(6, 3, "alternate") == [0, 3, 5]
    assert kd.select_layers(4, 1, "alternate") == [0]
    assert kd.select_layers(5, 2, "first") == [0, 1] and kd.select_layers(5, 2, "last") == [3, 4]
    assert kd.select_layers(4, 4, "alternate") == [0, 1, 2, 3]
    assert kd.layer_map([0, 2, 4, 7, 9, 11], 12) == [1, 3, 6, 8, 10, 11]
    assert kd.layer_map([3, 4], 5) == [3, 4] and kd.layer_map([0, 1], 5) == [0, 4]
    assert kd.uniform_map(4, 2) == [1, 3] and kd.uniform_map(12, 6) == [1, 3, 5, 7, 9, 11] and kd.uniform_map(4, 3) == [0, 2, 3]


def test_mlm_masking():
    ids = torch.randint(4, 200, (64, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # a special token (BOS/CLS) at every block start
    inputs, labels, chosen = kd.mask_tokens(ids, mask_id=3, vocab_size=200, special_ids=[1], p=0.15,
                                            generator=torch.Generator().manual_seed(0))
    assert not chosen[:, 0].any() and 0.12 < chosen.float().mean().item() < 0.18
    assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == -100).all()
    assert torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == 3) & chosen
    assert 0.75 < masked.sum().item() / chosen.sum().item() < 0.85
    one = torch.tensor([[1, 7]])  # too short to draw a position: one is forced
    assert kd.mask_tokens(one, 3, 200, [1], p=1e-9)[2].tolist() == [[False, True]]


# -- the student


def _layer_of(name: str) -> tuple[str, int, str] | None:
    m = re.match(r"(.*?\.(?:layers|layer))\.(\d+)\.(.*)", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


@pytest.mark.parametrize("init", ["alternate", "first", "last"])
@pytest.mark.parametrize("which", ["llama", "bert"])
def test_student_init_copies_exactly_the_chosen_layers(init, which, tiny_llama, tiny_bert):
    teacher, _ = tiny_llama if which == "llama" else tiny_bert
    teacher.config.layer_types = ["full_attention"] * 4  # a per-layer config list
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, idx, sliced = distill.build_student(teacher, 2, init)
    assert idx == kd.select_layers(4, 2, init) and sliced == ["layer_types"]
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert student.config.layer_types == ["full_attention"] * 2 and len(teacher.config.layer_types) == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(before[k], t_state[k]) for k in before)  # the teacher is untouched
    for name, value in s_state.items():
        where = _layer_of(name)
        source = name if where is None else f"{where[0]}.{idx[where[1]]}.{where[2]}"
        assert torch.equal(value, t_state[source]), name
        assert value.data_ptr() != t_state[source].data_ptr()  # a copy, not shared storage
    n_layer_keys = sum(_layer_of(k) is not None for k in t_state) // 4
    assert len(s_state) == len(t_state) - 2 * n_layer_keys
    attn = [m for m in student.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(m.layer_idx for m in attn) == [0, 1]
    if which == "llama":
        assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
        with torch.no_grad():
            student(input_ids=_ids())


@pytest.mark.parametrize("name", ["gemma3", "qwen3-moe", "qwen2"])
def test_student_keeps_per_layer_config_consistent(name, tmp_path):
    """Gemma 3's sliding/full pattern and Qwen3-MoE's dense-layer indices follow the kept layers: the student is
    the teacher's kept layers exactly (same logits as running them), and loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    teacher, _ = build(REPO / "configs" / "models" / f"tiny-{name}.json", seed=0)
    kept = kd.select_layers(len(teacher.model.layers), 3, "alternate")
    if name == "qwen3-moe":  # the second kept layer dense: its index must follow
        teacher.config.mlp_only_layers = [kept[1]]
        teacher = type(teacher)(teacher.config).eval()
    student, idx, sliced = distill.build_student(teacher, 3, "alternate")
    assert idx == kept
    cfg = teacher.config.to_dict()
    if cfg.get("layer_types"):
        assert student.config.layer_types == [cfg["layer_types"][i] for i in kept] and "layer_types" in sliced
    if name == "qwen3-moe":
        assert student.config.mlp_only_layers == [1] and "mlp_only_layers" in sliced
    short = copy.deepcopy(teacher)
    short.model.layers = torch.nn.ModuleList([short.model.layers[i] for i in kept])
    for j, layer in enumerate(short.model.layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    short.config = short.model.config = student.config
    x = _ids()
    with torch.no_grad():
        ref = short(input_ids=x, use_cache=False).logits
        out = student(input_ids=x, use_cache=False).logits
    assert (out - ref).abs().max() <= 1e-5
    student.save_pretrained(tmp_path / "s")
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")(input_ids=x, use_cache=False).logits
    assert (again - out).abs().max() <= 1e-5


def test_full_depth_student_computes_what_the_teacher_computes(tiny_llama):
    teacher, _ = tiny_llama
    student, idx, _ = distill.build_student(teacher, 4)
    with torch.no_grad():
        assert torch.equal(student(input_ids=_ids()).logits, teacher(input_ids=_ids()).logits)


# -- the stage


def test_short_distill_run_reduces_the_kd_loss_llama(tiny_llama, text_file, tmp_path):
    model, tok = tiny_llama
    ctx = Context.for_tests(tmp_path, data={"train": [str(text_file)]})
    student, stats = distill.run(model, tok, _cfg(layers=2, alpha_lm=0.0), ctx)
    assert stats["val_end"]["kd"] < 0.5 * stats["val_start"]["kd"]
    assert stats["student"]["layers"] == student.config.num_hidden_layers == 2
    assert stats["student"]["teacher_layers"] == [0, 3] and stats["teacher"]["ref"] == "input"
    assert stats["param_ratio"] == pytest.approx(student.num_parameters() / model.num_parameters())
    assert stats["weights"]["kl"] == 5.0 and stats["weights"]["lm"] == 0.0
    assert set(stats["loss_terms"]) == {"kd", "kl", "cos"} and len(stats["loss_curve"]) == stats["steps"] == 24
    assert not any(p.requires_grad for p in model.parameters())  # the teacher was frozen
    json.dumps(stats)  # manifest-ready


@pytest.mark.parametrize("bare", [False, True], ids=["masked-lm", "bare-encoder"])
def test_short_distill_run_reduces_the_kd_loss_bert(bare, text_file, tmp_path):
    changes = {"initializer_range": 0.2}  # default-init tiny BERT layers are near-identity: nothing to learn
    if bare:
        changes["architectures"] = ["BertModel"]
    model, tok = build(_config(tmp_path, TINY_BERT, "bert", **changes), seed=0)
    ctx = Context.for_tests(tmp_path, data={"train": [str(text_file)]})
    student, stats = distill.run(model, tok, _cfg(layers=2, **({} if bare else {"alpha_lm": 0.0})), ctx)
    assert stats["val_end"]["kd"] < 0.5 * stats["val_start"]["kd"]
    assert type(student).__name__ == ("BertModel" if bare else "BertForMaskedLM")
    if bare:
        assert stats["kind"] == "bare" and stats["weights"]["kl"] == 0 and stats["weights"]["pool"] == 1.0
        assert stats["student"]["frozen"] == ["pooler.dense.weight", "pooler.dense.bias"]
        assert set(stats["val_end"]) == {"loss", "kd", "cos", "pool"}
    else:
        assert stats["kind"] == "masked" and set(stats["val_end"]) == {"loss", "kd", "kl", "cos"}


def test_named_teacher_with_mapped_layers_and_lm_term(tiny_llama, text_file, tmp_path):
    teacher, tok = tiny_llama
    checkpoint.save(teacher, tok, tmp_path / "teacher")
    student, _ = build(_config(tmp_path, TINY_LLAMA, "small", num_hidden_layers=2), seed=1)
    ctx = Context.for_tests(tmp_path, data={"train": [str(text_file)]}, stage_paths={"big": tmp_path / "teacher"})
    out, stats = distill.run(student, tok, _cfg(teacher="big", hidden_layers="mapped", tokens=8 * 4 * 32), ctx)
    assert out is student and stats["student"]["built_from_teacher"] is False
    assert stats["teacher"]["ref"] == "big" and stats["teacher"]["hash"] == checkpoint.content_hash(tmp_path / "teacher")
    assert stats["hidden_pairs"] == [[0, 1], [1, 3]] and stats["projection"] is None
    assert {"kl", "lm", "cos", "kd"} <= set(stats["loss_terms"])
    assert stats["val_end"]["loss"] < stats["val_start"]["loss"]


def test_bad_settings_are_compress_errors(tiny_llama, tiny_bert, text_file, tmp_path):
    model, tok = tiny_llama
    ctx = Context.for_tests(tmp_path, data={"train": [str(text_file)]})
    with pytest.raises(CompressError, match="exceeds the teacher's 4 layers"):
        distill.run(model, tok, _cfg(layers=5), ctx)
    with pytest.raises(CompressError, match="init must be one of"):
        distill.Config(init="middle")
    with pytest.raises(CompressError, match="remove one of them"):
        distill.Config(teacher="base", layers=2)
    with pytest.raises(CompressError, match="temperature"):
        distill.Config(temperature=0)
    with pytest.raises(CompressError, match="alpha_cos"):
        distill.Config(alpha_cos=-1.0)
    with pytest.raises(CompressError, match="every alpha is 0"):
        distill.run(model, tok, _cfg(layers=2, alpha_kl=0, alpha_lm=0, alpha_cos=0), ctx)
    with pytest.raises(CompressError, match="neither an earlier stage"):
        distill.run(model, tok, _cfg(teacher="nowhere"), ctx)
    # vocabulary mismatch: a teacher with 300 token ids for a 264-token student
    other, _ = build(_config(tmp_path, TINY_LLAMA, "v300", vocab_size=300), seed=0)
    checkpoint.save(other, tok, tmp_path / "v300")
    with pytest.raises(CompressError, match="vocabulary mismatch, teacher 300 tokens vs student 264"):
        distill.run(model, tok, _cfg(teacher=str(tmp_path / "v300")), ctx)
    # another kind of head
    bert, btok = tiny_bert
    checkpoint.save(bert, btok, tmp_path / "bert")
    with pytest.raises(CompressError, match="same kind of head"):
        distill.run(model, tok, _cfg(teacher=str(tmp_path / "bert")), ctx)
    # soft targets on an encoder without logits
    bare, btok = build(_config(tmp_path, TINY_BERT, "bare", architectures=["BertModel"]), seed=0)
    with pytest.raises(CompressError, match="needs an LM head"):
        distill.run(bare, btok, _cfg(layers=2, alpha_kl=1.0), ctx)
    with pytest.raises(CompressError, match="no data"):
        distill.run(model, tok, _cfg(layers=2), Context.for_tests(tmp_path))
    with pytest.raises(CompressError, match="mapped needs a student with at most"):
        deep, _ = build(_config(tmp_path, TINY_LLAMA, "deep", num_hidden_layers=6), seed=0)
        checkpoint.save(model, tok, tmp_path / "shallow")
        distill.run(deep, tok, _cfg(teacher=str(tmp_path / "shallow"), hidden_layers="mapped"), ctx)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(CompressError, match="before gptq/int8"):
        distill.run(model, tok, _cfg(layers=2), ctx)


# -- pipelines


def _run(tmp_path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(body))
    pipe = config.load(p)
    pipeline.run(pipe, out_root=tmp_path / "artifacts", log=lambda m: None, quiet=True)
    return tmp_path / "artifacts" / pipe.name


def test_prune_then_distill_from_the_original_pipeline(tmp_path, text_file):
    run = _run(tmp_path, f"""
        name: prune-distill
        model: tiny:{TINY_LLAMA}
        seed: 0
        data: {{train: [{text_file}]}}
        eval: {{perplexity: [{text_file}], seq_len: 32, max_tokens: 256, speed: false}}
        stages:
          - prune: {{target: {{layers: 3, hidden: 48, heads: 2, intermediate: 96}}, steps: 4, batch_size: 2, seq_len: 32,
                     multiple_of: 16}}
          - distill: {{teacher: base, tokens: 2048, batch_size: 2, seq_len: 32, eval_tokens: 128, lr: 1.0e-3}}
        """)
    base, pruned, dist = (manifest.read(run / f) for f in ("00-base", "01-prune", "02-distill"))
    s = dist["stats"]
    assert dist["complete"] and dist["input"]["from"] == "prune"
    assert s["teacher"]["ref"] == "base" and s["teacher"]["hash"] == base["output_hash"]
    assert s["student"] == {**s["student"], "layers": 3, "hidden": 48, "built_from_teacher": False}
    assert s["projection"] == [64, 48]  # pruned width -> a learned projection for the cosine term
    assert s["param_ratio"] == pytest.approx(dist["size"]["params"] / base["size"]["params"], rel=1e-6)
    assert s["val_end"]["kd"] < s["val_start"]["kd"]
    assert "perplexity" in dist["accuracy"] and dist["round_trip"]["max_rel_error"] <= 1e-5


def _varied_corpus(tmp_path: Path) -> Path:
    """Short, different sentences (the fixture's repeat one text, so their 32-byte prefixes are all equal)."""
    import random

    rng = random.Random(0)
    words = "the a of sea ship storm calm night day letter ball sister horse rain garden house quiet".split()
    paras = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))).capitalize() + "."
                      for _ in range(6)) for _ in range(400)]
    p = tmp_path / "varied.txt"
    p.write_text("\n\n".join(paras))
    return p


def test_encoder_distill_pipeline_is_scored_by_agreement(tmp_path):
    cfg = _config(tmp_path, TINY_BERT, "bare", architectures=["BertModel"], initializer_range=0.2)
    text_file = _varied_corpus(tmp_path)
    run = _run(tmp_path, f"""
        name: encoder-distill
        model: tiny:{cfg}
        data: {{train: [{text_file}]}}
        eval: {{perplexity: [{text_file}], seq_len: 32, agreement_pairs: 8, speed: false}}
        stages:
          - distill: {{layers: 2, tokens: 4096, batch_size: 4, seq_len: 32, eval_tokens: 128, lr: 2.0e-3}}
        """)
    m = manifest.read(run / "01-distill")
    agreement = m["accuracy"]["agreement"][str(text_file)]
    assert agreement["protocol"]["reference"] == "base" and math.isfinite(agreement["spearman"])
    assert m["stats"]["student"]["layers"] == 2 and m["size"]["params"] < manifest.read(run / "00-base")["size"]["params"]
    assert m["stats"]["inputs"] == "sentences" and m["stats"]["mean_row_tokens"] < 32  # padded sentence rows
    reloaded, _ = checkpoint.load(run / "01-distill")
    assert type(reloaded).__name__ == "BertModel" and reloaded.config.num_hidden_layers == 2


def test_shipped_pipelines_validate():
    for name, layers in (("minilm-distill", 3), ("smollm2-distill", 15)):
        pipe = config.load(Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.yaml")
        assert [s.type for s in pipe.stages] == ["distill"] and pipe.stages[0].config.layers == layers


def test_length_grouping_keeps_the_rows_cuts_padding_and_resumes_exactly():
    from compress.train import DomainMixture

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (200,), generator=g)
    rows = torch.zeros(200, 32, dtype=torch.long)                      # pad id 0
    for i, n in enumerate(lengths.tolist()):
        rows[i, :n] = torch.arange(1, n + 1) + 100 * i                  # every row unique
    setup = distill._Setup(kind="bare", weights=None, pairs=[], proj=None, mask_id=None, vocab=0, special=[],
                           mlm_probability=0.15, pad_id=0)

    def served(n, state=None):
        it = distill._LengthGrouped(DomainMixture({"d": rows}, 8, seed=0), setup, pool=4, seed=0)
        if state is not None:
            it.load_state_dict(state)
        return [next(it) for _ in range(n)], it

    batches, _ = served(8)                                              # 2 pools of 4 batches of 8 rows
    plain = DomainMixture({"d": rows}, 8, seed=0)
    drawn = torch.cat([next(plain)["input_ids"] for _ in range(8)])
    got = [r[m.bool()] for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert sorted(tuple(r.tolist()) for r in got) == sorted(tuple(r[r != 0].tolist()) for r in drawn)
    padded_plain = sum(int((drawn[i:i + 8] != 0).sum(1).max()) * 8 for i in range(0, 64, 8))
    assert sum(b["input_ids"].numel() for b in batches) < 0.8 * padded_plain
    # a checkpoint in the middle of a pool resumes with the same batches
    _, it = served(6)
    state = it.state_dict()
    rest, _ = served(4, state)
    for a, b in zip(rest, served(10)[0][6:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
