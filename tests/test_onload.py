"""Sequential onloading: a model run one block at a time gives the whole-model forward's logits, bit for bit, on
every family (and on a GPTQ model), and leaves the model as it was."""

from __future__ import annotations

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
