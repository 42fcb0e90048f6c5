"""Benchmark: Sheared-LLaMA pruning + continued pretraining vs the same shape from scratch vs naive pruning.

Xia et al. 2023 (https://arxiv.org/abs/2310.06694) claim targeted structured pruning followed by continued
pretraining beats (a) training the target shape from scratch and (b) cheaper pruning, at equal tokens. This is that
comparison on SmolLM2-135M, pruning to about half its parameters, with the text we have offline (the train
splits of zoo:austen and zoo:shakespeare, mixed 50/50, one sequence of batches shared by every arm):

    base      the unpruned model (reference perplexity only)
    sheared   compress prune (hard-concrete masks + Lagrangian, `--prune-steps`), then `--train-steps` of
              continued pretraining of the materialised model
    naive     keep the first layers / kv groups / query heads / intermediate and hidden dims (no learning),
              then `--prune-steps + --train-steps` of continued pretraining
    scratch   the same shape with fresh random weights (transformers' init), trained `--prune-steps +
              --train-steps` steps (its own learning rate `--scratch-lr`: 1e-4 would barely move it)

Every arm sees exactly the same token blocks in the same order ((prune + train steps) x batch x seq_len
tokens), so perplexities are compared at equal total tokens. Perplexity = compress.evaluate.perplexity on
the TEST splits (non-overlapping windows of --eval-seq-len, --eval-tokens per source), before and after
continued pretraining. All in float32 on CPU (or CUDA when present).

    python bench/shear.py                     # about an hour on 2 free cores (defaults below)
    python bench/shear.py --arms naive,base   # a subset; results merge into the JSON
    python bench/shear.py --smoke             # tiny random Llama, a few steps: checks the script end to end
Writes bench/results/shear.json (and .md); --smoke writes under /tmp/compress-shear-smoke unless --out is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress import data, evaluate, train  # noqa: E402
from compress.algorithms import shear  # noqa: E402
from compress.context import Context  # noqa: E402
from compress.stages import prune  # noqa: E402

SOURCES = ["zoo:austen", "zoo:shakespeare"]
ARMS = ("base", "sheared", "naive", "scratch")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:smollm2-135m", help="zoo:NAME, a local folder, or tiny:CONFIG.json")
    ap.add_argument("--target", type=float, default=0.5, help="parameter count, or a fraction (<1) of the model's")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4, help="model lr while pruning and in continued pretraining")
    ap.add_argument("--scratch-lr", type=float, default=1e-3)
    ap.add_argument("--lr-masks", type=float, default=0.5)
    ap.add_argument("--lr-lambdas", type=float, default=0.1)
    ap.add_argument("--target-warmup", type=float, default=0.3)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3+3 steps, short eval (seconds to minutes)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model = f"tiny:{REPO / 'configs' / 'models' / 'tiny-llama.json'}"
        a.prune_steps, a.train_steps, a.batch_size, a.seq_len = 3, 3, 2, 32
        a.eval_seq_len, a.eval_tokens = 32, 256
        a.out = a.out or Path(tempfile.gettempdir()) / "compress-shear-smoke"
    a.out = a.out or REPO / "bench" / "results"
    a.arms = [x for x in a.arms.split(",") if x]
    bad = sorted(set(a.arms) - set(ARMS))
    if bad:
        ap.error(f"unknown arm(s) {bad}; choose from {ARMS}")
    return a


def load_model(spec: str, seed: int, device):
    if spec.startswith("tiny:"):
        from compress.tiny import build

        model, tok = build(spec[5:], seed=seed)
        return model.to(device), tok
    from compress import checkpoint, sources

    model, tok = checkpoint.load(sources.folder_of(spec), device=device)
    return model.float(), tok


def perplexities(model, tok, a, device) -> dict:
    cfg = evaluate.EvalConfig(perplexity=SOURCES, seq_len=a.eval_seq_len, max_tokens=a.eval_tokens, speed=False)
    model.eval()
    out = {}
    for spec in SOURCES:
        r = evaluate.perplexity(model, tok, spec, cfg, device)
        out[spec] = {"value": r["value"], "n_tokens": r["protocol"]["n_tokens"], "fingerprint": r["protocol"]["fingerprint"]}
    return out


def mixture(blocks, a, skip: int = 0):
    """The shared batch sequence; `skip` draws are consumed first (the sheared arm's pruning steps)."""
    m = train.DomainMixture(blocks, a.batch_size, seed=a.seed)
    for _ in range(skip):
        next(m)
    return m


def fit(model, batches, steps, lr, name, ctx):
    cfg = train.TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), name=name)
    r = train.fit(model, batches, train.causal_lm_loss, cfg, ctx)
    return {"steps": steps, "lr": lr, "tokens": r.tokens, "seconds": r.seconds, "final_loss": r.final_loss,
            "loss": train.downsample(r.history, "loss", points=20)}


