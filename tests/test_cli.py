"""The command line: every user error is one line with exit code 2 and nothing written; help teaches; `plan` and
`run` know every stage in the registry, a throwaway one included, with nothing else to edit."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from click.testing import CliRunner

from compress import manifest, memory
from compress.cli import main
from compress.stages import STAGES

from conftest import REPO, SMOKE, TINY_LLAMA, cli, write_pipeline


BAD = {
    "unknown_stage": ("stages:\n  - squash: {}\n", "unknown stage 'squash'; valid stages: cast, "),
    "unknown_key": ("stages:\n  - cast: {dtyp: bfloat16}\n", "unknown key 'dtyp'; valid keys: dtype"),
    "bad_value": ("stages:\n  - cast: {dtype: int3}\n", "cast.dtype must be one of"),
    "wrong_type": ("stages:\n  - cast: {dtype: 16}\n", "dtype must be a string, got 16"),
    "unknown_top_key": ("stagez: []\n", "unknown key 'stagez'"),
    "bad_seed": ("seed: abc\n", "seed must be an integer"),
    "bad_from": ("stages:\n  - cast: {from: later}\n", "from: 'later' is not base or an earlier stage"),
    "stage_not_mapping": ("stages:\n  - cast: 3\n", "settings must be a mapping"),
}



@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case):
    body, message = BAD[case]
    p = write_pipeline(tmp_path, f"name: bad\nmodel: tiny:{TINY_LLAMA}\n" + body)
    out = tmp_path / "runs"
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: ")
    assert "Traceback" not in r.output
    assert not out.exists()



def test_yaml_syntax_error_names_line_and_column(tmp_path):
    p = write_pipeline(tmp_path, "name: x\nmodel: tiny:a.json\nstages:\n  - cast: {dtype: bfloat16\n")
    r = CliRunner().invoke(main, ["run", str(p)])
    assert r.exit_code == 2
    assert f"{p}:5:1: YAML syntax error" in r.output or f"{p}:4:" in r.output
    assert r.output.count("\n") == 1



def test_missing_model_offline_fails_at_once(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    p = write_pipeline(tmp_path, "name: x\nmodel: nobody/no-such-model\nstages: [cast]\n")
    t0 = time.time()
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2
    assert "nobody/no-such-model" in r.output and "offline" in r.output
    assert time.time() - t0 < 10
    assert not (tmp_path / "runs").exists()



def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    p = write_pipeline(tmp_path, f"name: x\nmodel: {tmp_path / 'empty'}\n")
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "has no config.json" in r.output



def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = write_pipeline(tmp_path, SMOKE)
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(blocker / "sub")])
    assert r.exit_code == 2 and "cannot be written" in r.output



def test_dry_run_validates_without_writing(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    r = CliRunner().invoke(main, ["run", str(p), "--dry-run", "--out", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "01-cast (cast from base)" in r.output
    assert not (tmp_path / "runs").exists()



def test_stages_command_lists_fields_and_docs():
    r = CliRunner().invoke(main, ["stages"])
    assert r.exit_code == 0
    assert "cast:" in r.output and "dtype = 'bfloat16'" in r.output and "float32 | float16 | bfloat16" in r.output



@pytest.mark.parametrize("cmd", [[], ["run"], ["stages"]])
def test_help_teaches_with_an_example(cmd):
    r = CliRunner().invoke(main, cmd + ["--help"])
    assert r.exit_code == 0 and "compress run" in r.output or "compress stages" in r.output



def test_stage_predicted_not_to_fit_is_refused_before_work_unless_forced(tmp_path, monkeypatch):
    from compress import memory

    small = memory.Device("test-device", "cpu", 300 * 2**20)  # below the planner's fixed CPU process overhead
    monkeypatch.setattr(memory, "machine", lambda device: small)
    p = write_pipeline(tmp_path, SMOKE)
    out = tmp_path / "runs"
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(out), "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "predicted not to fit" in r.output and "test-device" in r.output and "--force" in r.output
    assert not out.exists()  # refused before anything was written
    r = cli("run", str(p), "--out", str(out), "-q", "--force")
    assert r.exit_code == 0 and manifest.read(out / "smoke" / "02-fp16") is not None



def test_run_writes_a_report_and_prints_the_table(tmp_path, text_file):
    p = write_pipeline(tmp_path, SMOKE + f"eval: {{perplexity: [{text_file}], seq_len: 32, max_tokens: 256}}\n")
    r = cli("run", str(p), "--out", str(tmp_path / "runs"), "-q")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "smoke"
    assert (run / "report.md").is_file() and (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    head = r.stdout.splitlines()[0].split()
    assert head[:2] == ["stage", "status"] and "ppl" in head
    assert "02-fp16  done" in r.stdout and "(x" in r.stdout  # eval speed relative to the base model



# ------------------------------------------------------------------------------------------ a stage added in one place

SCRATCH_BYTES = 12_345_678


def _throwaway_stage() -> types.ModuleType:
    """A stage module built here, as a user would write compress/stages/<name>.py: NAME, Config, run, and its
    memory model. It halves every norm weight (a visible, checkable change) and predicts a fixed scratch term."""
    mod = types.ModuleType("halve_norms")
    mod.__doc__ = "halve_norms: multiply every norm weight by `factor` (a throwaway stage for tests)."
    mod.NAME = "halve_norms"

    @dataclasses.dataclass
    class Config:
        factor: float = 0.5  # what every norm weight is multiplied by

    def run(model, tokenizer, cfg, ctx):
        n = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.mul_(cfg.factor)
                    n += 1
        return model, {"norms": n}

    def predict_memory(cfg, state, where):
        return memory.Parts({"scratch": SCRATCH_BYTES}, state.weights_bytes(), state)

    mod.Config, mod.run, mod.predict_memory = Config, run, predict_memory
    return mod


def test_a_stage_registered_in_one_place_plans_and_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(STAGES, "halve_norms", _throwaway_stage())
    p = write_pipeline(tmp_path, f"name: h\nmodel: tiny:{TINY_LLAMA}\nstages:\n  - halve_norms: {{factor: 0.25}}\n")
    r = cli("plan", str(p), "--device", "cpu:8GB")
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("01"))
    assert "halve_norms" in row and memory.fmt_bytes(SCRATCH_BYTES) in row and " yes " in row
    r = cli("run", str(p), "--out", str(tmp_path / "runs"), "-q")
    assert r.exit_code == 0, r.output
    m = manifest.read(tmp_path / "runs" / "h" / "01-halve_norms")
    assert m["stats"]["norms"] == 9 and m["config"] == {"factor": 0.25}          # 4 layers x 2 norms + final
    assert m["memory"]["predicted_peak_bytes"] == SCRATCH_BYTES
    assert cli("stages").output.count("halve_norms: multiply every norm weight") == 1
    bad = write_pipeline(tmp_path, f"name: h\nmodel: tiny:{TINY_LLAMA}\nstages:\n  - halve_norms: {{factr: 1}}\n",
                         "bad.yaml")
    r = CliRunner().invoke(main, ["run", str(bad)])
    assert r.exit_code == 2 and "unknown key 'factr'; valid keys: factor" in r.output


# ------------------------------------------------------------------------------------------ the other commands


def test_plan_prints_every_stage_and_exits_1_when_one_does_not_fit(tmp_path):
    p = write_pipeline(tmp_path, SMOKE)
    r = cli("plan", str(p), "--device", "cpu:8GB")
    assert r.exit_code == 0 and [line.split()[1] for line in r.output.splitlines()[2:5]] == ["base", "cast", "cast"]
    r = CliRunner().invoke(main, ["plan", str(p), "--memory", "0.1"])
    assert r.exit_code == 1 and "does not fit" in r.output and "needs" in r.output


def test_eval_command_scores_a_stage_folder(tmp_path, text_file):
    p = write_pipeline(tmp_path, SMOKE)
    assert cli("run", str(p), "--out", str(tmp_path / "runs"), "-q").exit_code == 0
    r = cli("eval", str(tmp_path / "runs" / "smoke" / "01-cast"), "--data", str(text_file), "--seq-len", "32",
            "--max-tokens", "64", "--json")
    result = json.loads(r.output)
    ppl = result["accuracy"]["perplexity"][str(text_file)]
    assert ppl["value"] > 1 and ppl["protocol"]["seq_len"] == 32 and ppl["protocol"]["n_windows"] == 2
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nowhere"), "--data", str(text_file)])
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_zoo_list_names_every_entry():
    from compress import zoo

    r = cli("zoo", "list")
    assert r.exit_code == 0 and all(name in r.output for name in [*zoo.MODELS, *zoo.CORPORA])


def test_plan_fsdp_is_per_gpu_of_n(tmp_path):
    """bench/results/fsdp-plan.md's rows: full fine-tuning of Llama-3-8B (config only) on 80 GB GPUs."""
    p = tmp_path / "8b.yaml"
    p.write_text(f"name: t\nmodel: {REPO / 'configs' / 'models' / 'llama-3-8b'}\n"
                 "stages:\n  - train: {batch_size: 1, seq_len: 2048}\n")
    two = CliRunner().invoke(main, ["plan", str(p), "--device", "h100-80gb", "--fsdp", "2"])
    assert two.exit_code == 1 and "80.12 GiB" in two.output and "does not fit" in two.output
    eight = cli("plan", str(p), "--device", "h100-80gb", "--fsdp", "8")
    assert eight.exit_code == 0 and "35.2" in eight.output.splitlines()[3]


def test_a_missing_corpus_or_package_is_named_before_the_base_is_loaded(tmp_path, monkeypatch):
    from compress import zoo

    monkeypatch.setattr(zoo, "is_installed", lambda name: name != "shakespeare")
    p = write_pipeline(tmp_path, f"name: m\nmodel: tiny:{TINY_LLAMA}\neval: {{perplexity: [zoo:shakespeare]}}\n"
                                 "stages: [cast]\n")
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "zoo:shakespeare is not installed: run `compress zoo fetch shakespeare`" in r.output
    assert not (tmp_path / "runs").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    p = write_pipeline(tmp_path, f"name: m\nmodel: tiny:{TINY_LLAMA}\nstages: [int8]\n", "b.yaml")
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert r.exit_code == 2 and "needs the bitsandbytes package" in r.output
