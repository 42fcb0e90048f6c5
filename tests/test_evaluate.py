"""compress.evaluate: perplexity against hand computation, protocol, sliding windows, MLM, agreement, lm-eval."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress import data, evaluate, zoo
from compress.errors import CompressError
from compress.evaluate import EvalConfig

USER_ZOO = zoo.zoo_dir()  # read before the autouse fixture moves COMPRESS_CACHE: the zoo this user fetched
PROTOCOL_KEYS = {"metric", "source", "split", "fingerprint", "tokenizer", "seq_len", "stride", "bos", "max_tokens",
                 "n_tokens", "n_windows", "dtype", "device"}


def _cfg(spec, **kw):
    base = dict(perplexity=[spec], seq_len=64, max_tokens=320, speed=False)
    base.update(kw)
    return EvalConfig(**base)


def test_perplexity_equals_hand_computed_exp_mean_nll(tiny_llama, text_file):
    model, tok = tiny_llama
    spec = str(text_file)
    out = evaluate.run(model, tok, _cfg(spec), "cpu")
    entry = out["accuracy"]["perplexity"][spec]

    blocks = data.token_blocks(tok, spec, "test", seq_len=64, max_tokens=320)
    with torch.no_grad():
        logits = model(blocks).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert entry["value"] == pytest.approx(math.exp(nll.item()), rel=1e-5)

    p = entry["protocol"]
    assert PROTOCOL_KEYS <= set(p)
    assert p["source"] == spec and p["split"] == "test" and p["metric"] == "perplexity"
    assert p["fingerprint"] == data.fingerprint(data.split_texts(spec, "test"))
    assert (p["seq_len"], p["stride"], p["bos"], p["max_tokens"]) == (64, None, True, 320)
    assert p["n_windows"] == len(blocks) and p["n_tokens"] == blocks.shape[0] * 63
    assert (p["dtype"], p["device"]) == ("float32", "cpu")
    json.dumps(out)  # manifest-ready


def test_same_number_twice_and_batch_size_does_not_matter(tiny_llama, text_file):
    model, tok = tiny_llama
    spec = str(text_file)
    a = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]
    b = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]
    assert a == b
    c = evaluate.run(model, tok, _cfg(spec, batch_size=3), "cpu")["accuracy"]["perplexity"][spec]["value"]
    assert c == pytest.approx(a["perplexity"][spec]["value"], rel=1e-5)


def test_windows_non_overlapping_equal_token_blocks(tiny_llama, text_file):
    _, tok = tiny_llama
    stream = data.token_ids(tok, str(text_file), "test")
    ids, scored, step = evaluate.causal_windows(stream, 64, 640, None, tok.bos_token_id)
    assert step is None
    assert torch.equal(ids, data.token_blocks(tok, str(text_file), "test", 64, 640))
    assert not scored[:, 0].any() and scored[:, 1:].all()


@pytest.mark.parametrize("bos", [True, False])
def test_sliding_windows_score_each_token_once_with_context(bos):
    stream = torch.arange(1000, 1000 + 700)
    L, stride = 32, 8
    ids, scored, step = evaluate.causal_windows(stream, L, None, stride, 0 if bos else None)
    c = L - 1 if bos else L
    span = (len(stream) // c) * c
    assert step == stride and ids.shape[1] == L
    positions = ids[scored]  # stream values double as positions
    assert len(positions) == len(set(positions.tolist()))
    expected = set(range(1000, 1000 + span)) if bos else set(range(1001, 1000 + span))
    assert set(positions.tolist()) == expected
    for row in range(1, len(ids)):  # after the first window, each scored token has >= L - stride positions before it
        assert int(scored[row].nonzero()[0]) >= L - stride


def test_stride_perplexity_matches_hf_labels(tiny_llama, text_file):
    model, tok = tiny_llama
    spec = str(text_file)
    out = evaluate.run(model, tok, _cfg(spec, stride=16), "cpu")["accuracy"]["perplexity"][spec]
    flat = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]["perplexity"][spec]
    assert out["protocol"]["stride"] == 16 and out["protocol"]["n_tokens"] == flat["protocol"]["n_tokens"]
    assert out["protocol"]["n_windows"] > flat["protocol"]["n_windows"]

    # Independent path: HF's own loss with labels=-100 on the positions a window does not score.
    stream = data.token_ids(tok, spec, "test")
    ids, scored, _ = evaluate.causal_windows(stream, 64, 320, 16, tok.bos_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, s in zip(ids, scored):
            labels = x.masked_fill(~s, -100)[None]
            total += model(x[None], labels=labels).loss.item() * int(s.sum())
            count += int(s.sum())
    assert out["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["value"] != flat["value"]


def test_bos_false_scores_all_but_first_token_per_window(tiny_llama, text_file):
    model, tok = tiny_llama
    p = evaluate.run(model, tok, _cfg(str(text_file), bos=False), "cpu")["accuracy"]["perplexity"][str(text_file)]
    assert p["protocol"]["bos"] is False and p["protocol"]["n_tokens"] == p["protocol"]["n_windows"] * 63


def test_bf16_model_scores_in_float32(tiny_llama, text_file):
    model, tok = tiny_llama
    spec = str(text_file)
    fp32 = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]["perplexity"][spec]["value"]
    bf16 = evaluate.run(copy.deepcopy(model).to(torch.bfloat16), tok, _cfg(spec), "cpu")["accuracy"]["perplexity"][spec]
    assert bf16["protocol"]["dtype"] == "bfloat16"
    assert bf16["value"] == pytest.approx(fp32, rel=0.05)


def test_speed_is_measured(tiny_llama, text_file):
    model, tok = tiny_llama
    out = evaluate.run(model, tok, _cfg(str(text_file), speed=True, decode_tokens=8, max_tokens=256), "cpu")
    speed = out["speed"]
    assert speed["eval_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["protocol"]["eval_tokens"] == 256 and speed["protocol"]["decode_tokens"] == 8
    assert model.training is False


def test_eval_restores_training_mode(tiny_llama, text_file):
    model, tok = tiny_llama
    model.train()
    evaluate.run(model, tok, _cfg(str(text_file), max_tokens=128), "cpu")
    assert model.training


def test_mlm_pseudo_perplexity(tiny_bert, text_file):
    model, tok = tiny_bert
    spec = str(text_file)
    a = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]["perplexity"][spec]
    b = evaluate.run(model, tok, _cfg(spec), "cpu")["accuracy"]["perplexity"][spec]
    assert a == b
    p = a["protocol"]
    assert p["metric"] == "pseudo-perplexity" and p["mask_rate"] == 0.15 and p["mask_seed"] == 0
    assert p["n_tokens"] == p["n_windows"] * round(0.15 * 63)

    blocks = data.token_blocks(tok, spec, "test", 64, 320)
    masked, where = evaluate.mlm_mask(blocks, tok, bos=True)
    assert not where[:, 0].any() and (masked[where] == tok.mask_token_id).all()
    assert torch.equal(masked[~where], blocks[~where])
    with torch.no_grad():
        logits = model(masked).logits
    nll = F.cross_entropy(logits[where], blocks[where])
    assert a["value"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    with pytest.raises(CompressError, match="stride"):
        evaluate.run(model, tok, _cfg(spec, stride=16), "cpu")


def test_rankdata_and_spearman_with_ties():
    assert evaluate.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4] -> centred dot 4.5, norms^2 4.5 and 5
    assert evaluate.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert evaluate.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(evaluate.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 8, (200,), generator=g).tolist()  # many ties
    b = (torch.tensor(a) + torch.randint(0, 5, (200,), generator=g)).tolist()
    assert evaluate.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


@pytest.fixture
def sentence_file(tmp_path) -> Path:
    """~200 KB of seeded random-word sentences: enough distinct test-split sentences for agreement."""
    g = torch.Generator().manual_seed(0)
    vocab = "the a of river stone light quiet house letter morning sister field horse storm garden ship".split()

    def sentence():
        n = int(torch.randint(6, 13, (1,), generator=g))
        words = [vocab[int(i)] for i in torch.randint(0, len(vocab), (n,), generator=g)]
        return " ".join(words).capitalize() + "."

    p = tmp_path / "sentences.txt"
    p.write_text("\n\n".join(" ".join(sentence() for _ in range(6)) for _ in range(600)))
    return p


@pytest.fixture
def tiny_encoder(tmp_path):
    """A bare BertModel (no LM head) built from the tiny BERT config."""
    from compress.tiny import build

    raw = json.loads((Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-bert.json").read_text())
    raw["architectures"] = ["BertModel"]
    p = tmp_path / "tiny-encoder.json"
    p.write_text(json.dumps(raw))
    return build(p, seed=0), raw


def test_bare_encoder_agreement(tiny_encoder, sentence_file, tmp_path):
    (model, tok), raw = tiny_encoder
    spec = str(sentence_file)
    out = evaluate.run(model, tok, _cfg(spec, agreement_pairs=40), "cpu")
    assert "perplexity" not in out["accuracy"]  # a bare encoder gets agreement on the perplexity sources
    self_ = out["accuracy"]["agreement"][spec]
    assert self_["spearman"] == pytest.approx(1.0) and self_["mean_cosine"] == pytest.approx(1.0)
    assert self_["protocol"]["reference"] == "self" and self_["protocol"]["n_pairs"] == 40

    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vs = evaluate.run(noisy, tok, _cfg(spec, agreement_pairs=40), "cpu", base_model=model)["accuracy"]["agreement"][spec]
    assert vs["protocol"]["reference"] == "base"
    assert -1.0 <= vs["spearman"] < 1.0 and vs["mean_cosine"] < 1.0

    from compress.tiny import build

    raw2 = dict(raw, hidden_size=32, intermediate_size=64)
    p2 = tmp_path / "narrow.json"
    p2.write_text(json.dumps(raw2))
    narrow, _ = build(p2, seed=0)
    other = evaluate.run(narrow, tok, _cfg(spec, agreement_pairs=40), "cpu", base_model=model)["accuracy"]["agreement"][spec]
    assert other["mean_cosine"] is None and other["spearman"] is not None


def test_explicit_agreement_on_a_causal_lm(tiny_llama, sentence_file):
    model, tok = tiny_llama
    cfg = EvalConfig(agreement=[str(sentence_file)], seq_len=64, agreement_pairs=16, speed=False)
    out = evaluate.run(model, tok, cfg, "cpu")["accuracy"]
    assert list(out) == ["agreement"] and out["agreement"][str(sentence_file)]["spearman"] == pytest.approx(1.0)


def test_agreement_of_identical_pairs_is_undefined(tiny_llama, text_file):
    model, tok = tiny_llama  # the text_file fixture repeats two sentences: every pair has the same cosine
    cfg = EvalConfig(agreement=[str(text_file)], seq_len=64, agreement_pairs=4, speed=False)
    out = evaluate.run(model, tok, cfg, "cpu")["accuracy"]["agreement"][str(text_file)]
    assert out["spearman"] is None and out["mean_cosine"] == pytest.approx(1.0)


def test_lm_eval_missing_is_a_compress_error(tiny_llama, text_file, monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    cfg = EvalConfig(tasks=["hellaswag"], limit=2, speed=False)
    with pytest.raises(CompressError, match=r"eval tasks need lm-eval: pip install 'compress\[eval\]'"):
        evaluate.run(model, tok, cfg, "cpu")


def test_task_names_from_local_yaml(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mine.yaml").write_text("task: my_task\ndataset_path: json\nprocess_docs: !function utils.process\n")
    (d / "_template.yaml").write_text("output_type: multiple_choice\n")
    names, include = evaluate.task_names([str(d), "hellaswag"])
    assert names == ["my_task", "hellaswag"] and include == [str(d.resolve())]
    assert evaluate.task_names([str(d / "mine.yaml")]) == (["my_task"], [str(d.resolve())])
    with pytest.raises(CompressError, match="no lm-eval task"):
        evaluate.task_names([str(d / "_template.yaml")])


@pytest.mark.parametrize("kw, key", [
    (dict(seq_len=1), "seq_len"), (dict(max_tokens=10), "max_tokens"), (dict(stride=1000), "stride"),
    (dict(stride=0), "stride"), (dict(batch_size=0), "batch_size"), (dict(perplexity=[3]), "perplexity"),
    (dict(perplexity=["zoo:nope"]), "zoo:nope"), (dict(bos="yes"), "bos"), (dict(limit=0), "limit"),
])
def test_config_checks_name_the_key(kw, key):
    with pytest.raises(CompressError, match=key):
        EvalConfig(**kw)


def test_config_from_dict():
    cfg = EvalConfig.from_dict({"perplexity": "zoo:austen", "seq_len": 128})
    assert cfg.perplexity == ["zoo:austen"] and cfg.max_tokens == 20480
    with pytest.raises(CompressError, match="unknown eval key.*seqlen.*valid:"):
        EvalConfig.from_dict({"seqlen": 128})


# ----------------------------------------------------------------------------- slow: lm-eval and real models


@pytest.mark.slow
def test_lm_eval_local_task_on_tiny_llama(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'compress[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"question": f"Question {i}:", "choices": [" yes", " no", " maybe"], "answer": i % 3} for i in range(4)]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "facts.yaml").write_text(
        "task: compress_facts\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'facts.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
    )
    model, tok = tiny_llama
    out = evaluate.run(model, tok, EvalConfig(tasks=[str(tasks)], limit=3, speed=False), "cpu")["accuracy"]["tasks"]
    entry = out["compress_facts"]
    assert 0.0 <= entry["metrics"]["acc,none"] <= 1.0
    assert entry["protocol"]["n_samples"] == 3 and entry["protocol"]["limit"] == 3


def _zoo(monkeypatch, name):
    """Point the zoo at the user's fetched one (read only); skip with the fetch command when absent."""
    monkeypatch.setenv("COMPRESS_ZOO", str(USER_ZOO))
    if not zoo.is_installed(name) or (name == "smollm2-135m" and not (USER_ZOO / name / "model.safetensors").is_file()):
        pytest.skip(f"zoo:{name} not fetched: run `compress zoo fetch {name}`")


