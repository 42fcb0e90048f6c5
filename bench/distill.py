"""Benchmark: the `distill` stage on two real models, on CPU, with stated token budgets.

(a) minilm: all-MiniLM-L6-v2 (zoo:minilm-l6, 6 layers) -> a 3-layer student (init alternate = teacher layers
    [0, 3, 5]) by embedding distillation on one sentence per row: cos on the token states of mapped layers
    (student 1 -> teacher 3, 2 -> 5), cos on mean-pooled embeddings, and 10 x the MSE of the batch's pooled
    cosine-similarity matrices (the best of the recipes tried; see bench/results/distill.md). Score:
    compress.evaluate.agreement against the teacher (Spearman of the pair cosines of 256 consecutive-sentence
    pairs from the TEST splits of zoo:austen and zoo:shakespeare, mean-pooled last hidden state, max 128
    tokens). Target: Spearman >= 0.97 on both sources. Also recorded: the same student before training (the
    teacher's layers dropped, nothing learned) so the gain is visible.
(b) smollm2: SmolLM2-135M (zoo:smollm2-135m, 30 layers) -> a 15-layer student (alternate: [0, 2, ..., 12, 15,
    ..., 29]) trained for the same token budget twice, from the same init, on the same batches (same seed)
    and schedule, once per arm: `distill` with the DistilBERT loss (5 KL(T=2) + 2 LM + 1 cos, the stage's
    defaults), `kd_t1` with the teacher's distribution alone (forward KL at T = 1, alpha_kl 1, the others 0,
    as causal-LM distillation usually is), and `lm_only` with the LM loss alone (alpha_lm 1, the others 0).
    Score: compress.evaluate.perplexity on the TEST splits of zoo:austen and zoo:shakespeare (non-overlapping
    windows of `--eval-seq-len` tokens, `--eval-tokens` per source). Distillation must win (lower perplexity
    than lm_only on both). Teacher and untrained-student perplexities are recorded as references. `--arms`
    runs some arms only and merges them into the recorded entry (same budget and settings, else refused).

Training data for both: the TRAIN splits of zoo:austen and zoo:shakespeare, mixed uniformly (the stage's
default). Each run is a `distill.run` call (the stage as a pipeline would run it), on CPU with the torch threads
given by --threads. Wall times depend on the machine's load (the CPU is shared): they are recorded with the load
average at the start.

    python bench/distill.py minilm                             # 1M tokens: ~40 min on 1 busy core
    python bench/distill.py smollm2 --tokens 65536 --eval-tokens 8192   # three trainings of a 81M student
    python bench/distill.py smollm2 --tokens 65536 --eval-tokens 8192 --arms kd_t1   # one more arm
    python bench/distill.py smollm2 --tokens 8192 --eval-tokens 4096 --smoke   # code path check only
Results merge into bench/results/distill.json (one entry per part; a --smoke run is marked as such) and are
rendered to bench/results/distill.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SOURCES = ["zoo:austen", "zoo:shakespeare"]


def _context(work: Path, seed: int = 0):
    from compress.context import Context

    work.mkdir(parents=True, exist_ok=True)
    return Context(device=torch.device("cpu"), seed=seed, data={"train": SOURCES}, work_dir=work, quiet=True,
                   log=lambda m: print(m, flush=True))


def _load(name: str):
    from compress import checkpoint, sources

    return checkpoint.load(sources.folder_of(f"zoo:{name}"), device="cpu")


def _env(threads: int) -> dict:
    return {"torch": torch.__version__, "threads": threads, "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "device": "cpu"}


def _slim(stats: dict) -> dict:
    """The stage's stats with the curves thinned to about 20 points."""
    out = {k: v for k, v in stats.items() if k not in ("loss_curve", "loss_terms")}
    out["loss_curve"] = _thin(stats["loss_curve"], 20)
    out["loss_terms"] = {k: _thin(v, 20) for k, v in stats["loss_terms"].items()}
    return out


def _thin(rows: list, n: int) -> list:
    step = max(1, len(rows) // n)
    kept = rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else [])
    return [[r[0], round(r[1], 5)] for r in kept]


# ----------------------------------------------------------------------------- (a) MiniLM


