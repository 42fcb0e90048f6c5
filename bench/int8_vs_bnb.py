"""Benchmark: compress's int8 stage against bitsandbytes loaded directly through transformers, on SmolLM2-135M.

Both are LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339) through bitsandbytes' Linear8bitLt, threshold 6.0,
lm_head (tied to the embedding) left unquantized. They differ in what happens to the rest:
- compress `int8` stage: embeddings and norms cast to bfloat16 (the stage's `dtype`), a serialised 8-bit
  safetensors checkpoint written, reloaded through transformers (`from_pretrained`, bitsandbytes installed) to
  check that our checkpoint is what transformers reads;
- transformers `BitsAndBytesConfig(load_in_8bit=True)` on the float32 folder: what a user gets by loading
  directly; on CPU the unquantized parts stay float32.
Recorded per arm: perplexity on the test splits of zoo:austen and zoo:shakespeare (compress.evaluate, 512-token
windows, --max-tokens per source), eval tokens/s, bytes of the quantized linears and of the whole model in memory,
the dtype of the unquantized parts; references: the float32 and bfloat16 models under the same protocol.

    python bench/int8_vs_bnb.py                 # ~15 min on 2 cores
    python bench/int8_vs_bnb.py --max-tokens 4096
    python bench/int8_vs_bnb.py --sensitivity   # ~20 min: how far tiny weight changes move each model
Writes bench/results/int8.json and int8.md.

--sensitivity asks where the 16-bit rest's perplexity cost comes from. The unquantized part that matters is the
tied embedding / lm_head (the norms are exact in 16 bits). It changes that matrix alone, by about as much as
float16 rounding does (relative 2e-4) or by bfloat16 rounding, keeps everything else in float32 (so that the
int8 model is the direct load's but for that change), and measures the float32 model under the same change.
Results merge into int8.json under "sensitivity".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress import checkpoint, evaluate, sources  # noqa: E402
from compress.algorithms import int8 as core  # noqa: E402
from compress.context import Context  # noqa: E402
from compress.stages import int8 as stage  # noqa: E402

SOURCES = ["zoo:austen", "zoo:shakespeare"]


def measure(model, tok, max_tokens: int) -> dict:
    """Perplexities and eval tokens/s of `model` on CPU under the demo's protocol."""
    cfg = evaluate.EvalConfig(perplexity=SOURCES, seq_len=512, max_tokens=max_tokens, decode_tokens=16)
    r = evaluate.run(model, tok, cfg, "cpu")
    return {"perplexity": {s: v["value"] for s, v in r["accuracy"]["perplexity"].items()},
            "eval_tokens_per_s": r["speed"]["eval_tokens_per_s"],
            "decode_tokens_per_s": r["speed"]["decode_tokens_per_s"]}


def footprint(model) -> dict:
    """Bytes in memory: quantized linears (int8 weight + row scales + bias), the rest by dtype, the whole model."""
    import bitsandbytes as bnb

    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    q_bytes = sum(core.state_bytes(m) for m in q)
    q_params = {id(t) for m in q for t in [*m.parameters(), *m.buffers()]}
    rest = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in q_params and t.is_floating_point()]
    return {"quantized_linears": len(q), "quantized_linear_bytes": q_bytes, "model_bytes": core.state_bytes(model),
            "unquantized_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in rest}),
            "unquantized_bytes": sum(t.numel() * t.element_size() for t in rest)}


