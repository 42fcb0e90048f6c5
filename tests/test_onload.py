"""Sequential onloading: a model run one block at a time gives the whole-model forward's logits, bit for bit, on
every family (and on a GPTQ model), and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch

from compress import onload
from compress.context import Context

from conftest import REPO


def _batches(n=3, b=2, t=20):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen3-moe", "gpt-neox", "falcon", "phi", "olmo2", "opt"])
def test_block_by_block_logits_equal_the_whole_forward(name):
    from compress.tiny import build

    model, _ = build(REPO / "configs" / "models" / f"tiny-{name}.json", seed=0)
    model.eval()
    batches = _batches()
    with torch.no_grad():
        whole = [model(input_ids=x, use_cache=False).logits for x in batches]
    got = dict(onload.logits_by_block(model, batches, "cpu"))
    assert sorted(got) == [0, 1, 2]
    assert all(torch.equal(got[b], whole[b]) for b in got), name
    with torch.no_grad():  # the block list is back in place
        assert torch.equal(model(input_ids=batches[0], use_cache=False).logits, whole[0])


def test_block_by_block_on_a_gptq_model_drops_its_caches(tiny_llama, tmp_path):
    from compress.stages import gptq

    model, tok = tiny_llama
    model, _ = gptq.run(model, tok, gptq.Config(method="rtn", group_size=32), Context.for_tests(tmp_path))
    batches = _batches(n=2)
    with torch.no_grad():
        whole = [model(input_ids=x, use_cache=False).logits for x in batches]
    for m in model.modules():
        if hasattr(m, "clear_cache"):
            m.clear_cache()
    got = dict(onload.logits_by_block(model, batches, "cpu"))
    assert all(torch.equal(got[b], whole[b]) for b in got)
    assert all(m._cached is None for m in model.modules() if hasattr(m, "clear_cache"))  # nothing kept resident


def test_onloaded_perplexity_and_kl_equal_the_whole_model(tiny_llama, text_file):
    import copy

    from compress import evaluate

    model, tok = tiny_llama
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cfg = evaluate.EvalConfig(perplexity=[str(text_file)], seq_len=64, max_tokens=512, batch_size=3, speed=False)
    whole = evaluate.perplexity(noisy, tok, str(text_file), cfg, "cpu", reference=model)
    blocks = evaluate.perplexity(noisy, tok, str(text_file), cfg, "cpu", reference=model, onload=True)
    assert (blocks["value"], blocks["kl"], blocks["top1"]) == (whole["value"], whole["kl"], whole["top1"])


def _pipeline(tmp_path, folder, text_file, offload: str, name: str):
    from conftest import write_pipeline

    return write_pipeline(tmp_path, f"""
name: {name}
model: {folder}
offload: {offload}
eval: {{perplexity: [{text_file}], seq_len: 64, max_tokens: 256, speed: false}}
stages:
  - eval: {{perplexity: [{text_file}], seq_len: 64, max_tokens: 256, speed: false, batch_size: 2}}
""", f"{name}.yaml")


def test_offload_always_gives_the_numbers_of_a_whole_model_run(tmp_path, tiny_llama, text_file):
    """The base is evaluated in place (no copy of a model bigger than the device) and every number is the one a
    whole-model run gives."""
    from compress import checkpoint, config, manifest, pipeline

    model, tok = tiny_llama
    checkpoint.save(model, tok, tmp_path / "model")
    runs = {}
    for offload in ("never", "always"):
        p = _pipeline(tmp_path, tmp_path / "model", text_file, offload, offload)
        pipeline.run(config.load(p), out_root=tmp_path / "runs", log=lambda m: None, quiet=True)
        runs[offload] = [manifest.read(tmp_path / "runs" / offload / f) for f in ("00-base", "01-eval")]
    for whole, onl in zip(runs["never"], runs["always"]):
        assert whole["accuracy"] == onl["accuracy"]
    assert list((tmp_path / "runs" / "never" / "00-base").glob("*.safetensors"))
    assert not list((tmp_path / "runs" / "always" / "00-base").glob("*.safetensors"))
    assert runs["always"][0]["checkpoint"] == str(tmp_path / "model") and runs["always"][0]["stats"]["copied"] is False
    again = pipeline.run(config.load(tmp_path / "always.yaml"), out_root=tmp_path / "runs", log=lambda m: None,
                         quiet=True)
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_every_block_gets_its_own_mask_and_rotary_table():
    """Gemma 3's sliding and full layers get different masks and rotary tables: what block walkers (GPTQ,
    onloading) must pass each block, not block 0's."""
    from compress.modeling import capture_block_inputs
    from compress.tiny import build

    model, _ = build(REPO / "configs" / "models" / "tiny-gemma3.json", seed=0)
    captured = capture_block_inputs(model, _batches(n=1, t=40), "cpu")[0]
    types = model.config.layer_types
    full, sliding = types.index("full_attention"), types.index("sliding_attention")
    rope = [kw["position_embeddings"][0] for _, kw in captured["args"]]
    assert not torch.equal(rope[full], rope[sliding])
    assert all(rope[i] is rope[sliding] for i, t in enumerate(types) if t == "sliding_attention")  # shared, not copied


