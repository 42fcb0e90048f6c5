"""The spine: YAML -> validated pipeline -> stages -> checkpoints + manifests, resume, branches, evaluation.
(The command line's own checks are in test_cli.py, checkpoint formats in test_checkpoint.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from compress import checkpoint, config, manifest, pipeline

from conftest import SMOKE, TINY_LLAMA, cli, write_pipeline


def test_end_to_end_run_writes_base_and_stages(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    out = tmp_path / "runs"
    r = cli("run", str(p), "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    run = out / "smoke"
    assert (run / "pipeline.yaml").is_file()
    for folder in ("00-base", "01-cast", "02-fp16"):
        m = manifest.read(run / folder)
        assert m is not None and m["folder"] == folder
        assert (run / folder / "model.safetensors").is_file()
        assert (run / folder / "tokenizer.json").is_file()
        for key in ("stage", "index", "config", "input", "format", "size", "memory", "seconds", "env", "round_trip"):
            assert key in m
        assert m["round_trip"]["max_rel_error"] <= m["round_trip"]["tolerance"]
        assert {"python", "torch", "transformers", "device", "git_commit"} <= set(m["env"])
    assert "01-cast" in r.output and "02-fp16" in r.output
    # nothing half-done is left behind
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".work-*"))



def test_cast_halves_disk_size_and_keeps_logits(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    base = manifest.read(tmp_path / "smoke" / "00-base")
    bf16 = manifest.read(tmp_path / "smoke" / "01-cast")
    ratio = bf16["size"]["disk_bytes"] / base["size"]["disk_bytes"]
    assert 0.49 < ratio < 0.52
    assert bf16["size"]["params"] == base["size"]["params"]
    assert bf16["memory"]["weights_bytes"] * 2 == pytest.approx(base["memory"]["weights_bytes"], rel=0.01)
    m32, _ = checkpoint.load(tmp_path / "smoke" / "00-base")
    m16, _ = checkpoint.load(tmp_path / "smoke" / "01-cast")
    assert next(m16.parameters()).dtype == torch.bfloat16
    ids = checkpoint.probe_input(m32)
    assert checkpoint.max_rel_error(checkpoint.outputs(m32, ids), checkpoint.outputs(m16, ids)) < 0.05



def test_rerun_skips_every_stage_and_force_redoes(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    pipe = config.load(p)
    first = pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in first] == ["done"] * 3
    second = pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in second] == ["skipped"] * 3
    r = cli("run", str(p), "--out", str(tmp_path), "-q")
    assert r.output.count("skipped") >= 3
    forced = pipeline.run(pipe, out_root=tmp_path, force=True, log=lambda m: None, quiet=True)
    assert [r.status for r in forced] == ["done"] * 3



def test_until_stops_after_a_stage_and_a_rerun_goes_on(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    pipe = config.load(p)
    first = pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True, until="cast")
    assert [r.folder for r in first] == ["00-base", "01-cast"]
    assert not (tmp_path / "smoke" / "02-fp16").exists()
    r = cli("run", str(p), "--out", str(tmp_path), "-q", "--until", "02-fp16")
    assert r.exit_code == 0 and "[02-fp16] done" in r.output and r.output.count("skipped") >= 2
    assert manifest.read(tmp_path / "smoke" / "02-fp16")["complete"]
    bad = cli("run", str(p), "--out", str(tmp_path), "--until", "gptq")
    assert bad.exit_code != 0 and "no stage of that name" in bad.output and "base, cast, fp16" in bad.output



def test_changed_config_redoes_that_stage_and_its_dependants_only(tmp_path):
    body = SMOKE + "  - cast: {dtype: float32, name: back}\n"
    p = write_pipeline(tmp_path, body)
    pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    p2 = write_pipeline(tmp_path, body.replace("{dtype: float16, from: base, name: fp16}",
                                               "{dtype: bfloat16, from: base, name: fp16}"))
    res = pipeline.run(config.load(p2), out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["skipped", "skipped", "done", "done"]



def test_branch_from_base_and_from_named_stage(tmp_path):
    body = SMOKE + "  - cast: {dtype: float32, from: cast, name: back}\n"
    p = write_pipeline(tmp_path, body)
    pipe = config.load(p)
    assert [s.source for s in pipe.stages] == ["base", "base", "cast"]
    pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    back = manifest.read(tmp_path / "smoke" / "03-back")
    cast = manifest.read(tmp_path / "smoke" / "01-cast")
    assert back["input"]["hash"] == cast["output_hash"]
    assert back["input"]["from"] == "cast"
    fp16 = manifest.read(tmp_path / "smoke" / "02-fp16")
    base = manifest.read(tmp_path / "smoke" / "00-base")
    assert fp16["input"]["hash"] == base["output_hash"]



def test_from_by_index(tmp_path):
    p = write_pipeline(tmp_path, SMOKE + "  - cast: {dtype: float32, from: 1}\n")
    assert config.load(p).stages[-1].source == "cast"



def test_include_preset_with_local_override(tmp_path):
    (tmp_path / "preset.yaml").write_text("dtype: float16\n")
    p = write_pipeline(tmp_path, f"""
    model: tiny:{TINY_LLAMA}
    stages:
      - cast: {{include: preset.yaml}}
      - cast: {{include: preset.yaml, dtype: bfloat16}}
      - cast: {{include: stages/cast-fp16.yaml}}
    """)
    pipe = config.load(p)
    assert [s.config.dtype for s in pipe.stages] == ["float16", "bfloat16", "float16"]
    assert pipe.name == "p"  # defaults to the file's stem



def test_exception_midway_keeps_earlier_stages_and_rerun_redoes_it(tmp_path, monkeypatch):
    p = write_pipeline(tmp_path, SMOKE)
    pipe = config.load(p)
    from compress.stages import cast

    real = cast.run
    calls = {"n": 0}

    def flaky(model, tok, cfg, ctx):
        calls["n"] += 1
        if cfg.dtype == "float16" and calls["n"] == 2:
            raise RuntimeError("boom")
        return real(model, tok, cfg, ctx)

    monkeypatch.setattr(cast, "run", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    run = tmp_path / "smoke"
    assert manifest.read(run / "01-cast") is not None
    assert not (run / "02-fp16").exists()
    res = pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["skipped", "skipped", "done"]



KILLER = """
import os, signal, sys
from compress import config, pipeline
from compress.stages import cast
real = cast.run
def run(model, tok, cfg, ctx):
    if cfg.dtype == "float16" and os.environ.get("KILL_AT") == "stage":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, tok, cfg, ctx)
