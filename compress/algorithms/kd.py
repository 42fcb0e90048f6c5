"""Knowledge distillation losses and student initialisation (DistilBERT), plain torch.

Sanh, Debut, Chaumond, Wolf 2019, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and
lighter", https://arxiv.org/abs/1910.01108. The student keeps every other layer of the teacher and is
trained on

    L = alpha_kl * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))     soft targets (section 2, "L_ce")
      + alpha_lm * L_lm                                                  the student's own LM / MLM loss
      + alpha_cos * (1 - cos(h_s, h_t))                                  hidden-state direction ("L_cos")

with the paper's defaults 5.0 / 2.0 / 1.0 and T = 2 (its training code); the T^2 factor keeps the soft-target
gradients' scale independent of T (Hinton et al. 2015). KL is averaged over the scored token positions
(PyTorch's KLDivLoss "batchmean" on the [positions, V] rows, as DistilBERT does); the cosine term is averaged
over token positions. Two extra terms serve encoders without an LM head (sentence embedders such as MiniLM):

    + alpha_mse * mean((W h_s - h_t)^2)                                token states (TinyBERT's hidden loss)
    + alpha_pool * (1 - cos(mean_T(W h_s), mean_T(h_t)))               the mean-pooled sentence embedding
                                                                       (last hidden states only)
    + alpha_sim * mean_{j != k}(cos(p_s[j], p_s[k]) - cos(p_t[j], p_t[k]))^2    the batch's embedding geometry
                                                                       (p = pooled embeddings; relational KD)

W is the identity when student and teacher have the same width, else a learned [d_t, d_s] projection
(TinyBERT, Jiao et al. 2019, https://arxiv.org/abs/1909.10351), used for training only.

Which layers (`select_layers`): n teacher layers -> m student layers, 0-based teacher indices
    alternate  i -> floor(i * (n - 1) / (m - 1) + 1/2), i = 0..m-1: evenly spaced, first and last kept
               (m = 1 -> [0]). 12 -> 6 gives DistilBERT's [0, 2, 4, 7, 9, 11]; 30 -> 15 gives
               [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]; 6 -> 3 gives [0, 3, 5].
    first      [0, 1, ..., m-1]
    last       [n-m, ..., n-1]
Which hidden states are compared (`layer_map`): student block i stands in for the teacher blocks from
idx[i] (from 0 for i = 0) up to idx[i+1] (up to n for the last block), so its output is compared with the
output of teacher layer idx[i+1] - 1 (n - 1 for the last). With HF's hidden_states tuples (index 0 = the
embeddings) that is student hidden_states[i + 1] <-> teacher hidden_states[map[i] + 1]. A student that was not
built from the teacher (e.g. a pruned model) uses `uniform_map`: layer i <-> floor((i + 1) n / m + 1/2) - 1
(TinyBERT's g(i) = i n / m, 1-based), e.g. 4 -> 2 layers: [1, 3]; the last always meets the last.

Not supported here: DistilBERT's token-frequency smoothing of the MLM masking, attention-map losses
(TinyBERT, MiniLM), intermediate-layer projections per layer (one W is shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INITS = ("alternate", "first", "last")


# ----------------------------------------------------------------------------- which layers


def select_layers(n: int, m: int, init: str) -> list[int]:
    """The m teacher layer indices (0-based, increasing) a student of m layers is initialised from."""
    if not 1 <= m <= n:
        raise ValueError(f"a student keeps 1..{n} of the teacher's {n} layers, not {m}")
    if init == "alternate":
        if m == 1:
            return [0]
        return [math.floor(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]
    if init == "first":
        return list(range(m))
    if init == "last":
        return list(range(n - m, n))
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def layer_map(idx: list[int], n: int) -> list[int]:
    """Teacher layer (0-based) whose output student layer i's output is compared with, for a student
    initialised from teacher layers idx (module docstring)."""
    m = len(idx)
    return [idx[i + 1] - 1 if i < m - 1 else n - 1 for i in range(m)]


def uniform_map(n: int, m: int) -> list[int]:
    """TinyBERT's uniform map for a student not built from the teacher: layer i <-> floor((i+1) n/m + 1/2) - 1."""
    if not 1 <= m <= n:
        raise ValueError(f"a uniform layer map needs 1 <= student layers <= {n}, got {m}")
    return [math.floor((i + 1) * n / m + 0.5) - 1 for i in range(m)]


