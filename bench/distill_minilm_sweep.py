"""Benchmark: which recipe moves MiniLM-L6 -> 3-layer agreement? A short-budget sweep of the distill stage.

bench/distill.py minilm measures one recipe at a long budget (1M tokens: Spearman 0.918 / 0.907, target 0.97).
This sweep asks whether a different recipe would do better, at 200,000 training tokens each (about 4 minutes
on one core), everything else as in bench/distill.py: all-MiniLM-L6-v2 (zoo:minilm-l6) -> 3 layers (teacher
layers [0, 3, 5]), one sentence per row (at most 128 tokens), train splits of zoo:austen + zoo:shakespeare,
scored by compress.evaluate.agreement against the teacher (Spearman of the pair cosines of 256
consecutive-sentence pairs of each TEST split). Each recipe is a `distill.run` call; runs are deterministic
(seed 0), so a rerun reproduces its numbers.

    python bench/distill_minilm_sweep.py                  # every recipe, ~45 min on one core
    python bench/distill_minilm_sweep.py base lr5e-4       # some of them
Results merge into bench/results/distill_minilm_sweep.json and are rendered to distill_minilm_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill as bench  # noqa: E402  (bench/distill.py: model loading, context, sources)

TOKENS = 200_000
MIN_TOKENS = (0, 10, 16)  # by_length: pairs whose shorter sentence has at least this many tokens
BASE = dict(layers=3, init="alternate", tokens=TOKENS, batch_size=32, seq_len=128, lr=1e-3, save_every=0,
            eval_tokens=4096, alpha_cos=1.0, alpha_pool=1.0, alpha_sim=10.0, alpha_mse=0.0, hidden_layers="mapped")
RECIPES = {  # name -> (what changes against BASE, the overrides)
    "base": ("cos on mapped layers + pooled cos + 10 x sim, batch 32, lr 1e-3 (bench/distill.py's terms; "
             "it uses batch 16)", {}),
    "no-token-cos": ("no token-state cos (pooled cos + sim only)", dict(alpha_cos=0.0)),
    "sim100": ("100 x sim", dict(alpha_sim=100.0)),
    "mse1": ("+ 1 x token-state MSE", dict(alpha_mse=1.0)),
    "mse-instead-of-cos": ("token-state MSE instead of cos, lr 5e-4", dict(alpha_cos=0.0, alpha_mse=1.0, lr=5e-4)),
    "lr3e-3": ("lr 3e-3", dict(lr=3e-3)),
    "lr5e-4": ("lr 5e-4", dict(lr=5e-4)),
    "lr2e-4": ("lr 2e-4", dict(lr=2e-4)),
    "last-layer-lr5e-4": ("cos on the last layer only, lr 5e-4", dict(hidden_layers="last", lr=5e-4)),
    "batch128": ("batch 128 (more pairs per sim matrix, 4x fewer steps)", dict(batch_size=128)),
}


def run(name: str, teacher, tok) -> dict:
    from compress import evaluate
    from compress.stages import distill

    what, overrides = RECIPES[name]
    cfg = distill.Config(**{**BASE, **overrides})
    ecfg = evaluate.EvalConfig(agreement=bench.SOURCES, seq_len=128, agreement_pairs=256, speed=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        student, stats = distill.run(teacher, tok, cfg, bench._context(Path(work)))
        seconds = time.perf_counter() - t0
    student.eval()
    rho = {s: round(evaluate.agreement(student, tok, s, ecfg, "cpu", base_model=teacher)["spearman"], 4)
           for s in bench.SOURCES}
    return {"what": what, "overrides": overrides, "spearman": rho, "tokens": stats["tokens"],
            "spearman_by_length": {s: by_length(student, teacher, tok, s) for s in bench.SOURCES},
            "stage_seconds": round(seconds, 1), "val_end": {k: round(v, 5) for k, v in stats["val_end"].items()},
            "env": bench._env(torch.get_num_threads())}


def by_length(student, teacher, tok, source: str) -> dict:
    """Spearman over the agreement pairs whose shorter sentence has >= k tokens: {k: [pairs, rho]}.

    The same 256 pairs as compress.evaluate.agreement (consecutive test sentences, masked-mean pooling)."""
    import torch.nn.functional as F

    from compress import data, evaluate

    sents = data.sentences(data.split_texts(source, "test"), 512)
    sents = sents[: len(sents) // 2 * 2]
    cos = {}
    for who, m in (("student", student), ("teacher", teacher)):
        e = evaluate.embed(m, tok, sents, 128, "cpu")
        cos[who] = F.cosine_similarity(e[0::2], e[1::2], dim=-1).numpy()
    n = [len(tok(t, truncation=True, max_length=128)["input_ids"]) for t in sents]
    shorter = [min(a, b) for a, b in zip(n[0::2], n[1::2])]
    out = {}
    for k in MIN_TOKENS:
        keep = [i for i, v in enumerate(shorter) if v >= k]
        if len(keep) >= 2:
            out[k] = [len(keep), round(evaluate.spearman(cos["student"][keep], cos["teacher"][keep]), 4)]
    return out


def render(results: dict) -> str:
    rows = [f"# MiniLM-L6 -> 3-layer distillation: recipe sweep at {TOKENS:,} tokens", "",
            "Written by `bench/distill_minilm_sweep.py` (protocol in its docstring). Spearman of pair cosines "
            "against the teacher, 256 consecutive-sentence pairs per test split; untrained student (layers "
            "dropped): 0.801 / 0.750. CPU, 1 thread.", "",
            "| recipe | change | Spearman Austen | Spearman Shakespeare | val loss at the end (its own terms) "
            "| stage s |",
            "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        rho = r["spearman"]
        rows.append(f"| {name} | {r['what']} | {rho['zoo:austen']:.4f} | {rho['zoo:shakespeare']:.4f} | "
                    f"{r['val_end']['loss']:.4f} | {r['stage_seconds']:.0f} |")
    long = {n: r["spearman_by_length"] for n, r in results["runs"].items() if r.get("spearman_by_length")}
    if long:
        rows += ["", "By sentence length (Spearman over the pairs whose shorter sentence has at least k tokens; "
                 "pairs in brackets):", "", "| recipe | source | " + " | ".join(f"k = {k}" for k in MIN_TOKENS) + " |",
                 "|---|---|" + "---|" * len(MIN_TOKENS)]
        for n, per in long.items():
            for src, d in per.items():  # json keys are strings
                cells = [f"{d[str(k)][1]:.4f} ({d[str(k)][0]})" if str(k) in d else "" for k in MIN_TOKENS]
                rows.append(f"| {n} | {src} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", choices=list(RECIPES), help="default: all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=bench.RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.out / "distill_minilm_sweep.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    teacher, tok = bench._load("minilm-l6")
    for name in args.recipes or list(RECIPES):
        results["runs"][name] = run(name, teacher, tok)
        results["runs"][name]["command"] = f"python bench/distill_minilm_sweep.py {name} --threads {args.threads}"
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "distill_minilm_sweep.md").write_text(render(results))
        print(json.dumps({name: results["runs"][name]["spearman"]}), flush=True)


if __name__ == "__main__":
    main()
