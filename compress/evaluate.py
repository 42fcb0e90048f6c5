"""Evaluation under a recorded protocol: perplexity, encoder agreement, speed, optional lm-eval tasks.

    eval: {perplexity: [zoo:austen, zoo:shakespeare], seq_len: 512, max_tokens: 20480}   # pipeline YAML

Every number comes with the protocol that produced it (source, split, split fingerprint, seq_len, stride,
bos, tokens scored, windows, dtype, device), so two numbers are compared only when protocols match.

Perplexity (causal LMs) = exp(mean token NLL) on the TEST split of each source (compress/data.py):
- Non-overlapping (stride null): the windows are exactly `data.token_blocks(tok, src, "test", seq_len,
  max_tokens, bos)`: [BOS] + seq_len-1 stream tokens each (bos=True), at most max_tokens // seq_len of them.
  Every token after position 0 is scored, so n_tokens = n_windows * (seq_len - 1).
- Sliding (stride < seq_len-1 with BOS, < seq_len without): the same span of the stream (the tokens the
  non-overlapping windows cover) is read by full-length windows starting every `stride` stream tokens, the
  last one aligned to the span's end; each window scores only the tokens no earlier window scored, so every
  token is scored once, with at least seq_len-stride positions (BOS included) before it after the first window.
  With bos=True each window still starts with BOS. stride >= the tokens a window holds = non-overlapping.
- NLL is computed in float32 (logits upcast) whatever the model's dtype, summed in float64.
Pseudo-perplexity (masked LMs, `…ForMaskedLM`): the same non-overlapping blocks; in each block exactly
max(1, round(0.15 * k)) of its k stream tokens (never the leading BOS/CLS) are replaced by the mask token, chosen
by one torch.Generator seeded 0 that walks the blocks in order; exp(mean NLL of the original tokens at the
masked positions). One masking pass, not the token-by-token PLL of Salazar et al. (2020); stride is refused.
Agreement (any model; the default for bare encoders such as MiniLM, on the perplexity sources): the test
split cut into sentences (split after . ! ? ; 3 to 64 words kept), the first 2*agreement_pairs of them
paired as consecutive (s0, s1), (s2, s3), ...; embeddings = attention-masked mean of the last hidden
state (tokenizer's own special tokens, truncated to seq_len). spearman = rank correlation (average ranks
for ties) between the model's and the base model's pair cosines; mean_cosine = mean cosine between the
model's and the base's embedding of each sentence (null when hidden sizes differ). Without base_model the
model is compared with itself (protocol "reference": "self"), which gives the 1.0 reference row.
Speed: eval_tokens_per_s = tokens fed / seconds in the model's forward over the perplexity windows (or the
agreement batches of a bare encoder), after one untimed warmup batch; decode_tokens_per_s (causal LMs) =
decode_tokens / seconds of one greedy `generate` at batch 1 with KV cache, from BOS + the fixed
DECODE_PROMPT (its prefill included in the time), after an untimed warmup generate.
lm-eval tasks (optional extra `compress[eval]`): lm_eval's HFLM wraps the in-memory causal LM; a task entry
that is a directory or a .yaml file is added to TaskManager's include_path and its `task:` names run.

Not supported: perplexity of bare encoders (use agreement), stride for masked LMs, lm-eval on non-causal models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compress import data, memory
from compress.errors import CompressError

MLM_MASK_RATE = 0.15       # fraction of each block's tokens masked for pseudo-perplexity
MLM_MASK_SEED = 0          # the masking generator's seed (part of the protocol)
AGREEMENT_BATCH = 32       # sentences per forward when embedding
DECODE_PROMPT = "Once upon a time, in a quiet village by the sea,"


@dataclass
class EvalConfig:
    perplexity: list[str] = field(default_factory=list)  # sources whose TEST split is scored (zoo:, .txt, .jsonl, hf:)
    seq_len: int = 512                   # tokens per window, BOS included: longer = more context per token
    max_tokens: int | None = 20480       # cap on tokens fed per source (n_windows * seq_len); null = whole split
    stride: int | None = None            # null = non-overlapping windows; smaller = sliding, more context, slower
    bos: bool = True                     # start every window with BOS (CLS for BERT tokenizers)
    batch_size: int = 4                  # windows per forward: memory vs speed, does not change the number
    speed: bool = True                   # measure eval and decode throughput
    decode_tokens: int = 32              # new tokens generated for decode tokens/s (causal LMs)
    agreement: list[str] = field(default_factory=list)  # sources for encoder agreement; default: perplexity's for bare encoders
    agreement_pairs: int = 256           # sentence pairs per agreement source: more = steadier spearman, slower
    kl: bool = True                      # causal LMs: KL(base || model) and top-1 agreement over the same windows
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, or paths to task YAML files/dirs
    limit: int | None = None             # lm-eval: examples per task (quick checks; not comparable to full runs)

    def __post_init__(self):
        for key in ("perplexity", "agreement", "tasks"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise CompressError(f"eval.{key} must be a list of strings, got {value!r}")
            setattr(self, key, list(value))
        for spec in [*self.perplexity, *self.agreement]:
            data.check_spec(spec)
        _positive_int("seq_len", self.seq_len, minimum=3 if self.bos is True else 2)
        _positive_int("batch_size", self.batch_size)
        _positive_int("decode_tokens", self.decode_tokens)
        _positive_int("agreement_pairs", self.agreement_pairs, minimum=2)
        if self.max_tokens is not None:
            _positive_int("max_tokens", self.max_tokens, minimum=self.seq_len)
        if self.stride is not None:
            _positive_int("stride", self.stride)
            if self.stride > self.seq_len:
                raise CompressError(f"eval.stride must be <= seq_len ({self.seq_len}), got {self.stride}")
        if self.limit is not None:
            _positive_int("limit", self.limit)
        for key in ("bos", "speed", "kl"):
            if not isinstance(getattr(self, key), bool):
                raise CompressError(f"eval.{key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "EvalConfig":
        """Build from a YAML mapping; unknown keys are an error naming the valid ones."""
        d = dict(d or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise CompressError(f"unknown eval key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return cls(**d)


def _positive_int(key: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CompressError(f"eval.{key} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- entry point


# Keys of a recorded protocol that describe the model and machine measured, not the measurement: two numbers
# whose protocols differ only in these are comparable (a bf16 model's perplexity against its fp32 base's).
RUN_KEYS = ("dtype", "stored_dtype", "device")


def same_protocol(a: dict | None, b: dict | None) -> bool:
    """True when two recorded protocols measure the same thing (they may differ in RUN_KEYS)."""
    if a is None or b is None:
        return a is b
    strip = lambda p: {k: v for k, v in p.items() if k not in RUN_KEYS}  # noqa: E731
    return strip(a) == strip(b)


def _quant_method(model) -> str | None:
    """config.quantization_config's quant_method (a dict, or a transformers config object), None when plain."""
    qc = getattr(model.config, "quantization_config", None) or {}
    return dict(qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method")


def upcast_float16_on_cpu(model, device) -> str | None:
    """On a CPU, compute a float16 model in float32, in place; return "float16" when it did, else None.

    CPUs have no fast float16 matmul (several times slower than float32 or bfloat16), and every float16 value
    is exact in float32, so the weights are unchanged; activations get float32 precision, as CPU runtimes
    (llama.cpp, ONNX Runtime) compute float16 models. Protocols record it as stored_dtype.
    bitsandbytes int8 models are left as they are (their kernels choose their own compute dtype).
    """
    if torch.device(device).type != "cpu" or _quant_method(model) not in (None, "gptq"):
        return None
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float16 not in floats:
        return None
    model.float()
    return "float16"


def _upcast_onloaded(model, device) -> str | None:
    """upcast_float16_on_cpu's decision for a model evaluated a block at a time: it then computes each block in
    float32 as it runs (compress.onload.computed_in), with no float32 copy of the whole model."""
    if torch.device(device).type != "cpu" or _quant_method(model) not in (None, "gptq"):
        return None
    return "float16" if any(p.dtype == torch.float16 for p in model.parameters()) else None


def _upcast_dtype(model, device) -> torch.dtype | None:
    return torch.float32 if _upcast_onloaded(model, device) else None


def run(model, tokenizer, cfg: EvalConfig, device, base_model=None, onload: bool = False) -> dict:
    """Evaluate `model` (already on `device`, or with `onload` on the host, run one block at a time on `device`)
    under `cfg`: {"accuracy": {...}, "speed": {...}}.

    A float16 model on a CPU is computed in float32 (`upcast_float16_on_cpu`, in place: pass a model that is
    loaded for evaluation; not when onloaded, which would copy it whole); every protocol then records
    stored_dtype float16. Onloaded, decode speed is not measured (a model bigger than the device decodes at the
    speed of its host-to-device copies, which says nothing about the model).
    """
    device = torch.device(device)
    if onload and (model_kind(model) != "causal" or cfg.agreement or cfg.tasks):
        raise CompressError("evaluation one block at a time (offload) covers causal LMs' perplexity, KL and top-1; "
                            "agreement and lm-eval tasks need the whole model on the device (offload: never)")
    if _quant_method(model) == "bitsandbytes":
        from compress import measure

        with measure.mmap_threshold():  # bitsandbytes' many small buffers per matmul (see compress.measure)
            return _run(model, tokenizer, cfg, device, base_model, onload)
    return _run(model, tokenizer, cfg, device, base_model, onload)


def _run(model, tokenizer, cfg: EvalConfig, device, base_model=None, onload: bool = False) -> dict:
    stored = _upcast_onloaded(model, device) if onload else upcast_float16_on_cpu(model, device)
    kind = model_kind(model)
    meter = _Throughput(device)
    accuracy: dict = {}
    modes = [(m, m.training) for m in {id(m): m for m in (model, base_model) if m is not None}.values()]
    for m, _ in modes:
        m.eval()
    try:
        if cfg.perplexity and kind in ("causal", "masked"):
            reference = (model if base_model is None else base_model) if cfg.kl and kind == "causal" else None
            accuracy["perplexity"] = {
                spec: perplexity(model, tokenizer, spec, cfg, device, meter=meter if cfg.speed else None,
                                 reference=reference, onload=onload)
                for spec in cfg.perplexity
            }
        sources = cfg.agreement or (cfg.perplexity if kind == "bare" else [])
        if sources:
            accuracy["agreement"] = {
                spec: agreement(model, tokenizer, spec, cfg, device, base_model=base_model,
                                meter=meter if cfg.speed and "perplexity" not in accuracy else None)
                for spec in sources
            }
        if cfg.tasks:
            accuracy["tasks"] = run_tasks(model, tokenizer, cfg, device)
        speed = {"eval_tokens_per_s": None, "decode_tokens_per_s": None}
        if cfg.speed:
            speed["eval_tokens_per_s"] = meter.rate()
            if kind == "causal" and not onload:
                speed["decode_tokens_per_s"] = decode_speed(model, tokenizer, cfg.decode_tokens, device)
            speed["protocol"] = {
                "eval": meter.what, "eval_tokens": meter.tokens, "batch_size": cfg.batch_size,
                "decode_tokens": cfg.decode_tokens if kind == "causal" and not onload else None, "decode_batch": 1,
                "onload": onload,
                "dtype": _dtype(model, device, onload), "device": str(device),
            }
    finally:
        for m, training in modes:
            m.train(training)
    if stored:
        for protocol in [speed.get("protocol"), *(r.get("protocol") for group in accuracy.values()
                                                  for r in group.values() if isinstance(r, dict))]:
            if isinstance(protocol, dict):
                protocol["stored_dtype"] = stored
    return {"accuracy": accuracy, "speed": speed}


def needs_base(model, cfg: EvalConfig) -> bool:
    """Whether evaluating `model` under `cfg` compares it with the base model: agreement (encoders without an LM
    head) or KL and top-1 agreement (causal LMs, `kl: true`)."""
    kind = model_kind(model)
    return (kind == "bare" and bool(cfg.agreement or cfg.perplexity)) or (kind == "causal" and cfg.kl
                                                                          and bool(cfg.perplexity))


def model_kind(model) -> str:
    """'causal' (…ForCausalLM / …LMHeadModel), 'masked' (…ForMaskedLM) or 'bare' (no LM head)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "bare"


def _dtype(model, device=None, onload: bool = False) -> str:
    """The dtype the model computes in (onloaded float16 on a CPU: float32, as a whole upcast model)."""
    if onload and _upcast_onloaded(model, device):
        return "float32"
    return str(getattr(model, "dtype", next(model.parameters()).dtype)).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Throughput:
    """Tokens fed and seconds spent in timed forwards."""

    def __init__(self, device: torch.device):
        self.device, self.tokens, self.seconds, self.what = device, 0, 0.0, None

    def forward(self, model, what: str, n_tokens: int, **inputs):
        _sync(self.device)
        t0 = time.perf_counter()
        out = model(**inputs)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.tokens += n_tokens
        self.what = self.what or what
        return out

    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def _check_positions(model, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise CompressError(f"eval.seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")


# ----------------------------------------------------------------------------- perplexity


def causal_windows(stream: torch.Tensor, seq_len: int, max_tokens: int | None, stride: int | None,
                   bos: int | None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Windows [n, seq_len] over the stream and the mask [n, seq_len] of positions scored as targets.

    `bos` is the BOS id or None for bos=False. Returns (ids, scored, step) where step is None for
    non-overlapping windows (then ids == data.token_blocks(...)). Algorithm in the module docstring.
    """
    c = seq_len - 1 if bos is not None else seq_len  # stream tokens per window
    nb = data.n_blocks(len(stream), seq_len, max_tokens, bos is not None)
    if nb == 0:
        raise CompressError(f"the test split has {len(stream)} tokens: not one window of seq_len {seq_len}")
    span = nb * c                                    # the stream tokens every protocol variant covers
    step = c if stride is None else min(stride, c)
    starts = [*range(0, span - c, step), span - c]   # the last window ends exactly at the span's end
    off = 1 if bos is not None else 0                # row position of stream token `start`
    ids = torch.empty(len(starts), seq_len, dtype=torch.long)
    scored = torch.zeros(len(starts), seq_len, dtype=torch.bool)
    prev_end = 0
    for row, start in enumerate(starts):
        if bos is not None:
            ids[row, 0] = bos
        ids[row, off:] = stream[start:start + c]
        first = max(prev_end, start + (0 if bos is not None else 1))  # first stream position scored here
        scored[row, first - start + off:] = True
        prev_end = start + c
    return ids, scored, (None if step == c else step)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (float32 logits) over the scored target positions, and their count."""
    targets = ids[:, 1:]                                    # (B, L-1)
    mask = scored[:, 1:].to(logits.device)                  # (B, L-1)
    logp = logits[:, :-1].float()                           # (B, L-1, V)
    nll = F.cross_entropy(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1).to(logits.device),
                          reduction="none").view_as(targets)
    return float(nll[mask].double().sum()), int(mask.sum())


def divergence(ref_logits: torch.Tensor, logits: torch.Tensor, scored: torch.Tensor) -> tuple[float, int, int]:
    """(sum over the scored next-token positions of KL(ref || model), positions whose argmax agrees, positions):
    what quantization users compare besides perplexity. float32, one window at a time (memory of one window's
    log-softmax pair)."""
    kl, agree, n = 0.0, 0, 0
    for r in range(len(logits)):
        mask = scored[r, 1:].to(logits.device)                          # (L-1,)
        p = F.log_softmax(ref_logits[r, :-1].float(), dim=-1)[mask]     # (N, V) the reference
        q = F.log_softmax(logits[r, :-1].float(), dim=-1)[mask]
        kl += float((p.exp() * (p - q)).sum(-1).double().sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += int(mask.sum())
    return kl, agree, n


def perplexity(model, tokenizer, spec: str, cfg: EvalConfig, device, meter: _Throughput | None = None,
               reference=None, onload: bool = False) -> dict:
    """{"value": exp(mean NLL), "protocol": {...}} on the test split of `spec` (causal or masked LM).

    With a `reference` model (causal LMs: the pipeline's base model), also "kl": mean KL(reference || model) per
    scored token and "top1": the share of scored positions whose argmax agrees, over the same windows (the
    reference's forwards are not timed). `reference` may be `model` itself: kl 0, top1 1, no second forward.
    onload: the model (and reference) stay on the host and run one block at a time on `device`
    (compress/onload.py: the same logits); throughput is then the whole pass's, warmup included."""
    device = torch.device(device)
    kind = model_kind(model)
    if kind == "bare":
        raise CompressError(f"{type(model).__name__} has no LM head: use eval.agreement for encoders")
    _check_positions(model, cfg.seq_len)
    stream = data.token_ids(tokenizer, spec, "test")
    bos = data.bos_id(tokenizer) if cfg.bos else None
    if kind == "causal":
        ids, scored, step = causal_windows(stream, cfg.seq_len, cfg.max_tokens, cfg.stride, bos)
        inputs = ids
    else:
        if cfg.stride is not None:
            raise CompressError("eval.stride (sliding windows) applies to causal LMs only; remove it for masked LMs")
        ids = data.token_blocks(tokenizer, spec, "test", cfg.seq_len, cfg.max_tokens, cfg.bos)
        inputs, scored = mlm_mask(ids, tokenizer, cfg.bos)
        step = None
    nll, n = 0.0, 0
    kl, agree, compared = 0.0, 0, 0
    reference = reference if kind == "causal" else None
    if onload and kind != "causal":
        raise CompressError("onloading block by block evaluates causal LMs only")
    starts = range(0, len(ids), cfg.batch_size)
    with torch.no_grad():
        kw = {"use_cache": False} if kind == "causal" else {}
        if onload:
            from compress import onload as ol

            t0 = time.perf_counter()
            batches = [inputs[i:i + cfg.batch_size] for i in starts]
            logits = (out for _, out in ol.logits_by_block(model, batches, device, _upcast_dtype(model, device)))
            refs = (out for _, out in ol.logits_by_block(reference, batches, device, _upcast_dtype(reference, device))) \
                if reference is not None and reference is not model else None
        else:
            if meter is not None:  # untimed warmup (allocator, kernels) so throughput reflects steady state
                model(input_ids=inputs[: cfg.batch_size].to(device), **kw)
            logits = (meter.forward(model, "perplexity windows", inputs[i:i + cfg.batch_size].numel(),
                                    input_ids=inputs[i:i + cfg.batch_size].to(device), **kw).logits
                      if meter is not None else model(input_ids=inputs[i:i + cfg.batch_size].to(device), **kw).logits
                      for i in starts)
            refs = (reference(input_ids=inputs[i:i + cfg.batch_size].to(device), **kw).logits for i in starts) \
                if reference is not None and reference is not model else None
        for i, out in zip(starts, logits):
            if kind == "causal":
                s, k = nll_sum(out, ids[i:i + cfg.batch_size], scored[i:i + cfg.batch_size])
            else:
                s, k = _masked_nll_sum(out, ids[i:i + cfg.batch_size], scored[i:i + cfg.batch_size])
            nll, n = nll + s, n + k
            if refs is not None:
                d, a, c = divergence(next(refs), out, scored[i:i + cfg.batch_size])
                kl, agree, compared = kl + d, agree + a, compared + c
        if onload and meter is not None:
            meter.seconds += time.perf_counter() - t0
            meter.tokens += inputs.numel()
            meter.what = meter.what or "perplexity windows, one block at a time"
    protocol = {
        "metric": "perplexity" if kind == "causal" else "pseudo-perplexity",
        "source": spec, "split": "test", "fingerprint": data.fingerprint(data.split_texts(spec, "test")),
        "tokenizer": data.tokenizer_fingerprint(tokenizer)[:16],
        "seq_len": cfg.seq_len, "stride": step, "bos": cfg.bos, "max_tokens": cfg.max_tokens,
        "n_tokens": n, "n_windows": len(ids), "dtype": _dtype(model, device, onload), "device": str(device),
    }
    if kind == "masked":
        protocol.update(mask_rate=MLM_MASK_RATE, mask_seed=MLM_MASK_SEED)
    result = {"value": math.exp(nll / n), "protocol": protocol}
    if reference is model:  # the base itself: no divergence by definition, nothing to compute
        result.update(kl=0.0, top1=1.0)
        protocol["reference"] = "self"
    elif reference is not None:
        result.update(kl=kl / compared, top1=agree / compared)
        protocol["reference"] = "base"
    return result


def mlm_mask(blocks: torch.Tensor, tokenizer, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked copies of `blocks` and the masked positions (see the module docstring: seeded, 15% per block)."""
    if tokenizer.mask_token_id is None:
        raise CompressError("masked-LM pseudo-perplexity needs a tokenizer with a mask token")
    off = 1 if bos else 0
    k = blocks.shape[1] - off                      # stream tokens per block
    m = max(1, round(MLM_MASK_RATE * k))
    g = torch.Generator().manual_seed(MLM_MASK_SEED)
    scored = torch.zeros_like(blocks, dtype=torch.bool)
    for row in range(len(blocks)):
        scored[row, torch.randperm(k, generator=g)[:m] + off] = True
    return blocks.masked_fill(scored, tokenizer.mask_token_id), scored


def _masked_nll_sum(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> tuple[float, int]:
    """Sum of NLL (float32) of the original tokens at the masked positions, and their count."""
    mask = scored.to(logits.device)
    logp = logits.float()[mask]                    # (M, V)
    nll = F.cross_entropy(logp, ids.to(logits.device)[mask], reduction="none")
    return float(nll.double().sum()), int(mask.sum())


# ----------------------------------------------------------------------------- agreement


def rankdata(x) -> np.ndarray:
    """1-based ranks of x with ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1    # positions i..j share the mean of ranks i+1..j+1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb) or len(ra) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def embed(model, tokenizer, texts: list[str], max_length: int, device, meter: _Throughput | None = None) -> torch.Tensor:
    """Attention-masked mean of the last hidden state, float32 [len(texts), hidden]."""
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), AGREEMENT_BATCH):
            enc = tokenizer(texts[i:i + AGREEMENT_BATCH], truncation=True, max_length=max_length)["input_ids"]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)           # right padding
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, row in enumerate(enc):
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            ids, mask = ids.to(device), mask.to(device)
            kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            res = meter.forward(model, "agreement sentences", int(mask.sum()), **kw) if meter else model(**kw)
            h = res.hidden_states[-1].float()                                    # (B, T, H)
            m = mask.unsqueeze(-1).float()                                       # (B, T, 1)
            out.append(((h * m).sum(1) / m.sum(1)).cpu())                        # (B, H)
    return torch.cat(out)


def agreement(model, tokenizer, spec: str, cfg: EvalConfig, device, base_model=None,
              meter: _Throughput | None = None) -> dict:
    """{"spearman", "mean_cosine", "protocol"}: how well `model`'s sentence geometry matches the base's."""
    device = torch.device(device)
    texts = data.split_texts(spec, "test")
    sents = data.sentences(texts, 2 * cfg.agreement_pairs)
    if len(sents) < 4:
        raise CompressError(f"{spec} test split has {len(sents)} usable sentences; agreement needs at least 4")
    sents = sents[: len(sents) // 2 * 2]
    reference = base_model if base_model is not None else model
    if meter is not None:  # untimed warmup
        embed(model, tokenizer, sents[:AGREEMENT_BATCH], cfg.seq_len, device)
    e = embed(model, tokenizer, sents, cfg.seq_len, device, meter)              # (2P, H)
    e_ref = e if reference is model else embed(reference, tokenizer, sents, cfg.seq_len, device)
    cos = F.cosine_similarity(e[0::2], e[1::2], dim=-1)                         # (P,)
    cos_ref = F.cosine_similarity(e_ref[0::2], e_ref[1::2], dim=-1)
    rho = spearman(cos.numpy(), cos_ref.numpy())
    mean_cos = float(F.cosine_similarity(e, e_ref, dim=-1).mean()) if e.shape[1] == e_ref.shape[1] else None
    return {
        "spearman": None if math.isnan(rho) else rho,
        "mean_cosine": mean_cos,
        "protocol": {
            "metric": "agreement", "source": spec, "split": "test",
            "fingerprint": data.fingerprint(texts), "n_pairs": len(sents) // 2, "pairs": "consecutive sentences",
            "pooling": "masked mean of last hidden state", "max_length": cfg.seq_len,
            "reference": "self" if reference is model else "base", "dtype": _dtype(model), "device": str(device),
        },
    }


# ----------------------------------------------------------------------------- speed


def decode_speed(model, tokenizer, new_tokens: int, device) -> float:
    """Greedy decode tokens/s at batch 1 with KV cache (prefill of a short fixed prompt included)."""
    from transformers import GenerationConfig

    device = torch.device(device)
    prompt = tokenizer(DECODE_PROMPT, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    ids = torch.tensor([([bos] if bos is not None else []) + prompt], device=device)  # (1, P)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def gen(n: int):
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=pad, eos_token_id=eos)
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)

    with torch.no_grad():
        gen(min(4, new_tokens))  # warmup
        _sync(device)
        t0 = time.perf_counter()
        out = gen(new_tokens)
        _sync(device)
        seconds = time.perf_counter() - t0
    produced = out.shape[1] - ids.shape[1]
    return produced / seconds


# ----------------------------------------------------------------------------- lm-eval


def run_tasks(model, tokenizer, cfg: EvalConfig, device) -> dict:
    """lm-eval tasks on the in-memory model: {task: {"metrics": {...}, "protocol": {...}}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompressError("eval tasks need lm-eval: pip install 'compress[eval]'") from None
    if model_kind(model) != "causal":
        raise CompressError(f"eval.tasks run on causal LMs only; {type(model).__name__} is not one")
    names, include = task_names(cfg.tasks)
    manager = TaskManager(include_path=include or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=cfg.limit, task_manager=manager, log_samples=False,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    out = {}
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {})
        out[task] = {
            "metrics": {k: float(v) for k, v in metrics.items()  # lm-eval names them "metric,filter"
                        if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)},
            "protocol": {
                "metric": "lm-eval", "task": task, "limit": cfg.limit, "n_samples": n.get("effective"),
                "num_fewshot": results.get("n-shot", {}).get(task), "lm_eval": getattr(lm_eval, "__version__", None),
                "dtype": _dtype(model), "device": str(torch.device(device)),
            },
        }
    return out


def task_names(entries: list[str]) -> tuple[list[str], list[str]]:
    """(task names, include paths): an entry that is a .yaml file or a folder of them is read for `task:` names."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval YAMLs use tags like `!function utils.f`: read them as None
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names, include = [], []
    for entry in entries:
        path = Path(entry)
        if path.is_dir() or (path.is_file() and path.suffix in (".yaml", ".yml")):
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
            include.append(str((path if path.is_dir() else path.parent).resolve()))
            found = []
            for f in files:
                doc = yaml.load(f.read_text(encoding="utf-8"), Loader=Loader) or {}
                name = doc.get("task") if isinstance(doc.get("task"), str) else doc.get("group")
                if isinstance(name, str):
                    found.append(name)
            if not found:
                raise CompressError(f"no lm-eval task (a `task:` key) in {entry}")
            names.extend(found)
        else:
            names.append(entry)
    return names, list(dict.fromkeys(include))


# ----------------------------------------------------------------------------- memory model (compress/planner.py)


def predict_memory(state: memory.ModelState, cfg: EvalConfig, kind: str = "cpu",
                   reference: memory.ModelState | None = None, onload: bool = False) -> dict:
    """Growth terms of evaluating a model in `state` under `cfg`: the whole model on the device, or onloaded."""
    return onloaded_memory_terms(state, cfg, reference) if onload else memory_terms(state, cfg, kind, reference)


def memory_terms(state: memory.ModelState, cfg, kind: str = "cpu", reference: memory.ModelState | None = None) -> dict:
    """Growth terms of evaluating a model in `state` under `cfg` (an evaluate.EvalConfig), as compress/evaluate.py
    runs it: perplexity windows of seq_len in batches of batch_size with use_cache=False, NLL
    from logits[:, :-1].float() (a copy: bf16 upcast, or the non-contiguous slice when batch > 1) and its
    log-softmax; decode speed: one greedy generate at batch 1 (KV cache of prompt + decode_tokens). On a CPU a
    float16 model (plain or GPTQ) is computed in float32 (evaluate.upcast_float16_on_cpu): a float32 copy of
    its floating tensors, float32 activations. Agreement (bare encoders, or `agreement:` sources): batches of
    evaluate.AGREEMENT_BATCH sentences with every layer's hidden states. `reference` is the base model a stage's
    output is compared with, loaded for the evaluation: an encoder's agreement, or a causal LM's KL and top-1
    (`kl`: the base's logits of the same batch, and a pair of fp32 log-softmax of one window at a time)."""
    shape, a = state.shape, state.act_bytes
    seq, batch, max_tokens = cfg.seq_len, cfg.batch_size, cfg.max_tokens
    if max_tokens and not cfg.stride:
        batch = max(1, min(batch, int(max_tokens) // seq))  # at most max_tokens // seq_len windows per source
    n = batch * seq * shape.vocab
    upcast = {}
    if kind == "cpu" and state.dtype == "float16" and state.format in ("plain", "gptq"):
        upcast["float32 copy (float16 computed in float32 on CPU)"] = state.float_numel() * 4
        a = 4
    specs = cfg.perplexity or []
    agree = cfg.agreement or ([] if shape.logits else specs)  # bare encoders: agreement by default
    ppl_specs = specs if shape.logits else []
    terms = {**upcast}
    # the two kinds of forwards run one after the other: the larger working set is the peak
    phases = {}
    if ppl_specs:  # perplexity windows
        phases["perplexity"] = (batch, {
            "logits": n * a,
            "fp32 logits (upcast or shifted copy)": n * 4 if (a < 4 or batch > 1) else 0,
            "log-softmax": n * 4,
            "layer transient": memory.inference_layer_bytes(shape, a, batch, seq),
        })
        if cfg.kl and reference is not None:
            phases["perplexity"][1]["reference (base) model weights"] = reference.weights_bytes()
            phases["perplexity"][1]["reference logits"] = n * reference.act_bytes
            phases["perplexity"][1]["KL and top-1 (one window's log-softmax pair)"] = 3 * seq * shape.vocab * 4
    if agree:  # agreement: AGREEMENT_BATCH sentences of <= seq_len tokens, output_hidden_states, fp32 mean pool
        B = AGREEMENT_BATCH
        phases["agreement"] = (B, {
            "hidden states of every layer": (shape.layers + 1) * B * seq * shape.hidden * a,
            "fp32 last hidden state and masked copy": 2 * B * seq * shape.hidden * 4,
            "logits": B * seq * shape.vocab * a if shape.logits else 0,
            "layer transient": memory.inference_layer_bytes(shape, a, B, seq),
        })
        if reference is not None:  # the base model, compared against, is read in during the evaluation
            phases["agreement"][1]["reference (base) model weights"] = reference.weights_bytes()
    rows = 0
    if phases:
        rows, peak = max(phases.values(), key=lambda p: sum(p[1].values()))
        terms.update(peak)
    if cfg.speed and cfg.decode_tokens and shape.logits:
        terms["decode kv cache"] = memory.kv_cache_bytes(shape, a, 1, 64 + cfg.decode_tokens)
    if state.format == "gptq":  # QuantLinear caches each dequantized weight in the activation dtype
        terms["dequantized weight cache"] = state.shape.layers * sum(i * o for _, i, o in state.quantized_linears()) * a
    elif state.format == "bnb-int8" and rows:  # LLM.int8 matmul of the largest linear: fp16 x, int8 x, int32 out
        i, o = max(((i, o) for _, i, o in state.quantized_linears()), key=lambda t: t[0] * t[1], default=(0, 0))
        terms["int8 matmul buffers"] = rows * seq * (3 * i + 4 * o)
    if specs or agree:  # one source at a time: the largest test split
        terms["eval text"] = max(memory.data_bytes(shape, [(sp, "test")]) for sp in [*specs, *agree])
    return {k: v for k, v in terms.items() if v}


def onloaded_memory_terms(state: memory.ModelState, cfg, reference: memory.ModelState | None = None) -> dict:
    """Evaluating with the model (and the base, for KL) onloaded one block at a time (compress/onload.py): nothing
    resident but one block, the hidden states of every window of a source (input and output of a block), one
    batch's logits and the head and embeddings the tail reads."""
    shape, a = state.shape, state.act_bytes
    windows = max(1, cfg.max_tokens // cfg.seq_len) if cfg.max_tokens else 64
    batch = min(cfg.batch_size, windows)
    terms = {"one block onloaded": memory.block_bytes(state) + (state.shape.layer_params * a if state.format == "gptq" else 0),
             "hidden states of every window (in and out)": 2 * windows * cfg.seq_len * shape.hidden * a,
             "tail: head and embeddings": shape.vocab * shape.hidden * a * (1 if shape.tied else 2),
             "logits of one batch (+ fp32 copies)": batch * cfg.seq_len * shape.vocab * (a + 8)}
    if cfg.kl and reference is not None:
        terms["reference: one block, its hidden states and logits"] = (
            memory.block_bytes(reference) + 2 * windows * cfg.seq_len * shape.hidden * reference.act_bytes
            + batch * cfg.seq_len * shape.vocab * reference.act_bytes)
        terms["KL and top-1 (one window's log-softmax pair)"] = 3 * cfg.seq_len * shape.vocab * 4
    if cfg.perplexity:
        terms["eval text"] = max(memory.data_bytes(shape, [(sp, "test")]) for sp in cfg.perplexity)
    return terms