def _gptq_pipeline(tmp_path, folder, text_file, offload: str):
    from conftest import write_pipeline

    return write_pipeline(tmp_path, f"""
name: q-{offload}
model: {folder}
offload: {offload}
data: {{calibration: {text_file}}}
eval: {{perplexity: [{text_file}], seq_len: 64, max_tokens: 256, speed: false}}
stages:
  - gptq: {{bits: 4, group_size: 32, nsamples: 4, seq_len: 64}}
""", f"q-{offload}.yaml")


def test_onloaded_gptq_writes_the_codes_of_a_whole_model_run(tmp_path, tiny_llama, text_file):
    """offload: always quantizes from the memory-mapped input one block at a time: the same checkpoint, tensor for
    tensor, and the same numbers as a whole-model run."""
    from safetensors.torch import load_file

    from compress import checkpoint, config, manifest, pipeline

    model, tok = tiny_llama
    checkpoint.save(model, tok, tmp_path / "model")
    runs = {}
    for offload in ("never", "always"):
        pipeline.run(config.load(_gptq_pipeline(tmp_path, tmp_path / "model", text_file, offload)),
                     out_root=tmp_path / "runs", log=lambda m: None, quiet=True)
        runs[offload] = tmp_path / "runs" / f"q-{offload}" / "01-gptq"
    whole, onl = (load_file(runs[k] / "model.safetensors") for k in ("never", "always"))
    assert sorted(whole) == sorted(onl) and any(k.endswith("qweight") for k in whole)
    assert all(torch.equal(whole[k], onl[k]) for k in whole)
    a, b = manifest.read(runs["never"]), manifest.read(runs["always"])
    assert a["accuracy"] == b["accuracy"]
    configs = [json.loads((runs[k] / "config.json").read_text()) for k in ("never", "always")]
    for c in configs:
        c.pop("_name_or_path")  # the input's path: 00-base (a copy) or the model folder itself (onloaded)
    assert configs[0] == configs[1]


@pytest.mark.parametrize("stage", ["cast: {dtype: bfloat16}", "gptq: {method: rtn, group_size: 32}",
                                   "int8: {calibration_samples: 2, seq_len: 32, threshold: 0.5}"])
