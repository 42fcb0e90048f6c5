"""Benchmark: how much of what GPTQ 4-bit costs SmolLM2-135M a LoRA adapter wins back, KD vs LM loss, same tokens.

Arms, all from one GPTQ checkpoint (w4 g128, symmetric, group-aware order: the gptq stage's defaults, calibrated on
`--calib-samples` windows of 512 tokens of zoo:austen's train split):
    base       SmolLM2-135M (zoo:smollm2-135m), float32
    gptq       the 4-bit model, no adapter
    lora_kd    gptq + rank-16 LoRA (alpha 32, every linear in the 30 blocks), KL(base || model) at T = 1
    lora_lm    the same adapters trained with next-token cross-entropy on the same text
Both adapters: `--tokens` tokens of zoo:austen's TRAIN split (seq_len 512, batch 4, the same batches and schedule:
AdamW, lr `--lr`, 3% warmup, cosine to 10%, clipping 0.3), each one `compress.stages.lora.run` call (the stage
as a pipeline runs it). Every arm is saved with compress.checkpoint.save and scored from its reload
(compress.checkpoint.load applies adapter/), as the pipeline evaluates.

Scores on the TEST splits of zoo:shakespeare (held-out domain: no Shakespeare in training) and zoo:austen:
    perplexity     compress.evaluate.perplexity: non-overlapping 512-token windows with BOS, `--eval-tokens` per source
    KL to base     mean over the same scored positions of KL(p_base || p_model), nats per token
    gap closed     (ppl_gptq - ppl_arm) / (ppl_gptq - ppl_base): the share of the base-to-4-bit perplexity gap an
                   adapter closed (1 = back to the base, < 0 = worse than no adapter); same for KL: 1 - KL_arm / KL_gptq

    python bench/lora.py                                  # the measurement (run it on an idle machine)
    python bench/lora.py --tokens 1024 --seq-len 128 --batch-size 2 --val-tokens 256 --eval-seq-len 256 \
        --eval-tokens 512 --calib-samples 8 --smoke                                  # code path check only
Time: the smoke trained at 2.8 (kd) / 3.6 (lm) tokens/s at seq_len 128 on 2 cores at load average 5-9 (the
machine shared); on-the-fly dequantization was about 40% of a step's CPU time there (torch profiler). Expect hours
per adapter at the default budget even on an idle machine; `--work` keeps the GPTQ checkpoint between runs.
Results: bench/results/lora.json (a --smoke run is marked as such) rendered to bench/results/lora.md. CPU only;
wall times depend on the machine's load (recorded with the load average at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TRAIN = "zoo:austen"
SOURCES = ["zoo:shakespeare", "zoo:austen"]  # held-out domain first
ARMS = ("lora_kd", "lora_lm")


def _context(work: Path, base: Path, seed: int = 0):
    from compress.context import Context

    work.mkdir(parents=True, exist_ok=True)
    return Context(device=torch.device("cpu"), seed=seed, data={"train": [TRAIN], "calibration": TRAIN},
                   work_dir=work, base_path=base, quiet=True, log=lambda m: print(m, flush=True))


def _load(folder: Path):
    from compress import checkpoint, evaluate

    model, tok = checkpoint.load(folder, device="cpu")
    evaluate.upcast_float16_on_cpu(model, "cpu")  # as the pipeline's evaluation computes 16-bit models on a CPU
    return model.eval(), tok


@torch.no_grad()
def kl_to_base(model, base, tok, spec: str, seq_len: int, max_tokens: int, batch: int = 4) -> float:
    """Mean KL(p_base || p_model) in nats over the positions compress.evaluate.perplexity scores."""
    import torch.nn.functional as F

    from compress import data, evaluate

    stream = data.token_ids(tok, spec, "test")
    ids, scored, _ = evaluate.causal_windows(stream, seq_len, max_tokens, None, data.bos_id(tok))
    total, n = 0.0, 0
    for i in range(0, len(ids), batch):
        x, m = ids[i:i + batch], scored[i:i + batch, 1:]                                # (b, L), (b, L-1)
        lp = F.log_softmax(model(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)[m]   # (N, V)
        lq = F.log_softmax(base(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)[m]    # (N, V)
        total += float((lq.exp() * (lq - lp)).sum(-1).double().sum())
        n += int(m.sum())
    return total / n


def score(model, base, tok, args) -> dict:
    from compress import evaluate

    ecfg = evaluate.EvalConfig(perplexity=SOURCES, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, speed=False)
    out = {}
    for s in SOURCES:
        ppl = evaluate.perplexity(model, tok, s, ecfg, "cpu")
        out[s] = {"ppl": round(ppl["value"], 4), "n_tokens": ppl["protocol"]["n_tokens"],
                  "kl": round(kl_to_base(model, base, tok, s, args.eval_seq_len, args.eval_tokens), 5)}
    return out


def _slim(stats: dict) -> dict:
    keep = ("input_format", "targets", "adapted_linears", "rank", "alpha", "trainable_params", "adapter_bytes",
            "trained_against", "steps", "tokens_per_step", "train_seconds", "tokens_per_s", "val_start", "val_end",
            "teacher_val_lm", "gap_closed")
    out = {k: stats.get(k) for k in keep}
    curve = stats["loss_curve"]
    step = max(1, len(curve) // 20)
    out["loss_curve"] = [[r[0], round(r[1], 5)] for r in curve[::step]] + ([curve[-1]] if curve else [])
    return out


def _gptq(args, base_folder: Path, work: Path) -> Path:
    """The 4-bit checkpoint, made once per settings (reused from --work when they match)."""
    from compress import checkpoint
    from compress.stages import gptq

    folder = work / "gptq"
    settings = {"bits": 4, "group_size": 128, "nsamples": args.calib_samples, "calibration": TRAIN, "seed": 0}
    marker = folder / "bench-settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"[bench] reusing {folder}", flush=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    model, tok = checkpoint.load(base_folder, device="cpu")
    cfg = gptq.Config(bits=4, group_size=128, nsamples=args.calib_samples, calibration=TRAIN)
    t0 = time.perf_counter()
    model, _ = gptq.run(model, tok, cfg, _context(work / "gptq-work", base_folder))
    print(f"[bench] gptq {time.perf_counter() - t0:.0f} s", flush=True)
    checkpoint.save(model, tok, folder)
    marker.write_text(json.dumps(settings))
    return folder


def bench(args) -> dict:
    from compress import checkpoint, sources
    from compress.stages import lora

    base_folder = sources.folder_of("zoo:smollm2-135m")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-lora-"))
    base, tok = _load(base_folder)
    out = {"arms": {}}
    out["arms"]["base"] = {"scores": score(base, base, tok, args)}
    q_folder = _gptq(args, base_folder, work)
    q, _ = _load(q_folder)
    out["arms"]["gptq"] = {"scores": score(q, base, tok, args)}
    del q
    common = dict(rank=16, alpha=32.0, tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                  lr=args.lr, save_every=0, eval_tokens=max(args.seq_len, args.val_tokens), data=[TRAIN],
                  cache_dequantized=args.cache_dequantized)
    for arm in ARMS:
        cfg = lora.Config(**common, loss="kd" if arm == "lora_kd" else "lm")
        print(f"[bench] {arm}", flush=True)
        model, _ = checkpoint.load(q_folder, device="cpu")  # as stored: the stage upcasts and casts back itself
        t0 = time.perf_counter()
        adapted, stats = lora.run(model, tok, cfg, _context(work / f"{arm}-work", base_folder))
        seconds = time.perf_counter() - t0
        checkpoint.save(adapted, tok, work / arm)
        del adapted, model
        reloaded, _ = _load(work / arm)
        out["arms"][arm] = {"scores": score(reloaded, base, tok, args), "stage_seconds": round(seconds, 1),
                            "stats": _slim(stats)}
        del reloaded
    b, g = out["arms"]["base"]["scores"], out["arms"]["gptq"]["scores"]
    for arm in ARMS:
        sc = out["arms"][arm]["scores"]
        for s in SOURCES:
            gap = g[s]["ppl"] - b[s]["ppl"]
            sc[s]["ppl_gap_closed"] = round((g[s]["ppl"] - sc[s]["ppl"]) / gap, 4) if gap > 0 else None
            sc[s]["kl_gap_closed"] = round(1 - sc[s]["kl"] / g[s]["kl"], 4) if g[s]["kl"] > 0 else None
    out.update({
        "what": "SmolLM2-135M, GPTQ w4 g128, + rank-16 LoRA trained with KD from the base vs LM loss",
        "config": {**common, "gptq": {"bits": 4, "group_size": 128, "nsamples": args.calib_samples,
                                      "calibration": TRAIN}},
        "eval": {"metric": "perplexity + KL(base || model)", "sources": SOURCES, "split": "test",
                 "seq_len": args.eval_seq_len, "max_tokens": args.eval_tokens},
    })
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def render(r: dict) -> str:
    c = r["config"]
    lines = ["# lora benchmark", "", "Written by `bench/lora.py` (see its docstring for the protocol). CPU only.", "",
             f"## {r['what']}", "",
             f"Adapters: {c['tokens']:,} training tokens of {TRAIN} train (seq_len {c['seq_len']}, batch "
             f"{c['batch_size']}, lr {c['lr']}), rank {c['rank']}, alpha {c['alpha']}; GPTQ calibrated on "
             f"{c['gptq']['nsamples']} x 512 tokens of {TRAIN}. {r['env']['threads']} threads, load average "
             f"{r['env']['load_average_at_start']}, {r['total_seconds']} s in all."
             + (" **SMOKE RUN: budgets too small to mean anything.**" if r.get("smoke") else ""), "",
             f"Scores on the test splits ({r['eval']['seq_len']}-token windows, {r['eval']['max_tokens']} tokens per "
             "source); gap closed = share of the base-to-4-bit gap won back.", "",
             "| arm | " + " | ".join(f"{s} ppl | KL | ppl gap closed" for s in SOURCES) + " | stage s |",
             "|---|" + "---|---|---|" * len(SOURCES) + "---|"]
    for arm, a in r["arms"].items():
        cells = []
        for s in SOURCES:
            x = a["scores"][s]
            gap = x.get("ppl_gap_closed")
            cells += [str(x["ppl"]), str(x["kl"]), "" if gap is None else f"{gap:.1%}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {a.get('stage_seconds', '')} |")
    for arm in ARMS:
        st = r["arms"][arm]["stats"]
        lines.append("")
        lines.append(f"`{arm}`: {st['trainable_params']:,} trainable parameters ({st['adapter_bytes'] / 2**20:.2f} "
                     f"MiB of adapter), {st['steps']} steps, {st['tokens_per_s']} tokens/s; loss "
                     f"{st['loss_curve'][0][1]} -> {st['loss_curve'][-1][1]}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=262_144, help="training tokens per adapter")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--val-tokens", type=int, default=4096, help="the stage's before/after validation tokens")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=20480, help="test tokens per source")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dequantized", action=argparse.BooleanOptionalAction, default=True,
                    help="train over cached dequantized weights (same numbers as on-the-fly, faster on a CPU)")
    ap.add_argument("--work", default=None, help="keep checkpoints here (the GPTQ one is reused across runs)")
    ap.add_argument("--smoke", action="store_true", help="mark the result as a code-path check, not a number")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(), "device": "cpu",
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    res = bench(args)
    res.update(env=env, total_seconds=round(time.perf_counter() - t0, 1), smoke=args.smoke,
               command="python bench/lora.py " + " ".join(os.sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "lora.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
