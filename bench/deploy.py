"""Benchmark: GGUF export of SmolLM2-135M run in llama.cpp, against transformers and llama.cpp's own quantizer.

One protocol for every model (compress.export.llamacpp): the non-overlapping 512-token windows of the zoo:austen
test split that compress.evaluate uses (BOS + 511 tokens, 20480 tokens at most: 40 windows, 20440 scored tokens),
token ids from the HF tokenizer fed to both runtimes; perplexity from float32 logits; KLD(P_float32 || P_model) and
top-1 agreement against transformers float32 on the same positions; decode tokens/s = greedy, batch 1, 32 new
tokens after BOS + evaluate.DECODE_PROMPT (prefill included, after a warmup), three runs each, median reported.

Models:
    hf-float32        transformers, float32 (the reference)
    hf-bfloat16       transformers, the same weights cast to bfloat16 (computed in bfloat16)
    gguf-f16          our f16 GGUF of it (norms f32)
    llama-q8_0, llama-q4_0, llama-q4_k_m
                      llama.cpp's llama_model_quantize(gguf-f16, TYPE): its default mixtures, no imatrix
    torch-gptq-g32    compress gptq {bits: 4, group_size: 32, sym: true, act_order: false}, 32 x 512 calibration
                      tokens of the Austen train split (seed 0), evaluated in torch (QuantLinear, float32 compute)
    gguf-gptq-q4_0    that model's codes and fp16 scales re-encoded as Q4_0 (no second rounding)
    torch-gptq-asym-g32, gguf-gptq-q4_1
                      the same with sym: false, re-encoded as Q4_1 (the one rounding: m = fp16(-scale * zero))

Mind the trap: the zoo's SmolLM2 weights were dequantized from a Q4_1 GGUF, so any asymmetric group-32 grid
(Q4_1, gptq-asym) finds them nearly on its grid and is flattered; quantizers are compared at Q4_0.

    python bench/deploy.py              # writes bench/results/deploy.json and deploy.md
    python bench/deploy.py speed        # only decode_one_thread, from the files the full run left in DEPLOY_WORK
    python bench/deploy.py render [FILE] # deploy.md from deploy.json (or FILE)

Decode speed twice: at the evaluation's thread count (2 here) inside the full run, and `decode_one_thread`: every
model at 1 thread, 5 runs each, interleaved round robin so all see the same background load. On a shared,
oversubscribed machine llama.cpp's spinning worker threads lose most of their time slices at 2 threads (runs
spread 0.7-4.9 tokens/s), so the one-thread numbers are the comparable ones.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "deploy.json"
SOURCE = "zoo:austen"
SEQ_LEN, MAX_TOKENS, NEW_TOKENS, SPEED_RUNS = 512, 20480, 32, 3
LLAMA_TYPES = ("q8_0", "q4_0", "q4_k_m")
# measured once on this machine (`time nice -n 10 pip install llama-cpp-python`, CMAKE_BUILD_PARALLEL_LEVEL=2)
BUILD = {"package": "llama-cpp-python==0.3.36", "wall_seconds": 556.7, "user_cpu_seconds": 499.8,
         "system_cpu_seconds": 36.7, "exit_code": 0,
         "how": "nice -n 10 pip install llama-cpp-python, CMAKE_BUILD_PARALLEL_LEVEL=2, 2 shared cores, default "
                "CPU build (GGML_NATIVE); no llama-quantize binary is installed, llama_model_quantize is used"}


def main() -> None:
    import gguf
    import llama_cpp
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import data, evaluate, zoo
    from compress.context import Context
    from compress.export import llamacpp
    from compress.export.writer import write_gguf
    from compress.stages import gptq

    work = Path(os.environ.get("DEPLOY_WORK", "/tmp/deploy-bench"))
    work.mkdir(parents=True, exist_ok=True)
    folder = zoo.model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    threads = torch.get_num_threads()
    res: dict = {
        "protocol": {
            "source": SOURCE, "split": "test", "seq_len": SEQ_LEN, "max_tokens": MAX_TOKENS, "bos": True,
            "windows": "compress.evaluate.causal_windows (non-overlapping, = data.token_blocks)",
            "kld": "mean over scored positions of KL(P_hf_float32 || P_model), nats",
            "decode": f"greedy, batch 1, {NEW_TOKENS} new tokens after BOS + evaluate.DECODE_PROMPT, prefill "
                      f"included, warmup first, median of {SPEED_RUNS} runs",
            "threads": threads, "device": "cpu",
        },
        "env": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                "llama_cpp_python": llama_cpp.__version__, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "llama_cpp_python_build": BUILD, "models": {},
    }
    models = res["models"]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    # --- files
    f16 = work / "smollm2-f16.gguf"
    models["gguf-f16"] = {"write": write_gguf(base, tok, f16, type="f16", name="SmolLM2-135M-Instruct")}
    log(f"f16 written: {models['gguf-f16']['write']}")
    llama_files = {}
    for t in LLAMA_TYPES:
        path = llama_files[f"llama-{t}"] = work / f"smollm2-llama-{t}.gguf"
        t0 = time.perf_counter()
        llamacpp.quantize_file(f16, path, t, threads=threads)
        models[f"llama-{t}"] = {"write": {"path": str(path), "bytes": path.stat().st_size,
                                          "seconds": round(time.perf_counter() - t0, 2), "tensors": _types(path)}}

    calib = data.calibration_blocks(tok, SOURCE, 32, 512, seed=0)
    ctx = Context(device=torch.device("cpu"), seed=0, quiet=True, log=lambda m: None)
    ours = {}
    torch_models = {}
    for sym, key, gtype in ((True, "gptq-g32", "q4_0"), (False, "gptq-asym-g32", "q4_1")):
        qmodel = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        gcfg = gptq.Config(method="gptq", bits=4, group_size=32, sym=sym, act_order=False, nsamples=32, seq_len=512)
        gstats = gptq.quantize_model(qmodel, gcfg, ctx, calib)
        models[f"torch-{key}"] = {"quant_seconds": round(time.perf_counter() - t0, 1),
                                  "bits_per_weight": gstats.get("bits_per_weight"),
                                  "config": {k: getattr(gcfg, k) for k in ("method", "bits", "group_size", "sym",
                                                                           "act_order", "act_group_aware",
                                                                           "damp_percent", "nsamples", "seq_len")}}
        log(f"{key} done in {models[f'torch-{key}']['quant_seconds']} s")
        path = ours[f"gguf-gptq-{gtype}"] = work / f"smollm2-gptq-{gtype}.gguf"
        models[f"gguf-gptq-{gtype}"] = {"write": write_gguf(qmodel, tok, path, type=gtype, name="SmolLM2-135M-GPTQ")}
        torch_models[f"torch-{key}"] = qmodel.float()
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    torch_models["hf-bfloat16"] = bf16
    log("files written")

    # --- the tokenizer as llama.cpp reads it
    with llamacpp.GGUFModel(f16, n_ctx=SEQ_LEN, n_threads=threads, logits_all=False) as g:
        texts = data.split_texts(SOURCE, "test")[:200]
        same = sum(g.tokenize(t) == tok(t, add_special_tokens=False)["input_ids"] for t in texts)
        res["tokenizer"] = {"passages": len(texts), "llama_cpp_equals_hf": same,
                            "pre": models["gguf-f16"]["write"]["tokenizer_pre"],
                            "vs_original_gguf": _vs_original(f16)}

    # --- accuracy: one pass over the windows
    ids, scored, protocol = llamacpp.perplexity_windows(tok, SOURCE, SEQ_LEN, MAX_TOKENS)
    res["protocol"].update(protocol)
    ggufs = {"gguf-f16": f16, **llama_files, **ours}
    loaded = {k: llamacpp.GGUFModel(p, n_ctx=SEQ_LEN, n_threads=threads) for k, p in ggufs.items()}
    candidates = {k: g.logits for k, g in loaded.items()}
    candidates.update({k: llamacpp.torch_logits(m) for k, m in torch_models.items()})
    done = [0]

    def progress(rows):
        for r in rows:
            yield r
            done[0] += 1
            if done[0] % 10 == 0:
                log(f"window {done[0]}/{len(ids)}")

    acc = llamacpp.compare(ids, scored, llamacpp.torch_logits(base), candidates, progress=progress)
    for g in loaded.values():
        g.close()
    for k, v in acc.items():
        models.setdefault("hf-float32" if k == "reference" else k, {})["accuracy"] = v
    log("accuracy done")

    # --- decode speed
    prompt = llamacpp.decode_prompt(tok)
    for k, p in ggufs.items():
        with llamacpp.GGUFModel(p, n_ctx=SEQ_LEN, n_threads=threads, logits_all=False) as g:
            runs = [g.decode_speed(prompt, NEW_TOKENS) for _ in range(SPEED_RUNS)]
        models[k]["decode_tokens_per_s"] = {"median": statistics.median(runs), "runs": runs}
    for k, m in (("hf-float32", base), ("hf-bfloat16", bf16), ("torch-gptq-g32", torch_models["torch-gptq-g32"])):
        runs = [evaluate.decode_speed(m, tok, NEW_TOKENS, "cpu") for _ in range(SPEED_RUNS)]
        models[k]["decode_tokens_per_s"] = {"median": statistics.median(runs), "runs": runs}
    models["hf-float32"]["disk_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    res["env"]["load_avg_end"] = os.getloadavg()
    res["decode_one_thread"] = speed_one_thread(base, tok, ggufs)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")
    OUT.with_suffix(".md").write_text(render(res))
    log(f"wrote {OUT} and {OUT.with_suffix('.md')}")


def speed_one_thread(base, tok, ggufs: dict, runs: int = 5) -> dict:
    """Decode tokens/s of every GGUF and of the HF float32 model at 1 thread, interleaved round robin."""
    import torch

    from compress import evaluate
    from compress.export import llamacpp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prompt = llamacpp.decode_prompt(tok)
    loaded = {k: llamacpp.GGUFModel(p, n_ctx=SEQ_LEN, n_threads=1, logits_all=False) for k, p in ggufs.items()}
    got: dict = {k: [] for k in [*ggufs, "hf-float32"]}
    start = os.getloadavg()
    try:
        for _ in range(runs):
            for k, g in loaded.items():
                got[k].append(g.decode_speed(prompt, NEW_TOKENS))
            got["hf-float32"].append(evaluate.decode_speed(base, tok, NEW_TOKENS, "cpu"))
    finally:
        for g in loaded.values():
            g.close()
        torch.set_num_threads(threads)
    return {"threads": 1, "runs_per_model": runs, "order": "interleaved round robin", "load_avg_start": start,
            "load_avg_end": os.getloadavg(),
            "models": {k: {"median": statistics.median(v), "max": max(v), "runs": v} for k, v in got.items()}}


def speed_only() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import zoo

    work = Path(os.environ.get("DEPLOY_WORK", "/tmp/deploy-bench"))
    folder = zoo.model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ggufs = {"gguf-f16": work / "smollm2-f16.gguf", **{f"llama-{t}": work / f"smollm2-llama-{t}.gguf" for t in LLAMA_TYPES},
             "gguf-gptq-q4_0": work / "smollm2-gptq-q4_0.gguf", "gguf-gptq-q4_1": work / "smollm2-gptq-q4_1.gguf"}
    res = json.loads(OUT.read_text())
    res["decode_one_thread"] = speed_one_thread(base, tok, ggufs)
    OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")
    OUT.with_suffix(".md").write_text(render(res))


ORDER = ("hf-float32", "hf-bfloat16", "gguf-f16", "llama-q8_0", "llama-q4_k_m", "llama-q4_0", "gguf-gptq-q4_0",
         "torch-gptq-g32", "gguf-gptq-q4_1", "torch-gptq-asym-g32")


def render(res: dict) -> str:
    """bench/results/deploy.md: one table of every model, then what the acceptance asks, as measured ratios."""
    m, p, one = res["models"], res["protocol"], res.get("decode_one_thread", {}).get("models", {})
    ref_bytes = m["hf-float32"].get("disk_bytes")
    lines = [
        "# Deploy: SmolLM2-135M in llama.cpp (GGUF) against transformers", "",
        f"Written by [`bench/deploy.py`](../deploy.py) (its docstring holds the protocol). Perplexity, KLD and top-1 on "
        f"the {p['source']} {p['split']} split: {p['n_windows']} windows of {p['seq_len']} tokens (BOS first), "
        f"{m['hf-float32']['accuracy']['n_tokens']} scored tokens, float32 logits from each runtime; KLD = mean "
        "KL(P_float32 || P_model) in nats per token, top-1 = share of positions whose argmax equals float32's. "
        f"Decode: greedy at batch 1, {NEW_TOKENS} new tokens, median of {one and res['decode_one_thread']['runs_per_model']} "
        "runs at 1 thread, all models interleaved. "
        f"Load average {[round(x, 1) for x in res['env']['load_avg_start']]} at the start, "
        f"{[round(x, 1) for x in res['env']['load_avg_end']]} at the end; llama-cpp-python "
        f"{res['env']['llama_cpp_python']} (built here in {res['llama_cpp_python_build']['wall_seconds'] / 60:.0f} min), "
        f"torch {res['env']['torch']}.", "",
        "| model | runtime | bytes | perplexity | KLD | top-1 | decode tok/s (1 thread) |",
        "|---|---|---|---|---|---|---|"]
    for k in [k for k in ORDER if k in m] + [k for k in m if k not in ORDER]:
        a = m[k].get("accuracy", {})
        size = m[k].get("write", {}).get("bytes") or (m[k].get("disk_bytes") if k == "hf-float32" else None)
        speed = one.get(k, {}).get("median")
        lines.append(f"| {k} | {'llama.cpp' if k.startswith(('gguf', 'llama')) else 'transformers'} | "
                     f"{f'{size / 1e6:.1f} MB' if size else '-'} | {a.get('perplexity', float('nan')):.3f} | "
                     f"{a.get('kld', 0.0):.4f} | {a.get('top1', 1.0):.1%} | {f'{speed:.1f}' if speed else '-'} |")
    ours, theirs = m["gguf-gptq-q4_0"], m["llama-q4_0"]
    lines += ["", "Acceptance, as measured:", "",
              f"- our gptq -> Q4_0 against llama.cpp's Q4_0 of the same model, same llama.cpp: KLD "
              f"{ours['accuracy']['kld']:.4f} vs {theirs['accuracy']['kld']:.4f} "
              f"(x{ours['accuracy']['kld'] / theirs['accuracy']['kld']:.2f}), perplexity "
              f"{ours['accuracy']['perplexity']:.3f} vs {theirs['accuracy']['perplexity']:.3f}, "
              f"{ours['write']['bytes']:,} vs {theirs['write']['bytes']:,} bytes."]
    if one.get("gguf-gptq-q4_0") and one.get("hf-float32"):
        lines.append(f"- decode: gptq -> Q4_0 in llama.cpp {one['gguf-gptq-q4_0']['median']:.1f} tokens/s against "
                     f"transformers float32 {one['hf-float32']['median']:.1f}: x"
                     f"{one['gguf-gptq-q4_0']['median'] / one['hf-float32']['median']:.1f} (1 thread each).")
    if ref_bytes:
        lines.append(f"- size: {ours['write']['bytes'] / ref_bytes:.1%} of the float32 safetensors ({ref_bytes:,} bytes).")
    missing = [k for k in ORDER if k not in m]
    if missing:
        lines += ["", f"Not in this run (the script has them since): {', '.join(missing)}."]
    lines += ["", "The Q4_1 rows are flattered: the zoo's weights were dequantized from a Q4_1 GGUF, so an asymmetric "
              "group-32 grid finds them nearly on its grid. GPTQ's codes go into the GGUF unchanged (the gguf-gptq "
              "rows match their torch-gptq twins up to llama.cpp's own float arithmetic)."]
    return "\n".join(lines) + "\n"


def _dist_version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def _types(path: Path) -> dict:
    import collections

    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def _vs_original(ours: Path) -> dict:
    """Our tokenizer keys against the SmolLM2 GGUF that llama.cpp's converter wrote (the zoo's source file)."""
    import importlib.util

    import gguf

    from compress import zoo

    spec = importlib.util.find_spec(zoo.MODELS["smollm2-135m"].module)
    original = Path(list(spec.submodule_search_locations)[0]) / zoo.MODELS["smollm2-135m"].weights
    a, b = gguf.GGUFReader(ours).fields, gguf.GGUFReader(original).fields
    out = {}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length"):
        va = a[key].contents() if key in a else None
        vb = b[key].contents() if key in b else None
        out[key] = True if va == vb else {"ours": str(va)[:80], "original": str(vb)[:80]}
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["speed"]:
        speed_only()
    elif sys.argv[1:2] == ["render"]:  # render [FILE.json]: deploy.md from a results file (default deploy.json)
        src = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
        OUT.with_suffix(".md").write_text(render(json.loads(src.read_text())))
    else:
        main()