def bf16_linear_bytes(model) -> int:
    """Bytes the same linears (every decoder nn.Linear but lm_head) take in bfloat16."""
    return sum(2 * sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--sensitivity", action="store_true", help="only the embedding-perturbation arms (see above)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.sensitivity:
        return sensitivity(a)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = sources.folder_of("zoo:smollm2-135m")
    res = {"protocol": {"model": "zoo:smollm2-135m", "sources": SOURCES, "seq_len": 512, "max_tokens": a.max_tokens,
                        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "bitsandbytes": core.require_bitsandbytes().__version__, "platform": platform.platform()},
           "arms": {}}

    model, tok = checkpoint.load(folder)
    lin16 = bf16_linear_bytes(model)
    res["arms"]["float32"] = {**measure(model, tok, a.max_tokens), "model_bytes": core.state_bytes(model)}
    bf16 = model.to(torch.bfloat16)
    res["arms"]["bfloat16"] = {**measure(bf16, tok, a.max_tokens), "model_bytes": core.state_bytes(bf16),
                               "quantized_linear_bytes": lin16}
    del model, bf16

    model, tok = checkpoint.load(folder)
    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    ctx = Context(device=torch.device("cpu"), seed=0, data={"calibration": "zoo:austen"}, work_dir=work,
                  quiet=True, log=lambda m: None)
    t0 = time.perf_counter()
    ours, stats = stage.run(model, tok, stage.Config(), ctx)
    arm = {"quantize_seconds": round(time.perf_counter() - t0, 2), **footprint(ours),
           "outlier_dims": (stats["outliers"] or {}).get("total_outlier_dims")}
    checkpoint.save(ours, tok, work / "ckpt")
    ids = checkpoint.probe_input(ours)
    via_hf = AutoModelForCausalLM.from_pretrained(work / "ckpt")  # bitsandbytes' own loader reads our checkpoint
    arm["transformers_reload_max_rel_error"] = checkpoint.max_rel_error(checkpoint.outputs(ours, ids),
                                                                        checkpoint.outputs(via_hf, ids))
    del via_hf
    arm.update(measure(ours, tok, a.max_tokens))
    res["arms"]["compress int8"] = arm
    del ours, model

    model, tok = checkpoint.load(folder)  # the stage with the rest in float32: what load_in_8bit keeps on CPU
    ours32, _ = stage.run(model, tok, stage.Config(dtype="float32"), ctx)
    res["arms"]["compress int8, dtype float32"] = {**footprint(ours32), **measure(ours32, tok, a.max_tokens)}
    del ours32, model

    t0 = time.perf_counter()
    direct = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    arm = {"quantize_seconds": round(time.perf_counter() - t0, 2), **footprint(direct)}
    arm.update(measure(direct, tok, a.max_tokens))
    res["arms"]["transformers load_in_8bit"] = arm

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "int8.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "int8.md").write_text(render(res))
    print(render(res))


def perturb_embedding(model, how: str) -> float:
    """Change the input embedding (tied to lm_head) in place, as `how` says; returns the relative change's norm.

    bfloat16 / float16: round to that dtype (kept in float32); noise-<seed>: add w * u, u uniform in [-1, 1]
    (seeded), scaled to the relative size of float16 rounding."""
    e = model.get_input_embeddings().weight
    w = e.data.clone()
    if how in ("bfloat16", "float16"):
        new = w.to(getattr(torch, how)).float()
    else:
        g = torch.Generator().manual_seed(int(how.removeprefix("noise-")))
        noise = w * (torch.rand(w.shape, generator=g) * 2 - 1)
        target = ((w.half().float() - w).norm() / w.norm()).item()
        new = w + noise * (target * w.norm() / noise.norm())
    e.data = new
    return float((new - w).norm() / w.norm())


def sensitivity(a) -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = sources.folder_of("zoo:smollm2-135m")
    ctx = Context(device=torch.device("cpu"), seed=0, data={}, work_dir=Path(tempfile.mkdtemp(prefix="int8-sens-")),
                  quiet=True, log=lambda m: None)
    rows = []
    for model_kind, how in [("float32", "float16"), ("int8", "none"), ("int8", "float16"), ("int8", "bfloat16"),
                            ("int8", "noise-1"), ("int8", "noise-2")]:
        model, tok = checkpoint.load(folder)
        rel = 0.0 if how == "none" else perturb_embedding(model, how)
        if model_kind == "int8":  # the stage with the rest in float32: the direct load's model, but for `how`
            model, _ = stage.run(model, tok, stage.Config(dtype="float32", calibration_samples=0), ctx)
        r = measure(model, tok, a.max_tokens)
        rows.append({"model": model_kind, "embedding": how, "relative_change": rel, "perplexity": r["perplexity"]})
        print(json.dumps(rows[-1]), flush=True)
        del model
    path = a.out / "int8.json"
    res = json.loads(path.read_text())
    res["sensitivity"] = {"what": "perplexity after changing only the tied embedding / lm_head (rest float32)",
                          "max_tokens": a.max_tokens, "threads": torch.get_num_threads(), "rows": rows}
    path.write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "int8.md").write_text(render(res))
    print(render(res))


