"""GPTQ and RTN weight quantization, and the GPTQ v1 checkpoint format, in plain torch.

GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022, https://arxiv.org/abs/2210.17323. Notation follows the paper and IST-DASLab's
reference gptq.py: W [rows, columns] is a linear's weight (rows = output features), X its calibration inputs,
H = 2 X X^T / n the layer Hessian, Hinv the upper Cholesky factor of H^-1, Q the quantized weight.

    g = GPTQ(W)                       # W [rows, columns]; several linears reading one input may be stacked by rows
    for x in batches: g.add_batch(x)  # x [..., columns]
    res = g.quantize(bits=4, group_size=128, sym=True, act_order=False)
    layer = QuantLinear.from_result(res, bias)   # packed v1 buffers, forward dequantizes in torch

RTN (`rtn(W, ...)`) is round-to-nearest with the same quantizer and the same output, as the baseline.

The checkpoint format is GPTQ "v1" (AutoGPTQ's, `checkpoint_format: gptq`), read by transformers+optimum+gptqmodel,
GPTQModel and vLLM. Per quantized linear with in_features K, out_features N, G = ceil(K / group_size) groups:
    qweight int32 [K*bits/32, N]   codes along the input dim as a little-endian bit stream in 32-bit words
                                   (2/4/8 bits: 32/bits codes per word, code j at bit j*bits; 3 bits: 32 codes per
                                   3 words, codes straddling word boundaries)
    qzeros  int32 [G, N*bits/32]   zero points minus one ("v1"), packed the same way along the output dim
    scales  fp16  [G, N]
    g_idx   int32 [K]              group of each input column (not monotone with act_order)
    bias    fp16  [N]              when the linear has one
    W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]),  zero = (stored + 1) & maxq
A last partial group (SmolLM2: 576 inputs with group 128 -> 4 groups of 128 and one of 64) is an ordinary group.
A group's parameters come from its weights as the current block (`blocksize` columns) began, as in the
reference: a group that starts inside a block does not see the block's earlier updates (it scored better at
group 64 on SmolLM2-135M: bench/results/gptq_vs_peers.md); with group_size >= blocksize groups start with
blocks and nothing changes.

Choices that differ from the reference, each for the format's sake:
- scales are rounded to fp16 before the codes are chosen, so GPTQ's error feedback sees the weights the
  checkpoint will really hold, and Q equals the dequantized checkpoint exactly (in fp32);
- asymmetric zero points are kept >= 1, because v1 stores zero-1 and GPTQModel/vLLM add the 1 back without a
  mask (a stored -1 would overflow into the next code); a group that would get zero 0 widens its range instead;
- symmetric scales use max|w| on both sides even when a group has no negative weight (the reference clips it);
- `group_aware` (GAR, GPTQModel's default) processes whole groups in order of importance, and the columns of
  each group by importance, keeping g_idx monotone (desc_act false in the checkpoint).

Not supported: the GPTQ v2 format (zero points without the -1), other pack dtypes than int32, Conv2d, MSE grid
search for scales, in_features not a multiple of 32/bits (32 for 3 bits), 3-bit with out_features not a multiple of 32.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError

BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------------------------------------------
# Quantizer math


def quant_params(W: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for the columns in W [rows, cols]; scale is fp16-representable, zero an integer >= 1."""
    maxq = 2**bits - 1
    xmin = W.min(dim=1).values.clamp(max=0)  # [rows]
    xmax = W.max(dim=1).values.clamp(min=0)  # [rows]
    if sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16_scale(2 * amax / maxq)
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = _fp16_scale((xmax - xmin) / maxq)
    low = torch.round(-xmin / scale) < 1
    if low.any():  # v1 stores zero-1: widen the negative side just enough that zero rounds to 1
        xmin = torch.where(low, -xmax / (maxq - 1), xmin)
        scale = torch.where(low, _fp16_scale((xmax - xmin) / maxq), scale)
    zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 (what the checkpoint stores), staying strictly positive and finite."""
    return scale.clamp(min=2**-24 * 4, max=65504.0).to(torch.float16).to(torch.float32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] (as float) for w with broadcastable scale/zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantResult:
    """A quantized weight: codes, group parameters and statistics. Rows = output features."""

    Q: torch.Tensor          # [rows, cols] fp32, the dequantized weight (== scales[g_idx] * (codes - zeros[g_idx]))
    codes: torch.Tensor      # [rows, cols] uint8 in [0, 2**bits - 1]
    scales: torch.Tensor     # [n_groups, rows] fp32, fp16-representable
    zeros: torch.Tensor      # [n_groups, rows] int32 in [1, 2**bits - 1]
    g_idx: torch.Tensor      # [cols] int32 group of each input column
    bits: int
    group_size: int          # as configured (-1 = one group per row)
    weight_err: torch.Tensor | None = None  # [rows] sum over columns of (W - Q)^2
    error: torch.Tensor | None = None  # [rows] mean over calibration tokens of (W x - Q x)^2 per output row
    energy: torch.Tensor | None = None  # [rows] mean over tokens of (W x)^2, to make errors relative
    damp_percent: float | None = None  # dampening that made H positive definite
    seconds: float = 0.0

    def rows(self, r0: int, r1: int) -> "QuantResult":
        """The part of a stacked result that belongs to output rows [r0, r1) (one of several stacked linears)."""
        return QuantResult(
            Q=self.Q[r0:r1], codes=self.codes[r0:r1], scales=self.scales[:, r0:r1], zeros=self.zeros[:, r0:r1],
            g_idx=self.g_idx, bits=self.bits, group_size=self.group_size,
            weight_err=None if self.weight_err is None else self.weight_err[r0:r1],
            error=None if self.error is None else self.error[r0:r1],
            energy=None if self.energy is None else self.energy[r0:r1],
            damp_percent=self.damp_percent, seconds=self.seconds,
        )


def _check(bits: int, group_size: int, columns: int) -> int:
    """Validate bits/group_size; return the effective group size."""
    if bits not in BITS:
        raise CompressError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise CompressError(f"group_size must be -1 (per output channel) or > 0, got {group_size}")
    return columns if group_size == -1 else group_size


def rtn(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Round-to-nearest baseline: each group's (scale, zero) from its own weights, then round. W [rows, cols]."""
    with _single_thread(W.device):  # small per-group ops: see GPTQ.quantize
        return _rtn(W, bits, group_size, sym)


