"""Benchmark: the memory planner's predictions against what the pipeline measures, stage by stage.

Issue target: |predicted - measured| / measured <= 25% for every stage of the tiny and SmolLM2 pipelines on
CPU (and on CUDA when there is a GPU). Each pipeline below covers every stage type once (cast, prune, train,
distill, gptq, rtn, int8, eval) with short budgets: a stage's peak is reached in its first steps, so a few
steps measure it as well as a full run. Every stage's manifest records memory.predicted_peak_bytes (the
planner, from the loaded input model) and memory.measured_peak_bytes (compress.measure.PeakMemory: peak RSS
growth over the resident input model on CPU, max allocated on CUDA), and the same pair for the evaluation of
its output (eval_predicted_peak_bytes / eval_measured_peak_bytes). This script runs the pipelines and
compares the pairs with compress.measure.compare (25%, or within the 16 MiB noise floor of one CPU RSS
measurement: the tiny model's stages live below it).

By default each stage runs in a fresh process (`compress run --until` that stage: the stages before it are
finished, so they are skipped), which is what the planner predicts: the stage's own
memory. `--one-process` runs the whole pipeline in one process instead; on CPU, RSS then also holds what
glibc's heap kept from earlier stages (measured in bench/results/memory-one-process.md).

    python bench/memory.py                          # tiny + smollm2 pipelines (~20 min on 2 cores)
    python bench/memory.py --pipelines tiny         # a minute
    python bench/memory.py --one-process            # every pipeline in one process -> memory-one-process.*
    python bench/memory.py --runs artifacts/default # also compare the manifests of finished runs
Writes bench/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress import config, measure, memory, pipeline  # noqa: E402
from compress.errors import CompressError  # noqa: E402

TINY = REPO / "configs" / "models" / "tiny-llama.json"

PIPELINES = {
    "tiny": f"""
        name: memory-tiny
        model: tiny:{TINY}
        data: {{calibration: zoo:austen, train: [zoo:austen, zoo:shakespeare]}}
        eval: {{perplexity: [zoo:austen], seq_len: 128, max_tokens: 2048, decode_tokens: 8}}
        stages:
          - cast: {{dtype: bfloat16}}
          - prune: {{target: {{layers: 3, hidden: 48, heads: 2, intermediate: 96}}, steps: 3, batch_size: 4, seq_len: 128, from: base}}
          - train: {{tokens: 1536, batch_size: 4, seq_len: 128, update_every: 1, eval_tokens: 1024}}
          - distill: {{layers: 2, tokens: 1536, batch_size: 4, seq_len: 128, eval_tokens: 512, from: base}}
          - gptq: {{nsamples: 16, seq_len: 128, group_size: 32, from: base}}
          - gptq: {{method: rtn, group_size: 32, from: base, name: rtn}}
          - int8: {{calibration_samples: 2, seq_len: 128, from: base}}
          - eval: {{perplexity: [zoo:shakespeare], seq_len: 64, max_tokens: 1024, batch_size: 2, from: base}}
        """,
    "smollm2": """
        name: memory-smollm2
        model: zoo:smollm2-135m
        data: {calibration: zoo:austen, train: [zoo:austen, zoo:shakespeare]}
        eval: {perplexity: [zoo:austen], seq_len: 512, max_tokens: 4096, decode_tokens: 16}
        stages:
          - cast: {dtype: bfloat16}
          - prune: {target: 0.5, steps: 2, batch_size: 2, seq_len: 256, from: base}
          - train: {tokens: 1536, batch_size: 2, seq_len: 256, update_every: 1, eval_tokens: 1024}
          - distill: {layers: 15, tokens: 1024, batch_size: 2, seq_len: 256, eval_tokens: 512, from: base}
          - gptq: {include: stages/gptq-w4g128.yaml, from: base}
          - gptq: {include: stages/gptq-w4g128.yaml, method: rtn, from: base, name: rtn}
          - int8: {from: base}
          - eval: {perplexity: [zoo:shakespeare], seq_len: 256, max_tokens: 2048, batch_size: 2, from: base}
        """,
}


def compare_run(run_dir: Path) -> list[dict]:
    """One row per measured quantity (stage peak, eval peak) of every finished stage of a run."""
    rows = []
    for mf in sorted(run_dir.glob("[0-9][0-9]-*/manifest.json")):
        m = json.loads(mf.read_text())
        mem = m.get("memory") or {}
        for what, pk, mk in (("stage", "predicted_peak_bytes", "measured_peak_bytes"),
                             ("eval", "eval_predicted_peak_bytes", "eval_measured_peak_bytes")):
            pred, meas = mem.get(pk), mem.get(mk)
            if pred is None or meas is None or (what == "eval" and m["stage"] == "eval"):
                continue  # an eval stage's own peak is its evaluation: counted once, as "stage"
            err, ok = measure.compare(pred, meas)
            rows.append({"run": run_dir.name, "folder": m["folder"], "stage": m["stage"], "what": what,
                         "predicted_bytes": pred, "measured_bytes": meas, "rel_error": err, "ok": ok,
                         "method": mem.get("method"), "device": mem.get("device")})
    return rows


def render(rows: list[dict], how: str) -> str:
    ok = sum(r["ok"] for r in rows)
    lines = [
        "# Memory planner: predicted vs measured peak", "",
        "Written by `bench/memory.py`. Predicted = compress.memory (from the loaded input model's config); measured "
        "= compress.measure.PeakMemory during the stage (CPU: peak RSS growth over the resident input model). "
        "ok = within 25% of the measurement, or within the 16 MiB noise floor of one CPU RSS measurement. "
        f"Run: {how}.", "",
        f"{ok} of {len(rows)} within bounds.", "",
        "| run | stage | measured | predicted | predicted / measured | error | ok |", "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["predicted_bytes"] / r["measured_bytes"] if r["measured_bytes"] else float("inf")
        lines.append(f"| {r['run']} | {r['folder']} ({r['what']}) | {memory.fmt_bytes(r['measured_bytes'])} | "
                     f"{memory.fmt_bytes(r['predicted_bytes'])} | {ratio:.2f} | {100 * r['rel_error']:.1f}% | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="finished run folders to compare as well")
    ap.add_argument("--work", type=Path, default=None, help="where the pipelines run (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--one-process", action="store_true", help="run each pipeline in one process (default: a "
                    "fresh process per stage)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    work = a.work or Path(tempfile.mkdtemp(prefix="memory-bench-"))
    rows = []
    for name in a.pipelines:
        path = work / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(PIPELINES[name]))
        pipe = config.load(path)
        warm_token_cache(pipe)
        if a.one_process:
            pipeline.run(pipe, out_root=work, log=print, quiet=True)
        else:
            run_stage_by_stage(path, work)
        rows += compare_run(work / pipe.name)
    for run_dir in a.runs:
        rows += compare_run(run_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "memory-one-process" if a.one_process else "memory"
    how = ("every pipeline in one process" if a.one_process else
           "each stage in a fresh process (the stages before it finished and skipped)")
    (a.out / f"{stem}.json").write_text(json.dumps({"how": how, "rows": rows}, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(render(rows, how))
    print(render(rows, how))


def warm_token_cache(pipe) -> None:
    """Tokenize every text source the pipeline names, every split, once: compress.data caches the ids on disk,
    and the planner plans a warm cache (compress.memory.data_bytes). A first tokenization costs several times
    more (Python lists of ids), so without this the first stage to read a source on a new machine measures it."""
    from compress import data

    source = pipeline.source_of(pipe)
    if source.tiny:
        _, tok = source.load()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source.path)

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    sources = sorted({s for s in strings(pipe.resolved()) if s.startswith("zoo:") and s != pipe.model})
    for spec in sources:
        try:
            data.check_spec(spec)
            data.load_documents(spec)
        except CompressError:  # a zoo model id, not a text source
            continue
        for split in ("train", "validation", "test"):
            data.token_ids(tok, spec, split)


def run_stage_by_stage(path: Path, work: Path) -> None:
    """Run the pipeline at `path` once per stage, each time in a new Python process: `until` that stage, so the
    stages before it are finished and skipped (compress run --until)."""
    for spec in config.load(path).stages:
        code = ("from compress import pipeline; "
                f"pipeline.run(config.load({str(path)!r}), out_root={str(work)!r}, log=print, quiet=True, "
                f"until={spec.name!r})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

if __name__ == "__main__":
    main()