def render(res: dict) -> str:
    arms, p = res["arms"], res["protocol"]
    f32, b16 = arms["float32"], arms["bfloat16"]
    mb = lambda n: f"{n / 1e6:.1f}"  # noqa: E731
    lines = [
        "# LLM.int8(): compress int8 stage vs transformers load_in_8bit (SmolLM2-135M, CPU)", "",
        f"Written by `bench/int8_vs_bnb.py`. Perplexity on the test splits, 512-token windows, {p['max_tokens']} "
        f"tokens per source; {p['threads']} CPU threads; bitsandbytes {p['bitsandbytes']}, torch {p['torch']}.", "",
        "| model | " + " | ".join(f"ppl {s} (vs fp32)" for s in p["sources"])
        + " | linears MB (vs bf16) | model MB | rest in | eval tok/s (vs bf16) |",
        "|---|" + "---|" * len(p["sources"]) + "---|---|---|---|",
    ]
    for name, r in arms.items():
        ppl = " | ".join(f"{r['perplexity'][s]:.3f} ({100 * (r['perplexity'][s] / f32['perplexity'][s] - 1):+.2f}%)"
                         for s in p["sources"])
        lin = r.get("quantized_linear_bytes")
        lin_cell = "-" if lin is None else f"{mb(lin)} (x{lin / b16['quantized_linear_bytes']:.3f})"
        rest = ", ".join(r.get("unquantized_dtypes", [])) or name
        speed = f"{r['eval_tokens_per_s']:.0f} (x{r['eval_tokens_per_s'] / b16['eval_tokens_per_s']:.2f})"
        lines.append(f"| {name} | {ppl} | {lin_cell} | {mb(r['model_bytes'])} | {rest} | {speed} |")
    ours = arms.get("compress int8", {})
    if "transformers_reload_max_rel_error" in ours:
        lines += ["", f"Our checkpoint reloaded by transformers' own bitsandbytes loader: logits within "
                      f"{ours['transformers_reload_max_rel_error']:.2g} (max relative) of the in-memory model."]
    sens = res.get("sensitivity")
    if sens:
        ref = {r["model"]: r["perplexity"] for r in sens["rows"] if r["embedding"] == "none"}
        ref.setdefault("float32", f32["perplexity"])
        lines += ["", "## Sensitivity: only the tied embedding / lm_head changed, everything else float32", "",
                  f"`--sensitivity`, {sens['max_tokens']} tokens per source, {sens['threads']} threads. int8 = the "
                  "stage with `dtype: float32` (the direct load's model) after the change.", "",
                  "| model | embedding change | relative size | " + " | ".join(f"ppl {s}" for s in p["sources"]) + " |",
                  "|---|---|---|" + "---|" * len(p["sources"])]
        for r in sens["rows"]:
            base = ref.get(r["model"])
            cells = " | ".join(f"{r['perplexity'][s]:.3f}" + (f" ({100 * (r['perplexity'][s] / base[s] - 1):+.2f}%)"
                                                               if base and r["embedding"] != "none" else "")
                               for s in p["sources"])
            lines.append(f"| {r['model']} | {r['embedding']} | {r['relative_change']:.1e} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