def bench_minilm(args) -> dict:
    from compress import evaluate
    from compress.stages import distill

    teacher, tok = _load("minilm-l6")
    ecfg = evaluate.EvalConfig(agreement=SOURCES, seq_len=128, agreement_pairs=args.pairs, speed=False)

    def agreement(model) -> dict:
        return {s: round(evaluate.agreement(model, tok, s, ecfg, "cpu", base_model=teacher)["spearman"], 4)
                for s in SOURCES}

    init_only, idx, _ = distill.build_student(teacher, args.layers, "alternate")
    init_only.eval()
    before = agreement(init_only)
    del init_only
    cfg = distill.Config(layers=args.layers, tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, save_every=0, eval_tokens=4096, inputs=args.inputs, alpha_sim=args.alpha_sim,
                         alpha_mse=args.alpha_mse, hidden_layers=args.hidden_layers)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        student, stats = distill.run(teacher, tok, cfg, _context(Path(work)))
        seconds = time.perf_counter() - t0
    student.eval()
    after = agreement(student)
    ok = min(after.values()) >= 0.97
    return {
        "what": f"MiniLM-L6 -> {args.layers}-layer student (teacher layers {idx}), embedding distillation",
        "config": {k: v for k, v in vars(cfg).items() if v is not None},
        "eval": {"metric": "agreement spearman vs teacher", "sources": SOURCES, "split": "test",
                 "pairs": args.pairs, "max_length": 128},
        "spearman_init_only": before, "spearman_distilled": after, "target": 0.97, "passed": ok,
        "params": {"teacher": stats["teacher"]["params"], "student": stats["student"]["params"],
                   "ratio": round(stats["param_ratio"], 4)},
        "stage_seconds": round(seconds, 1), "tokens": stats["tokens"], "tokens_per_s": stats["tokens_per_s"],
        "stats": _slim(stats),
    }


# ----------------------------------------------------------------------------- (b) SmolLM2


def bench_smollm2(args) -> dict:
    from compress import evaluate
    from compress.stages import distill

    teacher, tok = _load("smollm2-135m")
    ecfg = evaluate.EvalConfig(perplexity=SOURCES, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens,
                               speed=False)

    def ppl(model) -> dict:
        model.eval()
        return {s: round(evaluate.perplexity(model, tok, s, ecfg, "cpu")["value"], 3) for s in SOURCES}

    common = dict(layers=args.layers, tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                  lr=args.lr, save_every=0, eval_tokens=max(args.seq_len, 2048))
    eval_protocol = {"metric": "perplexity", "sources": SOURCES, "split": "test", "seq_len": args.eval_seq_len,
                     "max_tokens": args.eval_tokens}
    out = {}
    if args.arms:  # add arms to the recorded entry: only under the same budget and protocol
        out = dict(args.previous or {})
        if out.get("config") != common or out.get("eval") != eval_protocol:
            raise SystemExit(f"--arms: the recorded smollm2 entry has config {out.get('config')} / eval "
                             f"{out.get('eval')}; this run would use {common} / {eval_protocol}; run all arms")
    else:
        out["teacher_ppl"] = ppl(teacher)
        init_only, _, _ = distill.build_student(teacher, args.layers, "alternate")
        out["init_only_ppl"] = ppl(init_only)
        del init_only
    from compress.algorithms import kd

    idx = kd.select_layers(teacher.config.num_hidden_layers, args.layers, "alternate")
    runs = {"distill": distill.Config(**common),
            "kd_t1": distill.Config(**common, alpha_kl=1.0, alpha_lm=0.0, alpha_cos=0.0, temperature=1.0),
            "lm_only": distill.Config(**common, alpha_kl=0.0, alpha_lm=1.0, alpha_cos=0.0)}
    for name, cfg in runs.items():
        if args.arms and name not in args.arms:
            continue
        print(f"[bench] smollm2 {name}", flush=True)
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            student, stats = distill.run(teacher, tok, cfg, _context(Path(work)))
            seconds = time.perf_counter() - t0
        out[name] = {"ppl": ppl(student), "stage_seconds": round(seconds, 1), "tokens": stats["tokens"],
                     "tokens_per_s": stats["tokens_per_s"], "weights": stats["weights"], "stats": _slim(stats),
                     "env": args.env, "command": args.command}
        del student
    kd_arms = [a for a in ("distill", "kd_t1") if a in out]
    wins = {a: {s: out[a]["ppl"][s] < out["lm_only"]["ppl"][s] for s in SOURCES} for a in kd_arms}
    out.update({
        "what": f"SmolLM2-135M -> {args.layers}-layer student (teacher layers {idx}): KD vs LM-only, same tokens",
        "config": common,
        "eval": eval_protocol,
        "params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                   "student": out["distill"]["stats"]["student"]["params"],
                   "ratio": round(out["distill"]["stats"]["param_ratio"], 4)},
        "distill_wins": wins, "passed": {a: all(w.values()) for a, w in wins.items()},
    })
    return out


# ----------------------------------------------------------------------------- results