def test_onloaded_cast_rtn_and_int8_write_the_tensors_of_a_whole_model_run(tmp_path, stage, text_file, monkeypatch):
    """cast, RTN and LLM.int8() from the memory-mapped input, a block at a time, each block spilled to the
    scratch folder: the checkpoint of a whole-model run, tensor for tensor, tied embeddings kept tied (Gemma 3
    ties them), and the same stats (int8: outlier columns counted through the block-by-block forward)."""
    from compress import manifest
    from safetensors.torch import load_file

    from compress import checkpoint, config, pipeline
    from compress.tiny import build
    from conftest import write_pipeline

    spilled = []
    real_spill = onload.spill
    monkeypatch.setattr(onload, "spill", lambda mods, path, **kw: (spilled.append(path), real_spill(mods, path, **kw)))
    model, tok = build(REPO / "configs" / "models" / "tiny-gemma3.json", seed=0)
    assert model.config.tie_word_embeddings
    checkpoint.save(model, tok, tmp_path / "model")
    out, stats = {}, {}
    for offload in ("never", "always"):
        p = write_pipeline(tmp_path, f"""
name: s-{offload}
model: {tmp_path / "model"}
offload: {offload}
data: {{calibration: {text_file}}}
eval: {{perplexity: [{text_file}], seq_len: 64, max_tokens: 128, speed: false}}
stages:
  - {stage}
""", f"s-{offload}.yaml")
        res = pipeline.run(config.load(p), out_root=tmp_path / "runs", log=lambda m: None, quiet=True)
        assert [r.status for r in res] == ["done", "done"]
        folder = next((tmp_path / "runs" / f"s-{offload}").glob("01-*"))
        out[offload] = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        stats[offload] = manifest.read(folder)["stats"]
        assert bool(spilled) == (offload == "always")  # the onloaded run wrote its blocks to disk as it went
    whole, onl = out["never"], out["always"]
    assert sorted(whole) == sorted(onl) and "lm_head.weight" not in onl
    assert all(torch.equal(whole[k], onl[k]) and whole[k].dtype == onl[k].dtype for k in whole)
    assert onl["model.embed_tokens.weight"].dtype == torch.bfloat16
    if stage.startswith("int8"):
        assert stats["always"]["outliers"]["total_outlier_dims"] > 0
    drop = lambda st: {k: v for k, v in st.items() if k not in ("layers", "seconds")}  # noqa: E731  (timings)
    assert drop(stats["never"]) == drop(stats["always"])


def test_spill_holds_parameters_as_views_of_the_file_and_keeps_ties(tmp_path):
    from torch import nn

    emb, head = nn.Embedding(64, 8), nn.Linear(8, 64, bias=False)
    head.weight = emb.weight
    before = emb.weight.detach().clone()
    onload.spill([emb, head], tmp_path / "s.safetensors", parameters=True)
    assert head.weight is emb.weight and torch.equal(emb.weight, before)
    assert isinstance(emb.weight, nn.Parameter)
    assert (tmp_path / "s.safetensors").stat().st_size < 2 * before.numel() * 4  # written once


def test_a_model_over_the_memory_budget_runs_onloaded(tmp_path, text_file):
    """With a budget below what the whole-model gptq step needs (and below the model's own weights plus the
    process), offload: never is refused before any work and offload: always runs."""
    from compress import checkpoint, config, memory, pipeline, planner, sources
    from compress.errors import CompressError
    from compress.tiny import build

    wide = json.loads((REPO / "configs" / "models" / "tiny-llama.json").read_text())
    wide.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64)  # 84 MB of float32 weights: more than what the onloaded run needs
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    model, tok = build(tmp_path / "wide.json", seed=0)
    checkpoint.save(model, tok, tmp_path / "model")
    pipe = config.load(_gptq_pipeline(tmp_path, tmp_path / "model", text_file, "always"))
    cfg = sources.resolve(str(tmp_path / "model"), weights=False).config
    onl = planner.plan(pipe, cfg, "cpu", offload="always")
    whole = planner.plan(pipe, cfg, "cpu", offload="never")
    budget = max(max(p.peak_bytes, p.eval_peak_bytes or 0) for p in onl)
    assert onl[1].onload and budget < whole[1].peak_bytes
    assert budget < memory.describe(cfg).params * 4 + planner.overhead("cpu")
    never = config.load(_gptq_pipeline(tmp_path, tmp_path / "model", text_file, "never"))
    with pytest.raises(CompressError, match="predicted not to fit"):
        pipeline.run(never, out_root=tmp_path / "runs", log=lambda m: None, quiet=True, memory_budget=budget)
    assert not (tmp_path / "runs" / "q-never").exists()
    res = pipeline.run(pipe, out_root=tmp_path / "runs", log=lambda m: None, quiet=True, memory_budget=budget)
    assert [r.status for r in res] == ["done", "done"]
    assert (tmp_path / "runs" / "q-always" / "01-gptq" / "model.safetensors").is_file()