@pytest.mark.slow
def test_smollm2_perplexity_is_sane_and_repeatable(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _zoo(monkeypatch, "smollm2-135m")
    _zoo(monkeypatch, "austen")
    folder = zoo.model_path("smollm2-135m")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    cfg = EvalConfig(perplexity=["zoo:austen"], seq_len=256, max_tokens=1024, decode_tokens=8)
    a = evaluate.run(model, tok, cfg, "cpu")
    b = evaluate.run(model, tok, cfg, "cpu")
    pa, pb = a["accuracy"]["perplexity"]["zoo:austen"], b["accuracy"]["perplexity"]["zoo:austen"]
    assert pa == pb
    assert 5 < pa["value"] < 60, pa  # a real 135M model on Austen; a random one scores ~49152
    assert a["speed"]["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_minilm_agreement_with_itself_and_a_perturbed_copy(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    _zoo(monkeypatch, "minilm-l6")
    _zoo(monkeypatch, "austen")
    folder = zoo.model_path("minilm-l6")
    model, tok = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    cfg = EvalConfig(perplexity=["zoo:austen"], seq_len=128, agreement_pairs=64, speed=False)
    same = evaluate.run(model, tok, cfg, "cpu")["accuracy"]["agreement"]["zoo:austen"]
    assert same["spearman"] == pytest.approx(1.0) and same["mean_cosine"] == pytest.approx(1.0)
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    vs = evaluate.run(noisy, tok, cfg, "cpu", base_model=model)["accuracy"]["agreement"]["zoo:austen"]
    assert 0.0 < vs["spearman"] < 0.999 and vs["mean_cosine"] < 0.999


def test_kl_and_top1_against_a_reference(tiny_llama, text_file):
    """KL(base || model) and top-1 agreement over the perplexity windows: 0 and 100% for the model itself (and for
    an identical copy, through a second forward); positive and below 100% for a perturbed copy; perplexity is
    the same number whether or not it is compared."""
    import copy

    model, tok = tiny_llama
    cfg = evaluate.EvalConfig(perplexity=[str(text_file)], seq_len=64, max_tokens=512, speed=False)
    alone = evaluate.perplexity(model, tok, str(text_file), cfg, "cpu")
    self_ = evaluate.perplexity(model, tok, str(text_file), cfg, "cpu", reference=model)
    twin = evaluate.perplexity(model, tok, str(text_file), cfg, "cpu", reference=copy.deepcopy(model))
    assert self_["value"] == alone["value"] and "kl" not in alone
    assert self_["kl"] == 0.0 and self_["top1"] == 1.0 and self_["protocol"]["reference"] == "self"
    assert abs(twin["kl"]) < 1e-6 and twin["top1"] == 1.0 and twin["protocol"]["reference"] == "base"
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    far = evaluate.perplexity(noisy, tok, str(text_file), cfg, "cpu", reference=model)
    assert far["kl"] > 1e-3 and far["top1"] < 1.0
    # the definition, by hand on one window
    ref, out = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    scored = torch.tensor([[False, True, True, False, True]])
    kl, agree, n = evaluate.divergence(ref, out, scored)
    p, q = ref[0, :-1].log_softmax(-1), out[0, :-1].log_softmax(-1)
    rows = scored[0, 1:]
    assert n == 3 and kl == pytest.approx(float((p.exp() * (p - q)).sum(-1)[rows].sum()), rel=1e-5)
    assert agree == int((p.argmax(-1) == q.argmax(-1))[rows].sum())