def _rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    t0 = time.perf_counter()
    W = W.detach().float()
    rows, cols = W.shape
    gs = _check(bits, group_size, cols)
    maxq = 2**bits - 1
    n_groups = math.ceil(cols / gs)
    scales = torch.empty(n_groups, rows)
    zeros = torch.empty(n_groups, rows)
    codes = torch.empty_like(W)
    for g in range(n_groups):
        c0, c1 = g * gs, min((g + 1) * gs, cols)
        s, z = quant_params(W[:, c0:c1], bits, sym)
        scales[g], zeros[g] = s, z
        codes[:, c0:c1] = quantize_codes(W[:, c0:c1], s[:, None], z[:, None], maxq)
    g_idx = torch.arange(cols, dtype=torch.int32) // gs
    Q = _dequant(codes, scales, zeros, g_idx)
    return QuantResult(
        Q=Q, codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
        bits=bits, group_size=group_size, weight_err=((W - Q) ** 2).sum(dim=1), seconds=time.perf_counter() - t0,
    )


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes [rows, cols], scales/zeros [G, rows], g_idx [cols] -> W [rows, cols] fp32."""
    g = g_idx.long()
    return scales.float()[g].t() * (codes.float() - zeros.float()[g].t())


# ----------------------------------------------------------------------------------------------------------------
# GPTQ


class GPTQ:
    """Hessian accumulation and the GPTQ column-by-column quantization with lazy block updates (paper Alg. 1)."""

    def __init__(self, W: torch.Tensor):
        self.W = W.detach()  # [rows, columns]
        self.rows, self.columns = W.shape
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=W.device)  # sum of x x^T
        self.nsamples = 0  # calibration tokens seen
        # On CPU only the upper triangle is accumulated, in row strips (see add_batch); `hessian` mirrors it.
        self.strip = (128 if self.columns <= 1024 else 256) if W.device.type == "cpu" else 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate X X^T from a batch of layer inputs inp [..., columns].

        H is symmetric, and torch has no symmetric rank-k update (BLAS syrk), so on CPU the upper triangle is
        accumulated in row strips H[i:i+s, i:] += X[:, i:i+s]^T X[:, i:], about half the multiply-adds of one
        full matmul: [4096 tokens x 1536] 114 -> 68 ms, x 576 15 -> 10 ms on this project's 2-core CPU (strip
        256 and 128, the fastest of 128..384 measured there); H accumulation was a fifth of GPTQ's time on
        SmolLM2-135M before (21 of 111 s under cProfile).
        One full matmul on GPUs, where a few large kernels beat many smaller ones."""
        X = inp.reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)  # [tokens, columns]
        if self.strip and self.columns > self.strip:
            XT = X.t()
            for i in range(0, self.columns, self.strip):
                self.H[i:i + self.strip, i:].addmm_(XT[i:i + self.strip], X[:, i:])
        else:
            self.H.addmm_(X.t(), X)
        self.nsamples += X.shape[0]

    def hessian(self) -> torch.Tensor:
        """The accumulated sum of x x^T as a full symmetric matrix (a new tensor)."""
        if self.strip and self.columns > self.strip:
            full = self.H.triu()
            full += self.H.triu(1).t()
            return full
        return self.H.clone()

    @torch.no_grad()
    def quantize(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        act_order: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        blocksize: int = 128,
        group_aware: bool = False,
    ) -> QuantResult:
        """Quantize W to minimise ||W X - Q X||^2; returns codes, group parameters, Q and the per-row error.

        On CPU this runs on one intra-op thread: it is a long chain of small and medium ops (one column at a
        time), where thread synchronisation costs more than it saves (4-5x slower with 2 threads on a busy
        2-core machine). The matmuls that dominate calibration (H accumulation, block forwards) keep every thread.
        """
        if self.nsamples == 0:
            raise CompressError("GPTQ got no calibration inputs for a layer (was it never called?)")
        with _single_thread(self.W.device):
            return self._quantize(bits, group_size, sym, act_order, static_groups, damp_percent, blocksize,
                                  group_aware and not act_order)

    def _quantize(self, bits, group_size, sym, act_order, static_groups, damp_percent, blocksize,
                  group_aware) -> QuantResult:
        t0 = time.perf_counter()
        W = self.W.float().clone()
        rows, cols = W.shape
        gs = _check(bits, group_size, cols)
        maxq = 2**bits - 1
        n_groups = math.ceil(cols / gs)
        H = self.hessian().mul_(2.0 / self.nsamples)  # H = 2 X X^T / n (the undamped one is rebuilt for the error)

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        scales = torch.empty(n_groups, rows, device=W.device)
        zeros = torch.empty(n_groups, rows, device=W.device)
        if static_groups:  # group parameters from the original weights, before any update or permutation
            for g in range(n_groups):
                scales[g], zeros[g] = quant_params(W[:, g * gs:(g + 1) * gs], bits, sym)

        perm = None
        group_of = list(range(n_groups))  # k-th group in processing order -> its group in the original columns
        if act_order:  # columns with the largest Hessian diagonal first
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        elif group_aware:  # groups stay contiguous, so g_idx stays monotone
            perm, group_of = group_aware_order(torch.diag(H), gs)
        if perm is not None:  # one permuted copy alive at a time: H is [cols, cols] (14336^2 fp32: 0.8 GB)
            W = W[:, perm]
            H = H[perm]
            H = H[:, perm]
        # group of the j-th processed column: static groups follow the original column, dynamic ones the order
        if perm is not None and static_groups:
            col_group = (perm // gs).tolist()
        else:
            col_group = [group_of[j // gs] for j in range(cols)]

        def rebuild() -> torch.Tensor:  # H as above, for a retry with more dampening (H itself is damped in place)
            H = self.hessian().mul_(2.0 / self.nsamples)
            H[dead, dead] = 1
            return H if perm is None else H[perm][:, perm]

        owned = [H]  # handed over: the Cholesky steps free it as soon as L exists
        del H
        Hinv, damp_used = _cholesky_inverse_upper(owned, damp_percent, rebuild)

        # Work on W^T [cols, rows] so that a column of W is a contiguous row for the per-column updates.
        WT = W.t().contiguous()  # [cols, rows]
        del W
        QT = torch.zeros_like(WT)
        CT = torch.zeros_like(WT)
        scale = zero = None
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            W1 = WT[i1:i2].clone()  # [count, rows]
            Q1, C1, Err1 = QT[i1:i2], CT[i1:i2], torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1).tolist()
            for i in range(count):
                j = i1 + i
                if static_groups:
                    g = col_group[j]
                    scale, zero = scales[g], zeros[g]
                elif j % gs == 0:  # a new group starts: parameters from its weights as this block began
                    g = col_group[j]
                    scale, zero = quant_params(WT[j:j + gs].t(), bits, sym)
                    scales[g], zeros[g] = scale, zero
                w, c, q, err = W1[i], C1[i], Q1[i], Err1[i]
                torch.div(w, scale, out=c).add_(zero).round_().clamp_(0, maxq)  # codes
                torch.sub(c, zero, out=q).mul_(scale)                           # dequantized
                torch.sub(w, q, out=err).div_(d[i])                             # (w - q) / [Hinv]_ii
                W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)               # update the block's rest
            WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy batch update of the remaining columns
        del Hinv, WT
        Q, codes = QT.t(), CT.t()  # [rows, cols]

        g_idx = torch.tensor(col_group, dtype=torch.int32, device=QT.device)
        if perm is not None:
            invperm = torch.argsort(perm)
            Q, codes, g_idx = Q[:, invperm], codes[:, invperm], g_idx[invperm]

        # the GPTQ objective per output row: (W - Q) H (W - Q)^T / 2 = mean over tokens of (W x - Q x)^2
        W0 = self.W.float()
        dW = W0 - Q
        Hraw = self.hessian().mul_(2.0 / self.nsamples)  # undamped, as H was before dead columns and dampening
        error = ((dW @ Hraw) * dW).sum(dim=1) / 2
        energy = ((W0 @ Hraw) * W0).sum(dim=1) / 2
        return QuantResult(
            Q=Q, codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
            bits=bits, group_size=group_size, weight_err=(dW**2).sum(dim=1), error=error, energy=energy,
            damp_percent=damp_used,
            seconds=time.perf_counter() - t0,
        )


def group_aware_order(d: torch.Tensor, gs: int) -> tuple[torch.Tensor, list[int]]:
    """Group-aware reordering (GAR; Gafni, Karnieli, Hanani 2025, arXiv 2505.14638), as GPTQModel's default.

    d: diag(H) [cols]. The columns of each group of gs stay together; groups are processed by decreasing
    max d, the columns inside a group by decreasing d, and a last partial group (cols % gs) comes last, so
    processing-order group k is original group group_of[k] and every group's parameters are found from
    its own columns (as the earlier blocks left them). Unlike act_order, g_idx stays monotone (no desc_act at
    inference).
    Returns (perm [cols]: processing position -> original column, group_of [n_groups]).
    """
    cols = d.numel()
    n_full = cols // gs
    full = d[: n_full * gs].view(n_full, gs)                                     # (G, gs)
    order = torch.argsort(full.max(dim=1).values, descending=True, stable=True)  # (G,)
    inner = torch.argsort(full, dim=1, descending=True, stable=True)              # (G, gs)
    perm = (order[:, None] * gs + inner[order]).flatten()                         # (G * gs,)
    group_of = order.tolist()
    if cols > n_full * gs:
        tail = torch.arange(n_full * gs, cols, device=d.device)
        perm = torch.cat([perm, tail[torch.argsort(d[tail], descending=True, stable=True)]])
        group_of.append(n_full)
    return perm, group_of


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """Run a stretch of tiny CPU ops on one intra-op thread (thread sync costs more than it saves there)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cholesky_inverse_upper(owned: list, damp_percent: float, rebuild) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, H = owned.pop() (the caller keeps no reference);
    doubles the dampening until H is positive definite. H is damped in place and let go once L exists, so at
    most two [C, C] matrices are alive here (H then L, L then its inverse, the inverse then Hinv), beside the
    solver's accumulated sum; a retry (rare) gets a fresh H from `rebuild`."""
    H = owned.pop()
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    while damp < 1.0 + 1e-9:
        if H is None:
            H = rebuild()
        H.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        H = None
        if info.item() == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            Hinv, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0:
                return Hinv, damp
        damp *= 2
    raise CompressError(
        "GPTQ: the layer Hessian is not positive definite even with damp_percent 1.0; "
        "use more calibration samples or method: rtn"
    )


# ----------------------------------------------------------------------------------------------------------------
# Packing (GPTQ v1 layout)


def _words_to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [K, N] (values < 2**bits) along dim 0 into int32 [K*bits/32, N], a little-endian bit stream."""
    K, N = codes.shape
    if bits not in BITS:
        raise CompressError(f"bits must be one of {BITS}, got {bits}")
    if (K * bits) % 32:
        raise CompressError(f"cannot pack {K} rows of {bits}-bit codes into 32-bit words ({K}*{bits} % 32 != 0)")
    out = torch.empty(K * bits // 32, N, dtype=torch.int32)
    chunk = 32 * 256  # rows per chunk (a multiple of 32) bounds the int64 temporaries
    for k0 in range(0, K, chunk):
        c = codes[k0:k0 + chunk].to(torch.int64)  # [k, N]
        k = c.shape[0]
        if 32 % bits == 0:
            pf = 32 // bits  # codes per word
            shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
            words = (c.view(k // pf, pf, N) << shifts).sum(dim=1)  # [k/pf, N]
        else:  # 3 bits: explode to a bit stream, regroup by 32
            bitpos = torch.arange(bits, dtype=torch.int64).view(1, bits, 1)
            stream = ((c.unsqueeze(1) >> bitpos) & 1).reshape(k * bits // 32, 32, N)  # [words, 32, N]
            words = (stream << torch.arange(32, dtype=torch.int64).view(1, 32, 1)).sum(dim=1)
        out[k0 * bits // 32:(k0 + k) * bits // 32] = _words_to_int32(words)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [K*bits/32, N] -> int32 codes [K, N]."""
    words, N = packed.shape
    if words * 32 != K * bits:
        raise CompressError(f"packed tensor has {words} words per column, expected {K}*{bits}/32")
    p = packed.to(torch.int32)
    if 32 % bits == 0:
        pf = 32 // bits
        shifts = (torch.arange(pf, dtype=torch.int32, device=p.device) * bits).view(1, pf, 1)
        return ((p.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(K, N)
    shifts = torch.arange(32, dtype=torch.int32, device=p.device).view(1, 32, 1)
    stream = ((p.unsqueeze(1) >> shifts) & 1).reshape(K, bits, N)  # bit b of code k at stream position k*bits+b
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=p.device)).view(1, bits, 1)
    return (stream * weights).sum(dim=1, dtype=torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [G, N] along dim 1 into int32 [G, N*bits/32] (the qzeros layout)."""
    return pack_rows(values.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Inverse of pack_cols: int32 [G, N*bits/32] -> int32 [G, N]."""
    return unpack_rows(packed.t().contiguous(), bits, N).t().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# QuantLinear: the checkpoint's module


class QuantLinear(nn.Module):
    """A linear layer stored as GPTQ v1 buffers (qweight, qzeros, scales, g_idx, bias); forward dequantizes in torch.

    The dequantized weight is cached per (device, dtype) unless `cache=False`; the cache is not part of the
    state dict and is rebuilt when any buffer changes (load_state_dict, .to()).
    """

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
        cache: bool = True, bias_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        gs = _check(bits, group_size, in_features)
        if (in_features * bits) % 32:
            raise CompressError(
                f"a {bits}-bit GPTQ layer needs in_features*{bits} divisible by 32; got in_features {in_features}"
            )
        if (out_features * bits) % 32:
            raise CompressError(
                f"a {bits}-bit GPTQ layer needs out_features*{bits} divisible by 32 (qzeros); got {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.cache = cache
        n_groups = math.ceil(in_features / gs)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // gs)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._cached: tuple | None = None

    @classmethod
    @torch.no_grad()
    def from_result(
        cls, res: QuantResult, bias: torch.Tensor | None, bias_dtype: torch.dtype = torch.float16, cache: bool = True
    ) -> "QuantLinear":
        """Pack a QuantResult (rows = out_features) into v1 buffers."""
        out_features, in_features = res.codes.shape
        m = cls(in_features, out_features, res.bits, res.group_size, bias=bias is not None, cache=cache,
                bias_dtype=bias_dtype)
        m.qweight.copy_(pack_rows(res.codes.t().contiguous().cpu(), res.bits))  # codes [in, out]
        stored = (res.zeros.cpu().to(torch.int64) - 1) & (2**res.bits - 1)  # v1 stores zero - 1
        m.qzeros.copy_(pack_cols(stored, res.bits))
        m.scales.copy_(res.scales.cpu().to(torch.float16))
        m.g_idx.copy_(res.g_idx.cpu().to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach().cpu().to(bias_dtype))
        return m.to(res.codes.device)

    def codes(self) -> torch.Tensor:
        """Integer codes [out, in]."""
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        """Zero points [G, out] (v1: stored + 1, masked)."""
        stored = unpack_cols(self.qzeros, self.bits, self.out_features)
        return (stored + 1) & (2**self.bits - 1)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in]: scales[g_idx] * (codes - zeros[g_idx]), computed in fp32."""
        g = self.g_idx.long()
        codes = unpack_rows(self.qweight, self.bits, self.in_features)  # [in, out]
        W = self.scales.float()[g] * (codes.float() - self.zeros().float()[g])  # [in, out]
        return W.t().to(dtype)

    def _key(self, dtype: torch.dtype) -> tuple:
        bufs = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return (dtype, self.qweight.device, *((b.data_ptr(), b._version) for b in bufs))

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype` on the buffers' device (cached when self.cache)."""
        if not self.cache:
            return self.dequantize(dtype)
        key = self._key(dtype)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.dequantize(dtype))
        return self._cached[1]

    def clear_cache(self) -> None:
        self._cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_for(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def storage_bits(m: QuantLinear) -> int:
    """Bits the checkpoint spends on this layer's weight: qweight + qzeros + scales + g_idx (bias excluded)."""
    return sum(b.numel() * b.element_size() * 8 for b in (m.qweight, m.qzeros, m.scales, m.g_idx))


# ----------------------------------------------------------------------------------------------------------------
# Loading


def quantization_config(
    *, bits: int, group_size: int, sym: bool, desc_act: bool, true_sequential: bool, damp_percent: float,
    static_groups: bool, modules_in_block_to_quantize: list[list[str]] | None = None,
    block_name_to_quantize: str | None = None, modules_to_not_convert: list[str] | None = None,
    skipped: list[str] | None = None,
) -> dict:
    """The config.json `quantization_config` of a GPTQ v1 checkpoint (as transformers/optimum/GPTQModel read it)."""
    qc = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq", "true_sequential": true_sequential, "damp_percent": damp_percent,
        "static_groups": static_groups, "pack_dtype": "int32",
    }
    if block_name_to_quantize:
        qc["block_name_to_quantize"] = block_name_to_quantize
    if modules_in_block_to_quantize is not None:
        qc["modules_in_block_to_quantize"] = modules_in_block_to_quantize
    if modules_to_not_convert:
        qc["modules_to_not_convert"] = list(modules_to_not_convert)
    if skipped:  # per-layer exclusions in GPTQModel/vLLM's `dynamic` syntax ("-:" = do not quantize)
        qc["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
    return qc


def name_matches(full_name: str, patterns: list[str]) -> bool:
    """True when a module's dotted name equals a pattern, ends with '.'+pattern, or matches it as a regex."""
    for p in patterns:
        if full_name == p or full_name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, full_name):
                return True
        except re.error:
            continue
    return False


def prepare_for_load(model: nn.Module, quantization_config: dict, cache: bool = True) -> nn.Module:
    """Swap the linears a GPTQ v1 checkpoint quantized for empty QuantLinear skeletons (in place; returns model).

    Converted: every nn.Linear/Conv1D inside the decoder blocks, restricted to `modules_in_block_to_quantize`
    when given, minus `modules_to_not_convert` and GPTQModel-style `dynamic` "-:" exclusions. Fused MoE experts
    become per-expert linears first (compress/moe.py), as the gptq stage quantized them. Names in the config are
    the checkpoint's (compress/families.py `to_disk`: Mixtral's block_sparse_moe.experts.E.w1); skip patterns
    match either spelling. Then `model.load_state_dict(checkpoint)` fills qweight/qzeros/scales/g_idx/bias.
    """
    from compress import families, moe
    from compress.modeling import decoder_layers_with_name, linear_shape, linears, set_submodule

    qc = quantization_config
    if qc.get("quant_method") != "gptq":
        raise CompressError(f"prepare_for_load got quant_method {qc.get('quant_method')!r}, expected 'gptq'")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt != "gptq":
        raise CompressError(f"GPTQ checkpoint_format {fmt!r} is not supported; only v1 ('gptq') checkpoints load")
    bits, group_size = int(qc["bits"]), int(qc.get("group_size", 128))
    inside = qc.get("modules_in_block_to_quantize")
    inside = None if inside is None else {n for group in inside for n in group}
    skip = list(qc.get("modules_to_not_convert") or [])
    skip += [k[2:] for k in (qc.get("dynamic") or {}) if k.startswith("-:")]
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    bias_dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float16
    fam = families.find(model)
    disk = fam.to_disk if fam is not None else (lambda n: n)
    moe.unfuse(model, copy=False)
    layers_name, layers = decoder_layers_with_name(model)
    for i, block in enumerate(layers):
        for name, lin in linears(block).items():
            full = f"{layers_name}.{i}.{name}"
            if (inside is not None and disk(name) not in inside) or name_matches(full, skip) or \
                    name_matches(disk(full), skip):
                continue
            in_features, out_features = linear_shape(lin)
            q = QuantLinear(in_features, out_features, bits, group_size, bias=lin.bias is not None, cache=cache,
                            bias_dtype=bias_dtype)
            set_submodule(block, name, q.to(lin.weight.device))
    return model
