"""Benchmark: compress gptq / rtn against GPTQModel and llm-compressor on SmolLM2-135M, one protocol for all.

Every method gets the same calibration (32 x 512 tokens from the Austen train split, seed 0 unless --seed,
through compress.data.calibration_blocks) and the same evaluation (compress.evaluate.perplexity in float32 on
CPU, test splits of zoo:austen and zoo:shakespeare, 512-token windows, 20480 tokens per source). Recorded per
method: quantization wall time (model loading excluded), peak RSS during quantization (process and children,
sampled every 50 ms) and over the whole child process, checkpoint size on disk, perplexities. Ours runs with
the memory settings `compress run` uses on a CPU (compress.measure.fixed_mmap_threshold, recorded as
`mmap_threshold`; COMPRESS_MMAP_THRESHOLD=0 measures glibc's default instead).

GPTQ v1 checkpoints (ours and GPTQModel's) are evaluated through compress.checkpoint.load (our QuantLinear); the
GPTQModel children also reload with GPTQModel's own `gptq_torch` kernel and record how far its logits are from ours
(`native_rel_error`), so the shared evaluation path is checked against the peer's. llm-compressor checkpoints
(compressed-tensors) are reloaded by transformers and evaluated dense.

    python bench/gptq_vs_peers.py setup                      # venvs for the peers (pins conflict with ours)
    python bench/gptq_vs_peers.py run                        # every method, ~1 h on 2 free cores
    python bench/gptq_vs_peers.py run --only ours-gptq-g128 --no-eval   # time one method
    python bench/gptq_vs_peers.py run --only ours-gptq-g128 gptqmodel-g128 --seed 1   # another calibration draw
Results merge into bench/results/gptq_vs_peers.json and are rendered to gptq_vs_peers.md.

Peers run in their own virtual environments (--system-site-packages, torch pinned to the installed CPU build so
pip never pulls another torch): GPTQModel 7.6.0 (+ optimum 2.3.0) with GPTQMODEL_CPU_WORKERS=2, and
llm-compressor 0.14. Each method runs in a child process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = "smollm2-135m"
CALIBRATION = "zoo:austen"
SOURCES = ["zoo:austen", "zoo:shakespeare"]
VENVS = {"gptqmodel": Path("/tmp/venv-gptqmodel"), "llmcompressor": Path("/tmp/venv-llmc")}
PINS = {"gptqmodel": ["gptqmodel==7.6.0", "optimum==2.3.0"], "llmcompressor": ["llmcompressor==0.14.0.1"]}

METHODS = {
    "base": dict(kind="base"),
    "ours-rtn-g128": dict(kind="ours", method="rtn", group_size=128),
    "ours-gptq-g128": dict(kind="ours", method="gptq", group_size=128),  # the stage's defaults: GAR on, damp 0.05
    "ours-gptq-g128-nogar": dict(kind="ours", method="gptq", group_size=128, act_group_aware=False),
    "ours-gptq-g128-damp01": dict(kind="ours", method="gptq", group_size=128, damp_percent=0.01),  # the paper's damp
    "ours-gptq-g128-act": dict(kind="ours", method="gptq", group_size=128, act_order=True),
    "ours-gptq-g64": dict(kind="ours", method="gptq", group_size=64),
    "gptqmodel-g128": dict(kind="gptqmodel", group_size=128),
    "gptqmodel-g128-act": dict(kind="gptqmodel", group_size=128, act_order=True),
    "gptqmodel-g64": dict(kind="gptqmodel", group_size=64),
    "llmcompressor-g128": dict(kind="llmcompressor", group_size=128),  # W4A16 preset; expected to fail on 576
    "llmcompressor-g64": dict(kind="llmcompressor", group_size=64),
}


# ---------------------------------------------------------------------------------------------------- parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create the peer venvs")
    run = sub.add_parser("run", help="run methods, merge results")
    run.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run (default: all)")
    run.add_argument("--nsamples", type=int, default=32)
    run.add_argument("--seq-len", type=int, default=512)
    run.add_argument("--max-tokens", type=int, default=20480)
    run.add_argument("--no-eval", action="store_true", help="quantize and save only (timing runs)")
    run.add_argument("--seed", type=int, default=0,
                     help="calibration draw; results of seed N != 0 are kept as METHOD@seedN (the spread study)")
    run.add_argument("--out", type=Path, default=RESULTS)
    run.add_argument("--timeout", type=int, default=3600, help="seconds per method")
    child = sub.add_parser("child", help=argparse.SUPPRESS)
    child.add_argument("name", choices=list(METHODS))
    child.add_argument("--result", type=Path, required=True)
    child.add_argument("--work", type=Path, required=True)
    child.add_argument("--nsamples", type=int, default=32)
    child.add_argument("--seq-len", type=int, default=512)
    child.add_argument("--max-tokens", type=int, default=20480)
    child.add_argument("--no-eval", action="store_true")
    child.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "setup":
        setup()
    elif args.cmd == "run":
        run_all(args)
    else:
        run_child(args)


def setup() -> None:
    """Create the peer venvs (system site packages, installed torch pinned)."""
    import torch

    for kind, venv in VENVS.items():
        py = venv / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pin = venv / "constraints.txt"
        pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
        subprocess.run([str(py), "-m", "pip", "install", "-c", str(pin), *PINS[kind]], check=True)


def python_for(kind: str) -> str:
    if kind in VENVS:
        py = VENVS[kind] / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"{py} missing: run `python bench/gptq_vs_peers.py setup` first")
        return str(py)
    return sys.executable


def run_all(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gptq_vs_peers.json"
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    work = Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")) / "bench-gptq"
    for name in args.only or list(METHODS):
        kind = METHODS[name]["kind"]
        key = name if args.seed == 0 else f"{name}@seed{args.seed}"
        out = work / f"{key}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        cmd = [python_for(kind), __file__, "child", name, "--result", str(out), "--work", str(work / key),
               "--seed", str(args.seed),
               "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens)]
        if args.no_eval:
            cmd.append("--no-eval")
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false")
        print(f"== {key}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, cwd=work)  # GPTQModel logs into cwd/logs
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        res = json.loads(out.read_text()) if out.exists() else {}
        res.setdefault("status", "ok" if rc == 0 else "failed")
        if rc != 0:
            res.setdefault("error", f"child exited with {rc}")
        res["child_seconds"] = round(time.perf_counter() - t0, 1)
        res["protocol"] = {"calibration": CALIBRATION, "nsamples": args.nsamples, "seq_len": args.seq_len,
                           "seed": args.seed,
                           "eval_sources": SOURCES, "eval_seq_len": 512, "eval_max_tokens": args.max_tokens,
                           "eval_dtype": "float32", "cores": os.cpu_count()}
        results["methods"][key] = res
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k not in ("config",)}), flush=True)
    (args.out / "gptq_vs_peers.md").write_text(render(results))


def render(results: dict) -> str:
    rows = ["| method | status | quant s | peak RSS MiB (quant) | max RSS MiB | disk MiB | "
            + " | ".join(f"ppl {s}" for s in SOURCES) + " | note |",
            "|---|---|---|---|---|---|" + "---|" * len(SOURCES) + "---|"]
    for name, r in results["methods"].items():
        ppl = r.get("perplexity", {})
        mib = lambda b: f"{b / 2**20:.0f}" if isinstance(b, (int, float)) else ""  # noqa: E731
        note = r.get("error", "")
        if "native_rel_error" in r:
            note = (note + f" GPTQModel gptq_torch (fp16) vs our loader (fp32): {r['native_rel_error']:.2g}").strip()
        rows.append(
            f"| {name} | {r.get('status')} | {r.get('quant_seconds', '')} | {mib(r.get('peak_rss_quant'))} | "
            f"{mib(r.get('max_rss'))} | {mib(r.get('disk_bytes'))} | "
            + " | ".join(f"{ppl[s]:.3f}" if s in ppl else "" for s in SOURCES) + f" | {note[:160]} |"
        )
    head = ("# GPTQ vs peers on SmolLM2-135M (CPU)\n\nGenerated by `python bench/gptq_vs_peers.py run`; protocol and "
            "raw numbers in gptq_vs_peers.json. Perplexity: float32 eval of each saved checkpoint, identical "
            "windows for every method.\n\n")
    return head + "\n".join(rows) + "\n" + _seed_spread(results["methods"])


def _seed_spread(methods: dict) -> str:
    """Per method run with several calibration draws: each draw's perplexities, and the spread."""
    draws: dict[str, dict[int, dict]] = {}
    for key, r in methods.items():
        if r.get("status") == "ok" and r.get("perplexity"):
            name, _, seed = key.partition("@seed")
            draws.setdefault(name, {})[int(seed or 0)] = r["perplexity"]
    draws = {n: d for n, d in draws.items() if len(d) > 1}
    if not draws:
        return ""
    rows = ["", "## Calibration draws", "",
            "The same method with other calibration samples (`--seed N`: another 32 x 512 draw from the Austen "
            "train split); the spread says how much of a gap between methods one draw can show by chance.", "",
            "| method | seeds | " + " | ".join(f"ppl {s} per seed" for s in SOURCES) + " | "
            + " | ".join(f"mean {s}" for s in SOURCES) + " |",
            "|---|---|" + "---|" * (2 * len(SOURCES))]
    for name, d in draws.items():
        seeds = sorted(d)
        per = [" / ".join(f"{d[k][s]:.3f}" for k in seeds) for s in SOURCES]
        mean = [f"{sum(d[k][s] for k in seeds) / len(seeds):.3f}" for s in SOURCES]
        rows.append(f"| {name} | {', '.join(map(str, seeds))} | " + " | ".join(per) + " | " + " | ".join(mean) + " |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------------- child


class PeakRSS:
    """Peak resident memory of this process and its children, sampled every 50 ms while active."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:  # a child that ended between listing and reading
                continue
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.05)

    def __enter__(self):
        self.peak = self._rss()
        t = self.proc.cpu_times()
        self._cpu0 = t.user + t.system + t.children_user + t.children_system
        self._wall0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        t = self.proc.cpu_times()
        self.cpu_seconds = round(t.user + t.system + t.children_user + t.children_system - self._cpu0, 2)
        self.load = os.getloadavg()[0]  # 1-minute load average at the end: >2 on 2 cores means shared CPUs


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_child(args) -> None:
    import torch

    from compress import data, zoo

    spec = METHODS[args.name]
    res: dict = {"kind": spec["kind"], "config": spec, "status": "failed"}

    def save():
        res["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args.result.write_text(json.dumps(res, indent=2))

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = zoo.model_path(MODEL)
        tok = AutoTokenizer.from_pretrained(folder)
        tokens = data.calibration_blocks(tok, CALIBRATION, args.nsamples, args.seq_len, seed=args.seed)
        args.work.mkdir(parents=True, exist_ok=True)
        out = args.work / "checkpoint"
        kind = spec["kind"]
        if kind == "base":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            quantize = {"ours": quantize_ours, "gptqmodel": quantize_gptqmodel, "llmcompressor": quantize_llmc}[kind]
            quantize(spec, folder, tok, tokens, out, res)
            res["disk_bytes"] = disk_bytes(out)
            model = None
        if not args.no_eval:
            if model is None:
                model = reload(kind, out, res, tok)
            if kind != "llmcompressor":  # compressed-tensors models refuse .float(); they load in float32
                model = model.float()
            res["perplexity"] = evaluate(model.eval(), tok, args.max_tokens)
        res["status"] = "ok"
    except Exception as e:  # recorded in the results: a peer failing is a result too
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
    save()


def evaluate(model, tok, max_tokens: int) -> dict:
    from compress import evaluate as ev

    cfg = ev.EvalConfig(perplexity=SOURCES, seq_len=512, max_tokens=max_tokens, speed=False)
    return {s: ev.perplexity(model, tok, s, cfg, "cpu")["value"] for s in SOURCES}


def quantize_ours(spec, folder, tok, tokens, out, res) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from compress import checkpoint, measure
    from compress.context import Context
    from compress.stages import gptq

    # as `compress run` on a CPU: a fixed mmap threshold (RSS follows live tensors; COMPRESS_MMAP_THRESHOLD=0
    # keeps glibc's default); quantize_model tightens it further for RTN
    res["mmap_threshold"] = measure.fixed_mmap_threshold()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    res["load_seconds"] = round(time.perf_counter() - t0, 2)
    overrides = {k: spec[k] for k in ("act_order", "act_group_aware", "damp_percent") if k in spec}  # else defaults
    cfg = gptq.Config(method=spec["method"], bits=4, group_size=spec["group_size"], nsamples=tokens.shape[0],
                      seq_len=tokens.shape[1], **overrides)
    ctx = Context(device=torch.device("cpu"), seed=0, quiet=True, log=lambda m: None)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        stats = gptq.quantize_model(model, cfg, ctx, tokens if cfg.method == "gptq" else None)
        res["quant_seconds"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_quant"], res["cpu_seconds_quant"], res["load_avg_end"] = peak.peak, peak.cpu_seconds, peak.load
    res["bits_per_weight"] = stats["bits_per_weight"]
    if "error_total" in stats:
        res["error_total"] = stats["error_total"]
    checkpoint.save(model, tok, out)


def quantize_gptqmodel(spec, folder, tok, tokens, out, res) -> None:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=spec["group_size"], desc_act=spec.get("act_order", False), sym=True)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in tokens]
    t0 = time.perf_counter()
    model = GPTQModel.load(str(folder), qcfg, device="cpu")
    res["load_seconds"] = round(time.perf_counter() - t0, 2)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        model.quantize(calib, tokenizer=tok)
        res["quant_seconds"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_quant"], res["cpu_seconds_quant"], res["load_avg_end"] = peak.peak, peak.cpu_seconds, peak.load
    res["versions"] = {"gptqmodel": gptqmodel.__version__}
    model.save(str(out))
    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    res["saved_quantization_config"] = qc


def quantize_llmc(spec, folder, tok, tokens, out, res) -> None:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    gs = spec["group_size"]
    if gs == 128:
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:
        recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": gs},
        }})
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    res["load_seconds"] = round(time.perf_counter() - t0, 2)
    res["versions"] = {"llmcompressor": llmcompressor.__version__}
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=tokens.shape[1],
                num_calibration_samples=tokens.shape[0], shuffle_calibration_samples=False)
        res["quant_seconds"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_quant"], res["cpu_seconds_quant"], res["load_avg_end"] = peak.peak, peak.cpu_seconds, peak.load
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def reload(kind: str, out: Path, res: dict, tok):
    """The saved checkpoint as a model for evaluation (GPTQ v1 through our loader)."""
    import torch

    if kind in ("ours", "gptqmodel"):
        from compress import checkpoint

        model, _ = checkpoint.load(out, "cpu")
        if kind == "gptqmodel":
            res["native_rel_error"] = native_check(out, model)
        return model
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(  # decompressed to dense float32 weights
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))


def native_check(out: Path, ours) -> float:
    """max-relative logit difference: GPTQModel's own gptq_torch kernel (fp16) vs our loader (fp32).

    For scale: our own loader in fp16 vs fp32 differs by about the same (~4e-3 on SmolLM2); a misread checkpoint
    would differ by O(1).
    """
    import torch
    from gptqmodel import BACKEND, GPTQModel

    from compress.checkpoint import max_rel_error, outputs, probe_input

    native = GPTQModel.load(str(out), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    ids = probe_input(ours)
    with torch.no_grad():
        theirs = native.model(input_ids=ids).logits.float()
    return max_rel_error(outputs(ours.float(), ids), theirs)


if __name__ == "__main__":
    main()