cast.run = run
import compress.checkpoint as ck
real_rt = ck.check_reload
def rt(folder, *a, **k):
    if "fp16" in folder.name and os.environ.get("KILL_AT") == "save":
        os.kill(os.getpid(), signal.SIGKILL)  # after the weights are written, before the manifest
    return real_rt(folder, *a, **k)
ck.check_reload = rt
pipeline.run(config.load(sys.argv[1]), out_root=sys.argv[2], log=lambda m: None, quiet=True)
"""



@pytest.mark.parametrize("where", ["stage", "save"])
def test_sigkill_midway_leaves_nothing_complete_and_rerun_recovers(tmp_path, where):
    p = write_pipeline(tmp_path, SMOKE)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_AT": where, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(p), str(tmp_path)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "smoke"
    assert manifest.read(run / "01-cast") is not None
    assert manifest.read(run / "02-fp16") is None and not (run / "02-fp16").exists()
    res = pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["skipped", "skipped", "done"]
    assert not list(run.glob(".tmp-*"))



def test_corrupt_manifest_counts_as_unfinished(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    pipe = config.load(p)
    pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    (tmp_path / "smoke" / "01-cast" / "manifest.json").write_text("{ half a manif")
    res = pipeline.run(pipe, out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["skipped", "done", "skipped"]



def eval_pipeline(tmp_path, text_file, extra_stages="", max_tokens=2048):
    return write_pipeline(tmp_path, f"""
    name: ev
    model: tiny:{TINY_LLAMA}
    eval: {{perplexity: ["{text_file}"], seq_len: 64, max_tokens: {max_tokens}, decode_tokens: 4}}
    stages:
      - cast: {{dtype: bfloat16}}
    {extra_stages}
    """)



def test_eval_block_scores_base_and_every_stage_with_protocol(tmp_path, text_file):
    p = eval_pipeline(tmp_path, text_file)
    res = pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    base, cast = (r.manifest for r in res)
    for m in (base, cast):
        ppl = m["accuracy"]["perplexity"][str(text_file)]
        assert ppl["value"] > 1 and ppl["protocol"]["seq_len"] == 64 and ppl["protocol"]["split"] == "test"
        assert m["speed"]["eval_tokens_per_s"] > 0 and m["speed"]["decode_tokens_per_s"] > 0
        assert m["memory"]["eval_measured_peak_bytes"] is not None
    # a random tiny model in bf16 scores close to its fp32 self
    b, c = (m["accuracy"]["perplexity"][str(text_file)]["value"] for m in (base, cast))
    assert abs(c / b - 1) < 0.05



def test_changing_only_eval_reevaluates_without_redoing_stages(tmp_path, text_file):
    pipeline.run(config.load(eval_pipeline(tmp_path, text_file)), out_root=tmp_path, log=lambda m: None, quiet=True)
    before = manifest.read(tmp_path / "ev" / "01-cast")
    p2 = eval_pipeline(tmp_path, text_file, max_tokens=1024)
    res = pipeline.run(config.load(p2), out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in res] == ["re-evaluated", "re-evaluated"]
    after = manifest.read(tmp_path / "ev" / "01-cast")
    assert after["output_hash"] == before["output_hash"] and after["seconds"] == before["seconds"]
    assert after["accuracy"]["perplexity"][str(text_file)]["protocol"]["n_tokens"] < \
        before["accuracy"]["perplexity"][str(text_file)]["protocol"]["n_tokens"]



def test_eval_stage_records_without_copying_weights(tmp_path, text_file):
    extra = f"""  - eval: {{perplexity: ["{text_file}"], seq_len: 32, max_tokens: 512, speed: false}}
      - cast: {{dtype: float32, from: eval, name: back}}
    """
    p = eval_pipeline(tmp_path, text_file, extra_stages=extra)
    res = pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    ev = res[2].manifest
    assert ev["stage"] == "eval" and ev["checkpoint"].endswith("01-cast")
    assert not list((tmp_path / "ev" / "02-eval").glob("*.safetensors"))
    assert ev["accuracy"]["perplexity"][str(text_file)]["protocol"]["seq_len"] == 32
    assert res[3].manifest["input"]["hash"] == res[1].manifest["output_hash"]
    again = pipeline.run(config.load(p), out_root=tmp_path, log=lambda m: None, quiet=True)
    assert [r.status for r in again] == ["skipped"] * 4