def test_planner_splits_an_onloaded_gptq_step_between_host_and_device():
    """A Llama-shaped config on a GPU, by hand: the device holds one block in fp32 and its working set (no input
    weights), the host one block in transit and its packed form (spilled to disk after), and the float16
    embeddings and head."""
    from compress import memory, planner
    from compress.stages import gptq

    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "tie_word_embeddings": False, "torch_dtype": "float32"}
    state = planner.initial_state(cfg)
    qcfg = gptq.Config(bits=4, group_size=128, nsamples=8, seq_len=128, batch_size=1)
    p = planner.predict_stage(gptq, qcfg, state, device="h100-80gb", onload=True)
    d, ffn, kv, L, V = 256, 512, 128, 4, 1024
    linears = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)]  # (in, out): q k v o gate up down
    block = sum(i * o for i, o in linears) + 2 * d                                 # + two RMSNorm weights
    packed = sum(i * o // 2 + (i // 128) * o * 2 + (i // 128) * o // 2 + i * 4 for i, o in linears)  # one block
    assert p.breakdown["input weights"] == 0
    assert p.breakdown["the block in fp32"] == block * 4
    assert p.host_breakdown["packed block (then spilled to disk)"] == packed
    assert p.host_breakdown["unquantized weights in float16"] == (2 * V * d + (2 * L + 1) * d) * 2
    assert p.host_breakdown["one block in transit"] == (L * block + d) * 4 // L  # the final norm shared out
    assert p.host_peak_bytes == sum(p.host_breakdown.values())
    assert p.peak_bytes == sum(v for k, v in p.breakdown.items() if k != "notes")
    whole = planner.predict_stage(gptq, qcfg, state, device="h100-80gb", onload=False)
    assert whole.breakdown["input weights"] == state.weights_bytes() and whole.host_peak_bytes is None


def test_planner_onloaded_rtn_and_cast_hold_one_block():
    """RTN onloaded never moves the embeddings to the device (no calibration); an onloaded cast holds one block
    and its cast on the host, nothing on the device; on a CPU, no input weights resident."""
    from compress import memory, planner
    from compress.errors import CompressError
    from compress.stages import cast, gptq, int8

    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "tie_word_embeddings": False, "torch_dtype": "float32"}
    state = planner.initial_state(cfg)
    rtn = planner.predict_stage(gptq, gptq.Config(method="rtn"), state, device="h100-80gb", onload=True)
    assert "embeddings and head on the device" not in rtn.breakdown and rtn.breakdown["input weights"] == 0
    assert rtn.host_breakdown["one block in transit"] == memory.block_bytes(state)
    block = memory.block_bytes(state)
    c = planner.predict_stage(cast, cast.Config(dtype="bfloat16"), state, device="cpu", onload=True)
    assert c.breakdown["input weights"] == 0
    assert c.breakdown["one block's weights paged in"] == block
    assert c.breakdown["one block in bfloat16 (then spilled to disk)"] == block // 2
    gpu = planner.predict_stage(cast, cast.Config(dtype="bfloat16"), state, device="h100-80gb", onload=True)
    assert gpu.host_peak_bytes - planner.overhead("cpu") == block + block // 2
    whole = planner.predict_stage(cast, cast.Config(dtype="bfloat16"), state, device="cpu", onload=False)
    assert whole.peak_bytes > c.peak_bytes
    same = planner.predict_stage(cast, cast.Config(dtype="float32"), state, device="h100-80gb", onload=True)
    assert same.breakdown["input weights"] == 0 and same.growth_bytes == 0  # nothing to cast, nothing resident
    q = planner.predict_stage(int8, int8.Config(calibration_samples=0), state, device="cpu", onload=True)
    linears = 256 * 256 * 2 + 256 * 128 * 2 + 256 * 512 * 3
    assert q.breakdown["input weights"] == 0 and q.breakdown["one block's weights paged in"] == block
    assert q.breakdown["int8 block (then spilled to disk)"] == linears + 4 * (256 * 2 + 128 * 2 + 512 * 2 + 256)
    with pytest.raises(CompressError, match="runs on a CPU only"):
        planner.predict_stage(int8, int8.Config(), state, device="h100-80gb", onload=True)
