"""Which stage runs on which model family: measured by running them, on a tiny model of each family.

    rows = support.run_matrix(corpus)          # {family: {stage: "ok" | "refused: <the one-line reason>"}}
    print(support.markdown(rows))              # the README's support table

Every cell runs what a pipeline runs for a stage, on a tiny random model built from configs/models/tiny-*.json:
the memory planner's prediction (where a stage refuses an input before any work), the stage itself, the save,
and the round-trip reload. `chain` is prune -> distill -> gptq. Any exception other than a one-line CompressError
is a bug, and is raised, not recorded. tests/test_families.py runs the matrix and checks it against the
recorded bench/results/families.json, and the README's table against that file; `python bench/families.py`
rewrites both.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from compress import checkpoint, memory, planner
from compress.context import Context
from compress.errors import CompressError
from compress.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "models"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi", "olmo2", "granite", "stablelm",
            "gpt-neox", "falcon", "falcon-40b", "gpt2", "opt", "mixtral", "qwen3-moe", "bert"]
# Small settings: each cell takes about a second on one CPU thread.
SETTINGS = {
    "cast": ("cast", {"dtype": "bfloat16"}),
    "prune": ("prune", {"target": 0.5, "steps": 2, "batch_size": 2, "seq_len": 32, "save_every": 0, "multiple_of": 16}),
    "train": ("train", {"tokens": 128, "batch_size": 2, "seq_len": 32, "save_every": 0, "eval_tokens": 64,
                        "update_every": 1}),
    "distill": ("distill", {"layers": 2, "tokens": 128, "batch_size": 2, "seq_len": 32, "save_every": 0,
                            "eval_tokens": 64}),
    "gptq": ("gptq", {"nsamples": 4, "seq_len": 32, "batch_size": 2, "group_size": 32}),
    "rtn": ("gptq", {"method": "rtn", "group_size": 32}),
    "int8": ("int8", {"calibration_samples": 1, "seq_len": 32}),
    "eval": ("eval", {"seq_len": 32, "max_tokens": 64, "speed": False}),
}
CHAIN = ["prune", "distill", "gptq"]
# the cells' text: what runs does not depend on it (40 short paragraphs, every split gets some)
CORPUS_TEXT = "".join(
    f"Chapter {i}. It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    f"in want of a wife number {i}. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n\n"
    for i in range(40))
COLUMNS = [*SETTINGS, "chain"]


def _config(stage: str, corpus: str):
    kind, values = SETTINGS[stage]
    values = dict(values)
    if kind == "eval":
        values["perplexity"] = [corpus]
    return STAGES[kind], STAGES[kind].Config(**values)


def run_stage(model, tok, stage: str, corpus: str, work: Path, base: Path):
    """Plan, run, save and reload one stage on (a copy of) `model` (`base`: the base model's folder); return the
    output model and tokenizer."""
    module, cfg = _config(stage, corpus)
    state = memory.state_from_model(model)
    data = {"calibration": corpus, "train": [corpus]}
    planner.predict_stage(module, cfg, state, states={"base": state}, data=data)  # refusals happen here
    ctx = Context.for_tests(work, data=data, base_path=base)
    torch.manual_seed(0)
    out, _ = module.run(copy.deepcopy(model), tok, cfg, ctx)
    if getattr(module, "WRITES_CHECKPOINT", True):
        folder = work / stage
        checkpoint.save(out, tok, folder)
        checkpoint.round_trip(out, folder, "cpu")
    return out, tok


def run_cell(family: str, stage: str, corpus: str, work: Path) -> str:
    """'ok', or 'refused: <reason>' when a stage turns the family down in one line."""
    from compress import tiny

    model, tok = tiny.build(CONFIGS / f"tiny-{family}.json", seed=0)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint.save(model, tok, work / "base")
    try:
        for step in (CHAIN if stage == "chain" else [stage]):
            model, tok = run_stage(model, tok, step, corpus, work / step, work / "base")
    except CompressError as e:
        message = str(e)
        if "\n" in message:
            raise AssertionError(f"{family} x {stage}: a refusal must be one line, got {message!r}") from None
        return f"refused: {message}"
    return "ok"


def run_matrix(corpus: str, work: Path, families: list[str] = FAMILIES, stages: list[str] = COLUMNS) -> dict:
    return {f: {s: run_cell(f, s, corpus, work / f / s) for s in stages} for f in families}


def markdown(rows: dict, grouped: bool = False) -> str:
    """The support table: a mark per family and stage, refusals numbered and explained below the table;
    `grouped`: families with the same marks share one row (the README's short form)."""
    from compress import families

    reasons: list[str] = []
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    table: dict[tuple, list[str]] = {}
    for fam, cells in rows.items():
        marks = []
        for stage in COLUMNS:
            cell = cells.get(stage, "-")
            if cell == "ok":
                marks.append("yes")
            elif cell.startswith("refused: "):  # the reason, without who refused whom and the list of the supported
                reason = re.sub(r"^\w+ does not support [^:]+: |; it supports .*$", "", cell[len("refused: "):])
                if reason not in reasons:
                    reasons.append(reason)
                marks.append(f"no ({reasons.index(reason) + 1})")
            else:
                marks.append(cell)
        name = families.of(_model_type(fam)).name + (" (new arch.)" if fam == "falcon-40b" else "")
        table.setdefault(tuple(marks) if grouped else (fam,) + tuple(marks), []).append(name)
    for key, names in table.items():
        marks = key if grouped else key[1:]
        lines.append(f"| {', '.join(names)} | " + " | ".join(marks) + " |")
    lines.append("")
    lines += [f"({i}) {r}" for i, r in enumerate(reasons, start=1)]
    return "\n".join(lines) + "\n"


def _model_type(family: str) -> str:
    import json

    return json.loads((CONFIGS / f"tiny-{family}.json").read_text())["model_type"]
