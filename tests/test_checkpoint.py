"""Checkpoint folders and model sources: formats detected from config.json, pickles refused, a faithful save
proven by reloading it, corrupt files named, and every model spec resolved once into a Source."""

from __future__ import annotations

import pytest
import torch

from compress import checkpoint, config, pipeline, sources
from compress.context import Context
from compress.errors import CompressError

from conftest import TINY_LLAMA, write_pipeline


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_llama):
    model, tok = tiny_llama
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a legacy pickled checkpoint
    tok.save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(CompressError, match="pickled weights"):
        checkpoint.load(folder)
    p = write_pipeline(tmp_path, f"name: pk\nmodel: {folder}\nallow_pickle: true\nstages: [cast]\n")
    res = pipeline.run(config.load(p), out_root=tmp_path / "runs", log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["done", "done"]
    assert list((tmp_path / "runs" / "pk" / "00-base").glob("*.safetensors"))



def test_round_trip_catches_an_unfaithful_save(tmp_path, tiny_llama, monkeypatch):
    model, tok = tiny_llama
    folder = tmp_path / "ck"
    checkpoint.save(model, tok, folder)
    assert checkpoint.round_trip(model, folder, "cpu")[0]["max_rel_error"] == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # the in-memory model no longer matches the files
    with pytest.raises(CompressError, match="round-trip check failed"):
        checkpoint.round_trip(model, folder, "cpu")



def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_llama):
    model, tok = tiny_llama
    folder = tmp_path / "ck"
    checkpoint.save(model, tok, folder)
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CompressError, match="cannot load checkpoint"):
        checkpoint.load(folder)



def test_round_trip_returns_the_reloaded_model_as_a_fresh_load(tmp_path, tiny_llama):
    """The pipeline evaluates the model the round trip reloaded: same outputs as a fresh load, no caches left."""
    from compress.stages import gptq

    model, tok = tiny_llama
    model, _ = gptq.run(model, tok, gptq.Config(method="rtn", bits=4, group_size=32), Context.for_tests(tmp_path))
    folder = tmp_path / "q"
    checkpoint.save(model, tok, folder)
    record, reloaded = checkpoint.round_trip(model, folder, "cpu")
    assert record["format"] == "gptq" and record["max_rel_error"] <= record["tolerance"]
    quant = [m for m in reloaded.modules() if hasattr(m, "clear_cache")]
    assert quant and all(m._cached is None for m in quant)              # the check's forward cached nothing
    fresh, _ = checkpoint.load(folder)
    ids = checkpoint.probe_input(model)
    assert torch.equal(checkpoint.outputs(reloaded, ids), checkpoint.outputs(fresh, ids))


def test_format_is_read_from_the_config():
    assert checkpoint.format_of({}) == "plain"
    assert checkpoint.format_of({"quantization_config": {"quant_method": "gptq"}}) == "gptq"
    assert checkpoint.format_of({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}) \
        == "bnb-int8"
    with pytest.raises(CompressError, match="unsupported quantization_config.quant_method 'awq'"):
        checkpoint.format_of({"quantization_config": {"quant_method": "awq"}})


def test_content_hash_sees_every_byte_but_not_the_manifest(tmp_path, tiny_llama):
    model, tok = tiny_llama
    folder = tmp_path / "ck"
    checkpoint.save(model, tok, folder)
    h = checkpoint.content_hash(folder)
    (folder / "manifest.json").write_text("{}")
    assert checkpoint.content_hash(folder) == h
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert checkpoint.content_hash(folder) != h


def test_sources_resolve_each_kind_once_or_say_why_not(tmp_path, tiny_llama):
    tiny = sources.resolve(f"tiny:{TINY_LLAMA}", seed=3)
    assert tiny.tiny and tiny.config["model_type"] == "llama" and tiny.hash == tiny.hash
    assert tiny.hash != sources.resolve(f"tiny:{TINY_LLAMA}", seed=4).hash     # the seed is part of the model
    model, _ = tiny.load()
    again, _ = sources.resolve(f"tiny:{TINY_LLAMA}", seed=3).load()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    m, tok = tiny_llama
    checkpoint.save(m, tok, tmp_path / "folder")
    folder = sources.resolve(str(tmp_path / "folder"))
    assert not folder.tiny and folder.hash == checkpoint.content_hash(tmp_path / "folder")
    for spec, message in [("tiny:nowhere.json", "tiny config nowhere.json not found"),
                          ("zoo:nothing", "not a zoo model"),
                          (str(TINY_LLAMA), "is a file"),
                          ("not a spec", "neither a local folder nor a Hugging Face hub id")]:
        with pytest.raises(CompressError, match=message):
            sources.resolve(spec)


def test_pipeline_resolves_its_model_once(tmp_path, monkeypatch):
    calls = []
    real = sources.resolve
    monkeypatch.setattr(sources, "resolve", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = write_pipeline(tmp_path, f"name: once\nmodel: tiny:{TINY_LLAMA}\nstages: [cast]\n")
    pipeline.run(config.load(p), out_root=tmp_path / "runs", log=lambda m: None, quiet=True)
    assert len(calls) == 1
