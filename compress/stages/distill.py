"""distill: DistilBERT-style knowledge distillation (Sanh et al. 2019, https://arxiv.org/abs/1910.01108).

A smaller student learns to imitate a frozen teacher: soft targets at temperature T (KL), its own LM loss,
and the direction of the teacher's hidden states (cosine); the loss core is compress/algorithms/kd.py, the
training loop compress/train.py (`fit`: AdamW, warmup + cosine, accumulation, clipping, bf16 on CUDA,
resumable checkpoints, DDP/FSDP through accelerate). DistilGPT2 is the same recipe on GPT-2.

    stages:
      - distill: {layers: 15, tokens: 2_000_000, seq_len: 512}   # student = 15 of the 30 layers
      - distill: {teacher: base, tokens: 1_000_000}              # after prune: learn from the original model

Who is who:
- No `teacher`: the incoming model is the teacher and the student is built from it by keeping `layers` of
  its layers (default: half, rounded down), chosen by `init` (kd.select_layers: `alternate` = evenly spaced
  with the first and last kept, DistilBERT's [0, 2, 4, 7, 9, 11] for 12 -> 6; `first`; `last`). Embeddings,
  norms, the head and the kept layers are copied exactly; the layer count and every per-layer config list
  (compress/families.py: `layer_types`, Qwen3-MoE's `mlp_only_layers`) follow the kept layers.
- `teacher: REF`: REF is `base` or an earlier stage's name (loaded with ctx.load_model), a local model
  folder, or `zoo:NAME`; the incoming model is the student as it is. Both must share the tokenizer's vocab.
The teacher runs in eval mode under no_grad with requires_grad off; its logits are computed on the fly.

Loss (kd.distillation_loss): alpha_kl * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha_lm * LM + alpha_cos *
(1 - cos) + alpha_mse * MSE + alpha_pool * (1 - cos of mean-pooled states) + alpha_sim * MSE of the batch's
pooled cosine-similarity matrices; defaults 5 / 2 / 1 / 0 / 0 / 0, T = 2 (pool: 1 for bare encoders).
- Causal LMs: next-token LM loss on the blocks; KL over every position.
- Masked LMs (…ForMaskedLM): BERT's masking (15%: 80% mask token, 10% random, 10% kept) of the input both
  models see; MLM loss and KL on the masked positions (as DistilBERT), hidden-state terms on every position.
- Bare encoders (no LM head: MiniLM, BertModel): no logits, so KL and LM are off (alpha_kl/alpha_lm default
  to 0 and may not be set > 0); embedding distillation with cos on token states plus alpha_pool (default 1
  here) on the mean-pooled sentence embedding that compress.evaluate's agreement metric compares. Their
  pooler is frozen (nothing trains it).
- `hidden_layers: last` compares the final hidden states (HF's hidden_states[-1]; after the final norm in
  Llama); `mapped` compares every student layer i with teacher layer map(i) (kd.layer_map: the last teacher
  layer of the block of layers student layer i replaces; for a given student, TinyBERT's uniform map).
- Student narrower than the teacher (e.g. after `prune` with `hidden`): a learned projection W [d_t, d_s]
  (TinyBERT) maps student states before the hidden-state terms; it is trained with the student, then dropped.

Text: the stage's `data` (or the pipeline's data.train) train splits, domains mixed uniformly, as rows of
`inputs`: `blocks` = contiguous token windows of seq_len (language models), `sentences` = one sentence per row
with the tokenizer's special tokens, padded and attention-masked (data.sentence_rows: what a sentence embedder
is used on, and what the agreement metric embeds; the default for bare encoders). steps = ceil(tokens / (
batch_size * real tokens per row * grad_accum * processes)), real tokens per row = seq_len for blocks, the mean
sentence length for sentences. Stats: the loss and
each term over time (downsampled), the distillation terms on held-out validation blocks before and after,
student and teacher shapes, parameter ratio, the teacher reference and content hash.

Not supported: caching teacher logits to disk (`cache_teacher`: batches are drawn at random from the
domains, so a cache would need a logits store per block; the teacher runs every step), dynamic batch
loading (use a `train` stage), attention-map losses, quantized students (distill before gptq/int8),
teachers with another tokenizer, DistilBERT's frequency-smoothed masking and its removal of token-type
embeddings and pooler.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import memory
from compress import train as engine
from compress.algorithms import kd
from compress.errors import CompressError

NAME = "distill"
DISTRIBUTED = True  # under `accelerate launch` every process runs it, on its own shard (compress/pipeline.py)
HIDDEN_LAYERS = ("last", "mapped")
INPUTS = ("auto", "blocks", "sentences")
MLM_SEED = 0  # masking of the validation blocks (the before/after measurement) is fixed by this seed


@dataclass
class Config:
    teacher: str | None = None        # null: the incoming model teaches a student built from it; else base | stage | folder | zoo:NAME
    layers: int | None = None         # student depth when built from the teacher (default: half); not with `teacher`
    init: str = "alternate"           # which teacher layers the student starts from: alternate | first | last
    temperature: float = 2.0          # T: softens both distributions so the student sees how the teacher ranks wrong tokens
    alpha_kl: float | None = None     # soft-target weight; null = 5.0 (DistilBERT) with an LM head, 0 for bare encoders
    alpha_lm: float | None = None     # the student's own (M)LM loss; null = 2.0 with an LM head, 0 for bare encoders
    alpha_cos: float = 1.0            # 1 - cos(student, teacher hidden states): aligns directions (DistilBERT: 1.0)
    alpha_mse: float = 0.0            # MSE on hidden states (TinyBERT-style); scale-sensitive, off by default
    alpha_pool: float | None = None   # 1 - cos of mean-pooled embeddings; null = 1.0 for bare encoders, 0 otherwise
    alpha_sim: float = 0.0            # MSE of the batch's pooled cosine-similarity matrices: the geometry agreement scores
    hidden_layers: str = "last"       # last (DistilBERT) | mapped: every student layer against its teacher layer
    inputs: str = "auto"              # blocks (token windows) | sentences (one padded sentence per row) | auto: sentences for bare encoders
    mlm_probability: float = 0.15     # masked LMs: fraction of tokens masked (BERT's 15%)
    tokens: int = 1_000_000           # token budget over all processes; sets the number of steps
    batch_size: int = 8               # sequences per micro-batch per process (memory: teacher + student logits)
    seq_len: int = 512                # tokens per training block
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 5e-4                  # peak learning rate (DistilBERT: 5e-4); the student moved far from its init
    warmup: float = 0.05              # fraction of steps of linear warmup (DistilBERT: 5%)
    weight_decay: float = 0.0         # AdamW decay on matrices
    min_lr_ratio: float = 0.1         # cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0        # gradient clipping (0 = off)
    save_every: int = 100             # steps between resumable checkpoints in the stage's work dir (0 = none)
    data: list[str] | str | None = None  # text specs (domains); default: the pipeline's data.train
    eval_tokens: int = 16384          # validation tokens (all domains) for the before/after distillation loss
    mixed_precision: str = "auto"     # auto (bf16 autocast on CUDA, none on CPU) | bf16 | no

    def __post_init__(self):
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher.strip()):
            raise CompressError(
                f"distill.teacher must be a stage name, a model folder or zoo:NAME, got {self.teacher!r}"
            )
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                        or self.layers < 1):
            raise CompressError(f"distill.layers must be an integer >= 1 (or null for half), got {self.layers!r}")
        if self.teacher is not None and self.layers is not None:
            raise CompressError(
                "distill.layers builds a student from the incoming model; with distill.teacher the incoming model "
                "is the student as it is: remove one of them"
            )
        if self.init not in kd.INITS:
            raise CompressError(f"distill.init must be one of {', '.join(kd.INITS)}, got {self.init!r}")
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise CompressError(
                f"distill.hidden_layers must be one of {', '.join(HIDDEN_LAYERS)}, got {self.hidden_layers!r}"
            )
        if self.inputs not in INPUTS:
            raise CompressError(f"distill.inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise CompressError(f"distill.temperature must be > 0, got {self.temperature!r}")
        for name in ("alpha_kl", "alpha_lm", "alpha_cos", "alpha_mse", "alpha_pool", "alpha_sim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise CompressError(f"distill.{name} must be a number >= 0, got {v!r}")
        if not 0 < self.mlm_probability < 1:
            raise CompressError(f"distill.mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        for name in ("tokens", "batch_size", "grad_accum", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CompressError(f"distill.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise CompressError(f"distill.seq_len must be an integer >= 3, got {self.seq_len!r}")
        if self.eval_tokens < self.seq_len:
            raise CompressError(f"distill.eval_tokens must be >= seq_len ({self.seq_len}), got {self.eval_tokens}")
        if not self.lr > 0:
            raise CompressError(f"distill.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise CompressError(f"distill.warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CompressError(f"distill.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.save_every < 0:
            raise CompressError("distill.weight_decay, max_grad_norm and save_every must be >= 0")
        if self.mixed_precision not in engine.MIXED_PRECISION:
            raise CompressError(
                f"distill.mixed_precision must be one of {', '.join(engine.MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.data is not None and (not self.data or not all(isinstance(d, str) and d for d in self.data)):
            raise CompressError(f"distill.data must be a text spec or a non-empty list of them, got {self.data!r}")


# ----------------------------------------------------------------------------- student and teacher


def build_student(teacher, layers: int, init: str = "alternate"):
    """A copy of `teacher` that keeps `layers` of its layers (kd.select_layers); returns (student, idx, sliced).

    The student is built fresh from the teacher's config cut to the kept layers (compress/families.py: the
    layer count, every per-layer list such as `layer_types`, layer-index lists such as Qwen3-MoE's
    `mlp_only_layers`; `sliced` names the lists that changed), so everything a family sets up per layer at
    init (attention windows, KV-cache slots, dense or MoE blocks) is right; then every tensor is copied
    exactly from the teacher (the kept layers renumbered): embeddings, norms, head, tied weights.
    """
    from compress import families
    from compress.modeling import decoder_layers_with_name

    fam = families.of(teacher)
    name, blocks = decoder_layers_with_name(teacher)
    n = len(blocks)
    if layers > n:
        raise CompressError(f"distill.layers {layers} exceeds the teacher's {n} layers; pick 1..{n}")
    idx = kd.select_layers(n, layers, init)
    before = teacher.config.to_dict()
    after = fam.cut_layers(before, idx)
    sliced = sorted(k for k in after if k != fam.keys.layers and after[k] != before.get(k))
    dtype = next(teacher.parameters()).dtype
    student = type(teacher)._from_config(type(teacher.config).from_dict(after), dtype=dtype)
    prefix = name + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            i, rest = key[len(prefix):].split(".", 1)
            if int(i) not in idx:
                continue
            key = f"{prefix}{idx.index(int(i))}.{rest}"
        state[key] = value
    student.load_state_dict(state, strict=True)
    student.to(next(teacher.parameters()).device)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student, idx, sliced


def load_teacher(ref: str, ctx):
    """(model, tokenizer, content hash, folder) of a teacher reference: stage name, folder or zoo:NAME."""
    from compress import checkpoint, sources

    if ref.startswith("zoo:"):
        folder = sources.folder_of(ref)
    elif ref == "base" or ref in ctx.stage_paths:
        folder = ctx.resolve_model_ref(ref)
    elif Path(ref).expanduser().is_dir():
        folder = Path(ref).expanduser()
    else:
        known = ", ".join(["base", *ctx.stage_paths])
        raise CompressError(
            f"distill.teacher {ref!r} is neither an earlier stage ({known}), a model folder, nor zoo:NAME"
        )
    if ref == "base" or ref in ctx.stage_paths:
        model, tok = ctx.load_model(ref)
    else:
        model, tok = checkpoint.load(folder, device=ctx.device, trust_remote_code=ctx.trust_remote_code)
    return model, tok, checkpoint.content_hash(Path(folder)), str(folder)


def check_compatible(teacher, t_tok, student, s_tok) -> None:
    """Same kind of model and the same token ids on both sides, else a CompressError naming the mismatch."""
    from compress.evaluate import model_kind

    kt, ks = model_kind(teacher), model_kind(student)
    if kt != ks:
        raise CompressError(f"distill: the teacher is a {kt} model ({type(teacher).__name__}) and the student "
                            f"a {ks} one ({type(student).__name__}); both need the same kind of head")
    vt, vs = _vocab(teacher), _vocab(student)
    if vt != vs:
        raise CompressError(f"distill: vocabulary mismatch, teacher {vt} tokens vs student {vs}; "
                            "the teacher must use the student's tokenizer")
    if t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise CompressError("distill: the teacher's tokenizer maps tokens to other ids than the student's; "
                            "use a teacher with the student's tokenizer")


def _vocab(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.get_input_embeddings().weight.shape[0])


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def _hidden(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


# ----------------------------------------------------------------------------- the loss on a batch


@dataclass
class _Setup:
    kind: str                          # causal | masked | bare
    weights: kd.Weights
    pairs: list[tuple[int, int]]       # (student layer, teacher layer), 0-based; hidden_states index = layer + 1
    proj: nn.Module | None
    mask_id: int | None
    vocab: int
    special: list[int]
    mlm_probability: float
    pad_id: int | None = None          # sentence rows: positions holding it are padding (None: blocks, no padding)


def _unpad(ids: torch.Tensor, s: _Setup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids cut to the batch's longest row, attention mask) for sentence rows; (ids, None) for blocks."""
    if s.pad_id is None:
        return ids, None
    mask = ids != s.pad_id                                               # (B, L)
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width].long()