def main(argv=None) -> None:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    work = Path(tempfile.mkdtemp(prefix="shear-bench-"))
    ctx = Context(device=device, seed=a.seed, data={"train": SOURCES}, work_dir=work, log=print, quiet=False)
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "shear.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    base, tok = load_model(a.model, a.seed, device)
    target = prune.target_shape(base, a.target)
    blocks = {s: data.token_blocks(tok, s, "train", a.seq_len) for s in SOURCES}
    total_steps = a.prune_steps + a.train_steps
    results["protocol"] = {
        "model": a.model, "base_shape": shear.Shape.of(base.config).as_dict(), "target_shape": target.as_dict(),
        "params_base": base.num_parameters(), "params_target": shear.Arch.of(base).count(target),
        "sources": SOURCES, "train_blocks": {s: len(b) for s, b in blocks.items()},
        "batch_size": a.batch_size, "seq_len": a.seq_len, "prune_steps": a.prune_steps, "train_steps": a.train_steps,
        "tokens_per_arm": total_steps * a.batch_size * a.seq_len, "eval_seq_len": a.eval_seq_len,
        "eval_tokens": a.eval_tokens, "device": str(device), "torch_threads": torch.get_num_threads(), "seed": a.seed,
    }
    arms = results.setdefault("arms", {})
    print(f"shear bench: {results['protocol']['base_shape']} -> {target.as_dict()}, "
          f"{results['protocol']['tokens_per_arm']:,} tokens per arm")

    if "base" in a.arms:
        arms["base"] = {"params": base.num_parameters(), "ppl": perplexities(base, tok, a, device)}
        save(results, a.out)

    if "naive" in a.arms:
        t0 = time.perf_counter()
        model = shear.materialize(base, shear.first_k_masks(shear.Shape.of(base.config), target))
        arm = {"params": model.num_parameters(), "shape": shear.Shape.of(model.config).as_dict(),
               "ppl_pruned": perplexities(model, tok, a, device)}
        arm["train"] = fit(model, mixture(blocks, a), total_steps, a.lr, "naive-cpt", ctx)
        arm["ppl"] = perplexities(model, tok, a, device)
        arm["tokens"], arm["seconds"] = arm["train"]["tokens"], time.perf_counter() - t0
        arms["naive"] = arm
        del model
        save(results, a.out)

    if "scratch" in a.arms:
        t0 = time.perf_counter()
        cfg = copy.deepcopy(base.config)
        for k, v in target.config_fields().items():
            setattr(cfg, k, v)
        cfg.head_dim = shear.head_dim(base)
        torch.manual_seed(a.seed)
        model = type(base)(cfg).to(device)
        arm = {"params": model.num_parameters(), "shape": shear.Shape.of(model.config).as_dict(),
               "ppl_pruned": perplexities(model, tok, a, device)}
        arm["train"] = fit(model, mixture(blocks, a), total_steps, a.scratch_lr, "scratch", ctx)
        arm["ppl"] = perplexities(model, tok, a, device)
        arm["tokens"], arm["seconds"] = arm["train"]["tokens"], time.perf_counter() - t0
        arms["scratch"] = arm
        del model
        save(results, a.out)

    if "sheared" in a.arms:
        t0 = time.perf_counter()
        cfg = prune.Config(target=a.target, steps=a.prune_steps, lr=a.lr, lr_masks=a.lr_masks,
                           lr_lambdas=a.lr_lambdas, batch_size=a.batch_size, seq_len=a.seq_len,
                           target_warmup=a.target_warmup, log_every=max(1, a.prune_steps // 20))
        model, stats = prune.run(copy.deepcopy(base), tok, cfg, ctx)
        arm = {"params": model.num_parameters(), "shape": shear.Shape.of(model.config).as_dict(),
               "prune": {k: stats[k] for k in ("expected_shape", "lambdas", "lm_loss", "gap", "params_gap",
                                                "materialize_max_rel_error", "tokens", "seconds")},
               "ppl_pruned": perplexities(model, tok, a, device)}
        arm["train"] = fit(model, mixture(blocks, a, skip=a.prune_steps), a.train_steps, a.lr, "sheared-cpt", ctx)
        arm["ppl"] = perplexities(model, tok, a, device)
        arm["tokens"], arm["seconds"] = stats["tokens"] + arm["train"]["tokens"], time.perf_counter() - t0
        arms["sheared"] = arm
        save(results, a.out)
    print((a.out / "shear.md").read_text())


def save(results: dict, out: Path) -> None:
    (out / "shear.json").write_text(json.dumps(results, indent=1))
    (out / "shear.md").write_text(render(results))


def render(results: dict) -> str:
    p = results["protocol"]
    lines = [
        f"# Sheared-LLaMA vs scratch vs naive pruning ({p['model']})", "",
        f"{p['base_shape']} -> {p['target_shape']} ({p['params_base']:,} -> {p['params_target']:,} params); "
        f"{p['tokens_per_arm']:,} training tokens per arm ({p['prune_steps']} prune + {p['train_steps']} train steps "
        f"x {p['batch_size']} x {p['seq_len']}); perplexity on test splits, {p['eval_tokens']} tokens per source, "
        f"windows of {p['eval_seq_len']}; {p['device']}. Before = right after pruning (naive, sheared) or at "
        f"initialisation (scratch); after = after the arm's training.", "",
        "| arm | params | tokens | " + " | ".join(f"{s} before / after" for s in p["sources"]) + " | seconds |",
        "|---|---|---|" + "---|" * len(p["sources"]) + "---|",
    ]
    for name in ARMS:
        arm = results["arms"].get(name)
        if arm is None:
            continue
        cells = []
        for s in p["sources"]:
            before = arm.get("ppl_pruned", {}).get(s, {}).get("value")
            after = arm["ppl"][s]["value"]
            cells.append(f"{before:.2f} / {after:.2f}" if before is not None else f"{after:.2f}")
        lines.append(f"| {name} | {arm['params']:,} | {arm.get('tokens', 0):,} | " + " | ".join(cells)
                     + f" | {arm.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