# ----------------------------------------------------------------------------- loss terms


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., D) -> (N, D): all positions, or those where mask (...) is True."""
    return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])


def soft_target_kl(z_s: torch.Tensor, z_t: torch.Tensor, T: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), mean over positions; z (B, L, V), mask (B, L) or None.

    Computed in float32 whatever the logits' dtype; exactly 0 when z_s == z_t.
    """
    s = _rows(z_s, mask).float() / T                          # (N, V)
    t = _rows(z_t, mask).float() / T                          # (N, V)
    if s.shape[0] == 0:
        return z_s.sum() * 0.0
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def cosine_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over positions of 1 - cos(h_s, h_t); h (B, L, H) (or (B, H)), mask (B, L) or None."""
    s, t = _rows(h_s, mask).float(), _rows(h_t, mask).float()   # (N, H)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()


def mse_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over positions and features of (h_s - h_t)^2; h (B, L, H), mask (B, L) or None."""
    return F.mse_loss(_rows(h_s, mask).float(), _rows(h_t, mask).float())


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-masked mean over positions: (B, L, H) -> (B, H) (compress.evaluate.embed's pooling)."""
    if mask is None:
        return h.float().mean(dim=1)
    m = mask.unsqueeze(-1).float()                            # (B, L, 1)
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def similarity_loss(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """mean over pairs j != k of (cos(p_s[j], p_s[k]) - cos(p_t[j], p_t[k]))^2; p (B, H): the batch's geometry."""
    a, b = F.normalize(p_s.float(), dim=-1), F.normalize(p_t.float(), dim=-1)
    S_s, S_t = a @ a.T, b @ b.T                               # (B, B) cosine matrices
    off = ~torch.eye(len(a), dtype=torch.bool, device=a.device)
    if not off.any():
        return p_s.sum() * 0.0
    return ((S_s - S_t)[off] ** 2).mean()


@dataclass
class Weights:
    """The alphas of each term and the temperature (DistilBERT: kl 5, lm 2, cos 1, T 2)."""
    kl: float = 5.0
    lm: float = 2.0
    cos: float = 1.0
    mse: float = 0.0
    pool: float = 0.0
    sim: float = 0.0
    temperature: float = 2.0

    @property
    def uses_hidden(self) -> bool:
        return self.cos > 0 or self.mse > 0 or self.pool > 0 or self.sim > 0


def distillation_loss(
    w: Weights,
    z_s: torch.Tensor | None = None,
    z_t: torch.Tensor | None = None,
    hidden_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
    lm: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    proj: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the terms whose alpha is > 0, and each unweighted term (detached) for logging.

    z_s, z_t: logits (B, L, V); kl_mask (B, L): positions whose soft targets count (the masked ones for MLM).
    hidden_pairs: [(h_s, h_t)] of (B, L, H_s), (B, L, H_t) hidden states (last layer, or mapped layers, the
    last layers last); cos and mse average over the pairs, pool uses the last pair. token_mask (B, L):
    non-padding positions (None = all). proj maps H_s -> H_t when the widths differ. lm: the student's own
    LM loss (already a scalar). The returned dict also has "kd": the weighted sum of the distillation
    terms (everything but lm).
    """
    terms: dict[str, torch.Tensor] = {}
    weighted: dict[str, torch.Tensor] = {}
    if w.kl > 0:
        if z_s is None or z_t is None:
            raise ValueError("the soft-target term needs student and teacher logits")
        terms["kl"] = soft_target_kl(z_s, z_t, w.temperature, kl_mask)
        weighted["kl"] = w.kl * terms["kl"]
    if w.uses_hidden:
        if not hidden_pairs:
            raise ValueError("the hidden-state terms need (student, teacher) hidden-state pairs")
        pairs = [(proj(h_s) if proj is not None else h_s, h_t) for h_s, h_t in hidden_pairs]
        for name, alpha, fn in (("cos", w.cos, cosine_loss), ("mse", w.mse, mse_loss)):
            if alpha > 0:
                terms[name] = sum(fn(s, t, token_mask) for s, t in pairs) / len(pairs)
                weighted[name] = alpha * terms[name]
        if w.pool > 0:  # the sentence embedding: the last pair's states only
            s, t = pairs[-1]
            terms["pool"] = cosine_loss(mean_pool(s, token_mask), mean_pool(t, token_mask))
            weighted["pool"] = w.pool * terms["pool"]
        if w.sim > 0:
            s, t = pairs[-1]
            terms["sim"] = similarity_loss(mean_pool(s, token_mask), mean_pool(t, token_mask))
            weighted["sim"] = w.sim * terms["sim"]
    kd = sum(weighted.values()) if weighted else None
    total = kd
    if w.lm > 0:
        if lm is None:
            raise ValueError("alpha_lm > 0 needs the student's LM loss")
        terms["lm"] = lm
        total = w.lm * lm if total is None else total + w.lm * lm
    if total is None:
        raise ValueError("every alpha is 0: nothing to train on")
    logs = {k: v.detach() for k, v in terms.items()}
    if kd is not None:
        logs["kd"] = kd.detach()
    return total, logs


# ----------------------------------------------------------------------------- masked-LM inputs


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: list[int], p: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with probability p; chosen tokens become the mask
    token (80%), a random token (10%) or stay (10%); if none was chosen, the eligible token with the
    smallest draw is. Returns (inputs, labels, chosen): labels = ids at chosen positions, -100 elsewhere;
    all (B, L). Random draws come from `generator` (default: torch's global RNG) on the ids' device.
    """
    dev = ids.device
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    u = torch.rand(ids.shape, generator=generator, device=dev)          # (B, L)
    chosen = (u < p) & ~special
    if not chosen.any() and not special.all():  # a loss needs at least one masked position per batch
        chosen.view(-1)[torch.argmin(u.masked_fill(special, 2.0))] = True
    action = torch.rand(ids.shape, generator=generator, device=dev)     # which replacement
    rand_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=dev)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), rand_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels, chosen