class _LengthGrouped:
    """The mixture's sentence rows in batches of similar length, cut to their longest row, with their attention mask.

    Sentences vary from a few tokens to seq_len, and a batch costs its longest row times its size: drawn as they
    come, a batch of 64 rows averaging 25 tokens is padded to about 128, five times the work. So `pool` batches
    are drawn at a time, their rows sorted by length and cut back into batches, served in a shuffled order (HF
    Trainer's group_by_length, same idea). The rows and their number are the mixture's, only their grouping
    changes. The training loop counts the mask's ones (real tokens). Checkpoints keep the mixture's state at the
    pool's start and the position in it, so a resumed run sees the same batches."""

    def __init__(self, mixture, setup: _Setup, pool: int = 16, seed: int = 0):
        self.mixture, self.setup, self.pool, self.seed = mixture, setup, pool, seed
        self._start, self._index, self._pos, self._batches = None, -1, 0, []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pos == len(self._batches):
            self._fill(self._index + 1)
        ids, mask = _unpad(self._batches[self._pos], self.setup)
        self._pos += 1
        return {"input_ids": ids, "attention_mask": mask}

    def _fill(self, index: int) -> None:
        """Draw pool `index`: `pool` batches from the mixture, regrouped by length, in a shuffled order."""
        self._start = copy.deepcopy(self.mixture.state_dict())
        rows = torch.cat([next(self.mixture)["input_ids"] for _ in range(self.pool)])        # [pool * B, L]
        order = (rows != self.setup.pad_id).sum(1).argsort(stable=True)
        b = len(rows) // self.pool
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        self._batches = [rows[order[i * b:(i + 1) * b]] for i in torch.randperm(self.pool, generator=g).tolist()]
        self._index, self._pos = index, 0

    def state_dict(self) -> dict:
        if self._start is None:                      # nothing drawn yet
            return {"mixture": copy.deepcopy(self.mixture.state_dict()), "index": -1, "pos": 0}
        return {"mixture": self._start, "index": self._index, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(copy.deepcopy(state["mixture"]))
        self._start, self._index, self._pos, self._batches = None, state["index"], 0, []
        if state["index"] >= 0:                      # redraw the pool it was in, then skip what it had served
            self._fill(state["index"])
            self._pos = state["pos"]


def _prepare(ids: torch.Tensor, s: _Setup, generator=None):
    """(inputs, LM labels or None, KL positions or None) for one batch of blocks (B, L)."""
    if s.kind == "masked":
        return kd.mask_tokens(ids, s.mask_id, s.vocab, s.special, s.mlm_probability, generator)
    if s.kind == "causal":
        return ids, (ids if s.weights.lm > 0 else None), None
    return ids, None, None


def _batch_loss(student, teacher, inputs, labels, kl_mask, s: _Setup, attention_mask=None):
    kw = {"use_cache": False} if s.kind == "causal" else {}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    need_h = s.weights.uses_hidden
    with torch.no_grad():
        t_out = teacher(input_ids=inputs, output_hidden_states=need_h, **kw)
    if labels is not None and s.weights.lm > 0:
        kw["labels"] = labels
    s_out = student(input_ids=inputs, output_hidden_states=need_h, **kw)
    pairs = [(s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]) for i, j in s.pairs] if need_h else []
    return kd.distillation_loss(
        s.weights, getattr(s_out, "logits", None), getattr(t_out, "logits", None), pairs,
        lm=s_out.loss if "labels" in kw else None, kl_mask=kl_mask, proj=s.proj,
        token_mask=None if attention_mask is None else attention_mask.bool(),
    )


