"""Run a .gguf file in llama.cpp (through llama-cpp-python) and measure it under compress's evaluation protocol.

    with GGUFModel("model.q4_0.gguf", n_ctx=512) as g:
        ids, scored, protocol = perplexity_windows(tokenizer, "zoo:austen", seq_len=512, max_tokens=20480)
        res = compare(ids, scored, torch_logits(base_model), {"q4_0": g.logits})
        tok_s = g.decode_speed(decode_prompt(tokenizer), 32)

llama-cpp-python (https://github.com/abetlen/llama-cpp-python) builds llama.cpp from source when pip installs it
(`pip install llama-cpp-python`; cmake and a C++ compiler needed). It is optional: `require()` raises a one-line
CompressError naming the install when it is missing, and `available()` says whether it is there.

Protocol (the same as compress/evaluate.py, so numbers compare with its manifests):
- windows: `evaluate.causal_windows` over `data.token_ids(tokenizer, spec, "test")`, non-overlapping, [BOS] +
  seq_len-1 stream tokens each, at most max_tokens // seq_len windows (= data.token_blocks); token ids come from
  the HF tokenizer and are fed to llama.cpp as ids, so both sides see the same tokens;
- logits: llama.cpp computes every position of a window in one batch (logits_all, n_batch >= seq_len) from an
  empty KV cache; perplexity = exp(mean NLL of the scored targets), NLL from float32 logits, summed in float64
  (evaluate.nll_sum);
- KLD = mean over the scored positions of KL(P_reference || P_candidate) = sum_v p_ref (log p_ref - log p_cand),
  the direction llama.cpp's `llama-perplexity --kl-divergence` reports; top1 = share of those positions where
  both argmax agree;
- decode tokens/s: greedy decoding at batch 1 with the KV cache, from BOS + evaluate.DECODE_PROMPT, prefill
  included, after an untimed warmup, the last token not fed back (like `generate`'s n tokens = prefill + n-1 steps).

`quantize_file` runs llama.cpp's own quantizer (llama_model_quantize, what the llama-quantize tool calls) on a
GGUF file, the baseline our GPTQ re-encoding is compared with.

Not supported: GPU offload settings (CPU only here), sliding windows (stride), masked LMs.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from compress.errors import CompressError

LLAMA_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "bf16": 32}  # enum llama_ftype (llama.h)


def available() -> bool:
    """True when llama-cpp-python is installed (checked without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def require():
    """The llama_cpp module, or a one-line CompressError saying how to install it."""
    if not available():
        raise CompressError("checking a GGUF file in llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                            "(builds llama.cpp from source; needs cmake and a C++ compiler)")
    import llama_cpp

    return llama_cpp


class GGUFModel:
    """A .gguf file loaded in llama.cpp on the CPU: logits of token windows, tokenization, decode speed."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True):
        llama_cpp = require()
        self.path = Path(path)
        if not self.path.is_file():
            raise CompressError(f"no GGUF file at {self.path}")
        threads = n_threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(
                str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=logits_all, verbose=False,
            )
        except ValueError as e:  # llama-cpp-python's message when llama.cpp refuses the file
            raise CompressError(f"llama.cpp cannot load {self.path.name}: {str(e).splitlines()[0]}") from None
        self.n_ctx, self.threads, self.logits_all = n_ctx, threads, logits_all
        self.n_vocab = self.llm.n_vocab()

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def logits(self, ids) -> torch.Tensor:
        """float32 logits [T, vocab] of one window of token ids [T], from an empty KV cache."""
        if not self.logits_all:
            raise CompressError("GGUFModel was loaded with logits_all=False: it gives no per-position logits")
        ids = [int(i) for i in ids]
        if len(ids) > self.n_ctx:
            raise CompressError(f"a window of {len(ids)} tokens does not fit n_ctx {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """llama.cpp's tokenization of text (no BOS added), to compare with the HF tokenizer's."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def metadata(self) -> dict:
        """The file's GGUF key/values as llama.cpp read them (strings)."""
        return dict(self.llm.metadata)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of prompt: new_tokens ids (prefill + new_tokens-1 single-token steps)."""
        self.llm.reset()
        self.llm.eval([int(i) for i in prompt])
        out = []
        for k in range(new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1] if self.logits_all else self._last_logits()))
            out.append(tok)
            if k + 1 < new_tokens:
                self.llm.eval([tok])
        return out

    def decode_speed(self, prompt: list[int], new_tokens: int = 32) -> float:
        """Greedy decode tokens/s at batch 1 (protocol in the module docstring)."""
        if len(prompt) + new_tokens > self.n_ctx:
            raise CompressError(f"prompt {len(prompt)} + {new_tokens} new tokens exceed n_ctx {self.n_ctx}")
        self.greedy(prompt, min(4, new_tokens))  # warmup
        t0 = time.perf_counter()
        out = self.greedy(prompt, new_tokens)
        return len(out) / (time.perf_counter() - t0)


def quantize_file(src: str | Path, dst: str | Path, type: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, default mixture, no imatrix): src .gguf -> dst .gguf."""
    llama_cpp = require()
    if type not in LLAMA_FTYPES:
        raise CompressError(f"unknown llama.cpp file type {type!r}; known: {', '.join(LLAMA_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[type]
    params.nthread = threads or torch.get_num_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise CompressError(f"llama.cpp could not quantize {Path(src).name} to {type} (return code {rc})")


# ----------------------------------------------------------------------------------------------------------------
# Protocol


def perplexity_windows(tokenizer, spec: str, seq_len: int = 512, max_tokens: int | None = 20480,
                       bos: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids [n, seq_len], scored [n, seq_len], protocol): evaluate.py's non-overlapping windows of spec's test split."""
    from compress import data, evaluate

    stream = data.token_ids(tokenizer, spec, "test")
    ids, scored, _ = evaluate.causal_windows(stream, seq_len, max_tokens, None, data.bos_id(tokenizer) if bos else None)
    protocol = {
        "metric": "perplexity", "source": spec, "split": "test",
        "fingerprint": data.fingerprint(data.split_texts(spec, "test")),
        "tokenizer": data.tokenizer_fingerprint(tokenizer)[:16], "seq_len": seq_len, "stride": None, "bos": bos,
        "max_tokens": max_tokens, "n_windows": len(ids),
    }
    return ids, scored, protocol


def decode_prompt(tokenizer) -> list[int]:
    """BOS + evaluate.DECODE_PROMPT as ids (the prompt of evaluate.decode_speed)."""
    from compress import evaluate

    prompt = tokenizer(evaluate.DECODE_PROMPT, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(prompt)


def torch_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [T] -> float32 logits [T, vocab] of an HF causal LM (on its device, no KV cache)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=torch.as_tensor(ids).view(1, -1).to(device), use_cache=False)
        return out.logits[0].float().cpu()

    return logits


def window_stats(ref: torch.Tensor | None, cand: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> dict:
    """Sums over one window's scored targets: nll, n, and against ref (when given) kld and top1 agreement.

    ref, cand: logits [T, V]; ids, scored: [T]. Position t predicts ids[t+1]; it counts when scored[t+1].
    """
    from compress.evaluate import divergence, nll_sum

    nll, n = nll_sum(cand.view(1, *cand.shape), ids.view(1, -1), scored.view(1, -1))
    out = {"nll": nll, "n": n}
    if ref is not None:
        out["kld"], out["top1"], _ = divergence(ref.view(1, *ref.shape), cand.view(1, *cand.shape), scored.view(1, -1))
    return out


def compare(ids: torch.Tensor, scored: torch.Tensor, reference: Callable | None, candidates: dict[str, Callable],
            progress: Callable | None = None) -> dict:
    """Perplexity of the reference and every candidate, and each candidate's KLD / top-1 agreement to it.

    One pass over the windows: each window's reference logits are computed once and compared with every
    candidate's, so memory holds one window's logits per model. Returns {name: {"perplexity", "kld", "top1",
    "n_tokens", "seconds"}} with "reference" for the reference.
    """
    names = (["reference"] if reference is not None else []) + list(candidates)
    acc = {k: {"nll": 0.0, "n": 0, "kld": 0.0, "top1": 0, "seconds": 0.0} for k in names}
    rows = range(len(ids)) if progress is None else progress(range(len(ids)))
    for r in rows:
        ref = None
        if reference is not None:
            t0 = time.perf_counter()
            ref = reference(ids[r])
            acc["reference"]["seconds"] += time.perf_counter() - t0
            s = window_stats(None, ref, ids[r], scored[r])
            acc["reference"]["nll"] += s["nll"]
            acc["reference"]["n"] += s["n"]
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            lg = fn(ids[r])
            acc[name]["seconds"] += time.perf_counter() - t0
            s = window_stats(ref, lg, ids[r], scored[r])
            for k, v in s.items():
                acc[name][k] += v
    out = {}
    for k, a in acc.items():
        res = {"perplexity": math.exp(a["nll"] / a["n"]), "n_tokens": a["n"], "seconds": round(a["seconds"], 3)}
        if k != "reference" and reference is not None:
            res["kld"] = a["kld"] / a["n"]
            res["top1"] = a["top1"] / a["n"]
        out[k] = res
    return out