def render(results: dict) -> str:
    lines = ["# distill benchmark", "", "Written by `bench/distill.py` (see its docstring for the protocol). CPU only; "
             "wall times depend on the shared machine's load (recorded per run).", ""]
    m = results.get("minilm")
    if m:
        lines += [f"## (a) {m['what']}", "", f"Budget: {m['tokens']:,} training tokens "
                  f"({m['stats'].get('inputs', 'blocks')} of at most {m['config']['seq_len']} tokens, batch "
                  f"{m['config']['batch_size']}, lr {m['config']['lr']}, loss weights {m['stats']['weights']}, "
                  f"hidden states: {m['config']['hidden_layers']}), "
                  f"{m['stage_seconds']} s stage wall time, {m['tokens_per_s']} tokens/s, "
                  f"{m['env']['threads']} threads, load average {m['env']['load_average_at_start']}."
                  + (" **SMOKE RUN: budget too small to mean anything.**" if m.get("smoke") else ""), "",
                  f"Parameters: teacher {m['params']['teacher']:,}, student {m['params']['student']:,} "
                  f"(ratio {m['params']['ratio']}).", "",
                  "| Spearman vs teacher (test split) | " + " | ".join(SOURCES) + " |",
                  "|---|" + "---|" * len(SOURCES)]
        for key, label in (("spearman_init_only", "student, layers dropped, untrained"),
                           ("spearman_distilled", "student, distilled")):
            lines.append(f"| {label} | " + " | ".join(str(m[key][s]) for s in SOURCES) + " |")
        lines += ["", f"Target >= {m['target']} on every source: **{'passed' if m['passed'] else 'NOT met'}**.", ""]
    s = results.get("smollm2")
    if s:
        c = s["config"]
        lines += [f"## (b) {s['what']}", "", f"Budget: {s['distill']['tokens']:,} training tokens per student "
                  f"(seq_len {c['seq_len']}, batch {c['batch_size']}, lr {c['lr']}); distill "
                  f"{s['distill']['stage_seconds']} s, LM-only {s['lm_only']['stage_seconds']} s; "
                  f"{s['env']['threads']} threads, load average {s['env']['load_average_at_start']}."
                  + (" **SMOKE RUN: budget too small to mean anything.**" if s.get("smoke") else ""), "",
                  f"Parameters: teacher {s['params']['teacher']:,}, student {s['params']['student']:,} "
                  f"(ratio {s['params']['ratio']}).", "",
                  f"| perplexity (test split, {s['eval']['seq_len']}-token windows, "
                  f"{s['eval']['max_tokens']} tokens) | " + " | ".join(SOURCES) + " |",
                  "|---|" + "---|" * len(SOURCES)]
        rows = [("teacher (30 layers)", s["teacher_ppl"]), ("student untrained (layers dropped)", s["init_only_ppl"]),
                ("student, LM loss only (`lm_only`)", s["lm_only"]["ppl"]),
                ("student, distilled: 5 KL(T=2) + 2 LM + 1 cos (`distill`, the stage's defaults)", s["distill"]["ppl"])]
        if "kd_t1" in s:
            rows.append(("student, distilled: KL at T=1 alone (`kd_t1`)", s["kd_t1"]["ppl"]))
        for label, vals in rows:
            lines.append(f"| {label} | " + " | ".join(str(vals[x]) for x in SOURCES) + " |")
        lines += [""] + [f"`{a}` beats LM-only on every source: **{'yes' if ok else 'NO'}** "
                         f"({s[a]['stage_seconds']} s)." for a, ok in s["passed"].items()] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["minilm", "smollm2"])
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per student")
    ap.add_argument("--layers", type=int, default=None, help="student layers (default 3 / 15)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--pairs", type=int, default=256, help="minilm: sentence pairs per source")
    ap.add_argument("--inputs", default="auto", help="minilm: distill.inputs (auto = sentences for this encoder)")
    ap.add_argument("--alpha-sim", type=float, default=10.0, help="minilm: weight of the batch similarity term")
    ap.add_argument("--alpha-mse", type=float, default=0.0, help="minilm: weight of the token-state MSE term")
    ap.add_argument("--hidden-layers", default="mapped", help="minilm: last | mapped")
    ap.add_argument("--eval-seq-len", type=int, default=512, help="smollm2: perplexity window")
    ap.add_argument("--eval-tokens", type=int, default=20480, help="smollm2: perplexity tokens per source")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", nargs="*", choices=["distill", "kd_t1", "lm_only"], default=None,
                    help="smollm2: run these arms only, merged into the recorded entry")
    ap.add_argument("--smoke", action="store_true", help="mark the result as a code-path check, not a number")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    defaults = {"minilm": dict(tokens=1_000_000, layers=3, seq_len=128, batch_size=16, lr=1e-3),
                "smollm2": dict(tokens=200_000, layers=15, seq_len=256, batch_size=4, lr=3e-4)}[args.part]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = _env(args.threads)
    args.command = "python bench/distill.py " + " ".join(os.sys.argv[1:])
    path = args.out / "distill.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    args.previous = results.get(args.part)
    if args.arms and args.part != "smollm2":
        raise SystemExit("--arms is for the smollm2 part")
    args.env = env
    t0 = time.perf_counter()
    res = bench_minilm(args) if args.part == "minilm" else bench_smollm2(args)
    if not args.arms:  # a merge keeps the entry's own run record; each new arm carries its own
        res.update(env=env, total_seconds=round(time.perf_counter() - t0, 1), smoke=args.smoke, command=args.command)
    args.out.mkdir(parents=True, exist_ok=True)
    results[args.part] = res
    path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "distill.md").write_text(render(results))
    print(render({args.part: res}))


if __name__ == "__main__":
    main()