@torch.no_grad()
def _measure(student, teacher, blocks: torch.Tensor, s: _Setup, batch_size: int, device) -> dict[str, float]:
    """Mean of every logged term over validation blocks (student in eval mode, fixed MLM masks)."""
    was_training = student.training
    student.eval()
    g = torch.Generator().manual_seed(MLM_SEED)
    sums: dict[str, float] = {}
    for i in range(0, len(blocks), batch_size):
        ids, mask = _unpad(blocks[i:i + batch_size], s)                      # (b, L) on CPU
        inputs, labels, kl_mask = (None if t is None else t.to(device) for t in _prepare(ids, s, g))
        mask = None if mask is None else mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total, logs = _batch_loss(student, teacher, inputs, labels, kl_mask, s, mask)
        for k, v in {"loss": total, **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(ids)
    student.train(was_training)
    return {k: v / len(blocks) for k, v in sums.items()}


# ----------------------------------------------------------------------------- the stage


def _weights(cfg: Config, kind: str) -> kd.Weights:
    has_logits = kind != "bare"
    if not has_logits:
        for name in ("alpha_kl", "alpha_lm"):
            if getattr(cfg, name):
                raise CompressError(f"distill.{name} needs an LM head; this bare encoder has none: set {name}: 0 "
                                    "(embedding distillation uses alpha_cos, alpha_mse, alpha_pool, alpha_sim)")
    pick = lambda v, default: float(default if v is None else v)  # noqa: E731
    w = kd.Weights(
        kl=pick(cfg.alpha_kl, 5.0 if has_logits else 0.0), lm=pick(cfg.alpha_lm, 2.0 if has_logits else 0.0),
        cos=float(cfg.alpha_cos), mse=float(cfg.alpha_mse), pool=pick(cfg.alpha_pool, 0.0 if has_logits else 1.0),
        sim=float(cfg.alpha_sim), temperature=float(cfg.temperature),
    )
    if not (w.kl or w.lm or w.uses_hidden):
        raise CompressError("distill: every alpha is 0; set at least one of alpha_kl, alpha_lm, alpha_cos, "
                            "alpha_mse, alpha_pool, alpha_sim > 0")
    return w


def _domains(cfg: Config, ctx) -> list[str]:
    specs = cfg.data if cfg.data is not None else ctx.data.get("train")
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise CompressError("distill has no data: set distill.data, or data.train in the pipeline (text specs)")
    return list(specs)


def run(model, tokenizer, cfg: Config, ctx):
    """Distill into a student (built from the incoming model, or the incoming model itself); return it and stats."""
    from compress import data
    from compress.evaluate import model_kind
    from compress.modeling import decoder_layers

    if getattr(model.config, "quantization_config", None):
        raise CompressError("distill trains the incoming model (or a student built from it) and this one is "
                            "quantized; put the distill stage before gptq/int8")
    state = engine.process_state(ctx)
    device = state.device
    domains = _domains(cfg, ctx)

    # -- teacher and student
    if cfg.teacher is None:
        teacher, t_ref, t_hash, t_path = model, "input", None, None
        n = len(decoder_layers(teacher))
        m = cfg.layers if cfg.layers is not None else max(1, n // 2)
        student, idx, sliced = build_student(teacher, m, cfg.init)
        built = True
    else:
        teacher, t_tok, t_hash, t_path = load_teacher(cfg.teacher, ctx)
        t_ref = cfg.teacher
        check_compatible(teacher, t_tok, model, tokenizer)
        student, built, sliced = model, False, []
        n, m = len(decoder_layers(teacher)), len(decoder_layers(student))
        idx = None
    check_compatible(teacher, None, student, None)
    kind = model_kind(student)
    w = _weights(cfg, kind)
    if cfg.hidden_layers == "mapped" and m > n:
        raise CompressError(f"distill.hidden_layers: mapped needs a student with at most the teacher's {n} layers, "
                            f"this one has {m}; use hidden_layers: last")
    if cfg.hidden_layers == "mapped":
        hmap = kd.layer_map(idx, n) if idx is not None else kd.uniform_map(n, m)
        pairs = [(i, hmap[i]) for i in range(m)]
    else:
        pairs = [(m - 1, n - 1)]

    teacher.eval()
    teacher.requires_grad_(False)
    teacher.to(device)
    student.requires_grad_(True)
    frozen = []  # a bare encoder's pooler gets no gradient from any term (and DDP refuses unused parameters)
    for name, p in student.named_parameters():
        if kind == "bare" and name.split(".")[0] == "pooler":
            p.requires_grad_(False)
            frozen.append(name)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in student.parameters()):
        ctx.log("[distill] the student's weights are 16-bit: updates below their resolution are lost; "
                "distill before a cast stage")

    torch.manual_seed(ctx.seed)
    d_s, d_t = _hidden(student), _hidden(teacher)
    proj = None
    if d_s != d_t and w.uses_hidden:
        proj = nn.Linear(d_s, d_t, bias=False)
        nn.init.orthogonal_(proj.weight)
        ctx.log(f"[distill] student width {d_s} != teacher width {d_t}: a learned projection maps student states")
    special = list(tokenizer.all_special_ids)
    if kind == "masked" and tokenizer.mask_token_id is None:
        raise CompressError("distill of a masked LM needs a tokenizer with a mask token")
    setup = _Setup(kind=kind, weights=w, pairs=pairs, proj=proj, mask_id=tokenizer.mask_token_id,
                   vocab=_vocab(student), special=special, mlm_probability=cfg.mlm_probability)

    # -- data
    inputs = cfg.inputs if cfg.inputs != "auto" else ("sentences" if kind == "bare" else "blocks")
    per_domain = max(cfg.seq_len, cfg.eval_tokens // len(domains))
    if inputs == "sentences":
        setup.pad_id = tokenizer.pad_token_id
        if kind == "causal":
            raise CompressError("distill.inputs: sentences is for encoders; a causal LM learns from token blocks")
        train_blocks = {d: data.sentence_rows(tokenizer, d, "train", cfg.seq_len) for d in domains}  # [n_i, T] padded
        val = torch.cat([data.sentence_rows(tokenizer, d, "validation", cfg.seq_len, max_tokens=per_domain)
                         for d in domains])
        row_tokens = float(torch.cat([(b != setup.pad_id).sum(1) for b in train_blocks.values()]).float().mean())
    else:
        train_blocks = {d: data.token_blocks(tokenizer, d, "train", cfg.seq_len) for d in domains}  # each [n_i, T]
        val = torch.cat([data.token_blocks(tokenizer, d, "validation", cfg.seq_len, max_tokens=per_domain)
                         for d in domains])                                                           # [n_val, T]
        row_tokens = float(cfg.seq_len)
    tokens_per_step = round(cfg.batch_size * row_tokens * cfg.grad_accum * state.num_processes)  # real tokens
    steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    ctx.log(f"[distill] {n}-layer teacher ({t_ref}) -> {m}-layer student, {steps} steps of {tokens_per_step} tokens")

    student.to(device)
    if proj is not None:
        proj.to(device)
    start = _measure(student, teacher, val, setup, cfg.batch_size, device)
    mixture = engine.DomainMixture(train_blocks, cfg.batch_size, seed=ctx.seed, rank=state.process_index,
                                   world_size=state.num_processes)

    def loss_fn(wrapped, batch):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch   # [B, T]
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        inputs, labels, kl_mask = _prepare(ids, setup)
        return _batch_loss(wrapped, teacher, inputs, labels, kl_mask, setup, mask)

    tcfg = engine.TrainConfig(
        steps=steps, lr=cfg.lr, warmup_steps=round(cfg.warmup * steps), min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm or None,
        save_every=cfg.save_every, mixed_precision=cfg.mixed_precision, name="distill",
    )
    groups = [{"params": list(proj.parameters()), "lr": cfg.lr}] if proj is not None else []
    batches = _LengthGrouped(mixture, setup, seed=ctx.seed) if setup.pad_id is not None else mixture
    result = engine.fit(student, batches, loss_fn, tcfg, ctx, extra_param_groups=groups)
    end = _measure(student, teacher, val, setup, cfg.batch_size, device)

    n_s, n_t = _n_params(student), _n_params(teacher)
    terms = [k for k in ("kd", "kl", "lm", "cos", "mse", "pool", "sim") if any(k in r for r in result.history)]
    stats = {
        "teacher": {"ref": t_ref, "path": t_path, "hash": t_hash, "layers": n, "hidden": d_t, "params": n_t},
        "student": {"layers": m, "hidden": d_s, "params": n_s, "built_from_teacher": built,
                    "init": cfg.init if built else None, "teacher_layers": idx, "config_lists_sliced": sliced,
                    "frozen": frozen},
        "param_ratio": n_s / n_t,
        "kind": kind,
        "weights": {"kl": w.kl, "lm": w.lm, "cos": w.cos, "mse": w.mse, "pool": w.pool, "sim": w.sim,
                    "temperature": w.temperature},
        "hidden_pairs": [list(p) for p in pairs],
        "projection": [d_t, d_s] if proj is not None else None,
        "steps": steps, "tokens": result.tokens, "tokens_per_step": tokens_per_step,
        "train_seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from_step": result.resumed_from, "processes": state.num_processes, "domains": domains,
        "inputs": inputs, "mean_row_tokens": round(row_tokens, 2), "val_blocks": int(len(val)),
        "val_start": start, "val_end": end,
        "loss_curve": engine.downsample(result.history, "loss", 100),
        "loss_terms": {k: engine.downsample(result.history, k, 100) for k in terms},
    }
    del teacher
    return student, stats


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: a student trained on the teacher's softened logits (KL at temperature T: fp32
    copies, scaling and (log-)softmax of both, ~6 x B*S*V*4), its own LM loss, and the cosine of hidden states
    (the teacher's hidden states of every layer kept, no grad). Without `teacher` the student is a new model of
    `layers` of the input's layers and the input teaches; with it the input is the student, trained in place,
    and the teacher's weights are loaded."""
    memory.require_plain(state, NAME)
    shape, a = state.shape, state.act_bytes
    batch, seq = cfg.batch_size, cfg.seq_len
    if cfg.teacher is None:
        teacher = state
        layers = cfg.layers if cfg.layers is not None else max(1, shape.layers // 2)
        student = shape.with_changes(num_hidden_layers=layers) if layers != shape.layers else shape
    else:
        teacher, student = where.states.get(str(cfg.teacher), state), shape
    autocast = memory.autocast(cfg.mixed_precision, where.kind)
    terms = memory.training_terms(student, a, batch, seq, autocast, new_weights=cfg.teacher is None,
                                  fsdp=where.fsdp)
    if cfg.teacher is not None and teacher is not where.input:
        terms["teacher weights"] = teacher.weights_bytes()
    t_a = 2 if autocast else teacher.act_bytes
    hidden_states = (teacher.shape.layers + 1) * batch * seq * teacher.shape.hidden * t_a
    if teacher.shape.logits and shape.logits:
        n = batch * seq * shape.vocab
        terms["teacher logits + hidden states"] = n * t_a + hidden_states
        terms["soft targets + KL"] = 6 * n * 4
    else:  # bare encoders: embedding distillation, no logits (compress/stages/distill.py)
        terms["teacher hidden states"] = hidden_states
    terms["teacher forward (one layer)"] = memory.inference_layer_bytes(teacher.shape, t_a, batch, seq)
    domains = memory.text_domains(cfg.data, where.data.get("train"))
    terms["training text"] = memory.data_bytes(shape, [(d, sp) for sp in ("train", "validation") for d in domains])
    return memory.training_parts(terms, state, where, dataclasses.replace(state, shape=student), trained=student,
                                 trains_input=cfg.teacher is not None)


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    return memory.training_tips(cfg, state, kind, fits)
