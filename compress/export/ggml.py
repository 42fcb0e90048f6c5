"""GGML block formats for GGUF files, and the exact re-encoding of GPTQ codes into them.

Formats (llama.cpp `ggml/src/ggml-common.h`, `ggml-quants.c`; GGUF: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
A GGUF matrix [rows, K] (a linear's weight: rows = out_features, K = in_features, ggml's ne0) is stored row by
row; a quantized row is K/32 blocks of 32 consecutive weights (K % 32 == 0):

    q8_0  34 bytes: d fp16, qs int8[32]            w_j = d * qs_j
    q4_0  18 bytes: d fp16, qs uint8[16]           w_j = d * (n_j - 8)
    q4_1  20 bytes: d fp16, m fp16, qs uint8[16]   w_j = d * n_j + m
          nibble n_j is the low 4 bits of qs[j] for j < 16 and the high 4 bits of qs[j - 16] for j >= 16
    f16, bf16, f32: plain arrays (bf16 rounded to nearest even, as ggml_compute_fp32_to_bf16)

Round to nearest from floats (`quantize`): gguf-py's `gguf.quants` implements llama.cpp's reference quantizers
(`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `quantize_row_q4_1_ref`: the same float32 operations, the
same truncation and clamps, d computed in float32 and only stored as fp16), so we use it as is;
tests/test_export_gguf.py checks the bytes against llama.cpp's own quantizer (`llama_model_quantize`) when
llama-cpp-python is installed.

GPTQ re-encoding (`encode_gptq`, `encode_quantlinear`): a GPTQ v1 layer holds W[n, k] = s[g, n] * (c[k, n] - z[g, n])
with g = g_idx[k], fp16 scales s and integer codes c, zeros z (compress/algorithms/gptq.py). When every aligned
run of 32 input columns lies in one group, each GGML block takes its group's parameters and the codes are
copied, never rounded again:

    q4_0 <- 4-bit with z == 8 (gptq sym): d = s, n = c                      exact
    q8_0 <- 8-bit with z == 128 (gptq sym): d = s, qs = c - 128 in [-128, 127]  exact (llama.cpp's own
            quantizer never writes -128, but the format and its dot products take it: the int8 activations
            they multiply stay in [-127, 127])
    q4_1 <- 4-bit, any z (gptq asym, or sym): d = s, n = c, m = fp16(-s * z)
            s * z is exact in fp32 but needs up to 15 significant bits; fp16 keeps 11, so m is rounded to nearest:
            |m - (-s z)| <= 2^-11 |s z| <= 15 * 2^-11 * s (0.73% of one quantization step; 2^-25 absolute
            where s z is subnormal in fp16). m is exact, and the re-encoding bit-exact, whenever s * z fits in
            fp16: z a power of two (z == 8 for sym), or s with its low 4 mantissa bits zero. The error cannot
            be moved elsewhere: d * n + m == s * (n - z) for two or more codes forces d = s and m = -s z.
            GPTQ could make q4_1 exact by rounding asymmetric scales to 7 significant bits instead of fp16's 11
            (not done: it coarsens every scale to fix an error 8x smaller than that coarsening).

Group sizes: any multiple of 32 matches (a group of 128 fills 4 blocks with the same d), and -1 (one group per
row) when K % 32 == 0. act_order matches only while g_idx stays constant on every block (static_groups, which keeps
g_idx = k // group_size); a permuted g_idx, group sizes below 32 or not dividing into 32-blocks do not, and are
refused (`gptq_mismatch` before any work, `encode_gptq` per layer).

Not supported: k-quants (Q4_K, Q6_K ...: gguf-py has no quantizer for them), Q5_0/Q5_1, GPTQ 2/3-bit.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from compress.errors import CompressError

BLOCK = 32  # weights per block of every type here
TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
QUANTIZED = ("q8_0", "q4_0", "q4_1")

# GGUF type <- the GPTQ grid it re-encodes exactly: bits, and the zero point every group must have (None = any)
GPTQ_GRID = {"q4_0": (4, 8), "q4_1": (4, None), "q8_0": (8, 128)}
GPTQ_MATCHING = ("q4_0 <- gptq {bits: 4, sym: true}, q4_1 <- gptq {bits: 4}, q8_0 <- gptq {bits: 8, sym: true}, "
                 "each with group_size a multiple of 32 or -1, and act_order: false (or static_groups: true)")


def ggml_type(name: str) -> T:
    """The GGMLQuantizationType of a type name in TYPES."""
    if name not in TYPES:
        raise CompressError(f"unknown GGUF tensor type {name!r}; supported: {', '.join(TYPES)}")
    return TYPES[name]


def byte_shape(shape: tuple[int, ...], qtype: T) -> tuple[int, ...]:
    """Shape of the stored array: the element shape for f32/f16, bytes per row for block types (and bf16)."""
    if qtype in (T.F32, T.F16):
        return tuple(shape)
    return tuple(quants.quant_shape_to_byte_shape(shape, qtype))


def storage_dtype(qtype: T) -> np.dtype:
    return {T.F32: np.dtype(np.float32), T.F16: np.dtype(np.float16)}.get(qtype, np.dtype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Floats: round to nearest as llama.cpp does


def quantize(w: torch.Tensor, qtype: T, chunk_rows: int = 4096) -> np.ndarray:
    """A float matrix w [rows, K] (any float dtype) in GGML type qtype, computed from its float32 values.

    Rows are converted in chunks so temporaries stay a few chunk_rows * K floats.
    """
    if w.dim() != 2 and qtype not in (T.F32, T.F16):
        raise CompressError(f"only matrices are block-quantized; got a tensor of shape {tuple(w.shape)}")
    shape = tuple(w.shape)
    out = np.empty(byte_shape(shape, qtype), dtype=storage_dtype(qtype))
    if w.dim() < 2:
        out[...] = w.detach().to("cpu", torch.float32).numpy().astype(out.dtype)
        return out
    for r0 in range(0, shape[0], chunk_rows):
        rows = w[r0:r0 + chunk_rows].detach().to("cpu", torch.float32).contiguous().numpy()  # [r, K]
        out[r0:r0 + len(rows)] = quants.quantize(rows, qtype)
    return out


def dequantize(data: np.ndarray, qtype: T) -> torch.Tensor:
    """Stored GGML data (as `quantize` or `encode_gptq` return it) -> float32 tensor [rows, K] (gguf.quants)."""
    return torch.from_numpy(np.array(quants.dequantize(data, qtype), dtype=np.float32))  # a writable copy


# ----------------------------------------------------------------------------------------------------------------
# Block packing


def _nibbles(n: torch.Tensor) -> torch.Tensor:
    """n [rows, nb*32] in [0, 15] -> qs [rows, nb, 16] uint8: low nibble j, high nibble j + 16."""
    rows, K = n.shape
    b = n.to(torch.uint8).view(rows, K // BLOCK, 2, BLOCK // 2)          # (rows, nb, half, 16)
    return b[:, :, 0] | (b[:, :, 1] << 4)                               # (rows, nb, 16)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 tensor [rows, nb] -> its little-endian bytes [rows, nb, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def pack_q8_0(d: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """d fp16 [rows, nb], q int8 [rows, nb*32] -> q8_0 bytes [rows, nb*34]."""
    rows = q.shape[0]
    qs = q.to(torch.int8).contiguous().view(torch.uint8).view(rows, -1, BLOCK)  # (rows, nb, 32)
    return torch.cat([_fp16_bytes(d), qs], dim=2).reshape(rows, -1).numpy()


def pack_q4_0(d: torch.Tensor, n: torch.Tensor) -> np.ndarray:
    """d fp16 [rows, nb], nibbles n [rows, nb*32] in [0, 15] -> q4_0 bytes [rows, nb*18]."""
    return torch.cat([_fp16_bytes(d), _nibbles(n)], dim=2).reshape(n.shape[0], -1).numpy()


def pack_q4_1(d: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> np.ndarray:
    """d, m fp16 [rows, nb], nibbles n [rows, nb*32] in [0, 15] -> q4_1 bytes [rows, nb*20]."""
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _nibbles(n)], dim=2).reshape(n.shape[0], -1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# GPTQ -> GGML, no second rounding


def gptq_mismatch(qtype: str, bits: int, sym: bool, group_size: int, desc_act: bool = False,
                  static_groups: bool = False) -> str | None:
    """Why a GPTQ config has no exact encoding in GGUF type qtype (one line), or None when it has one.

    From the checkpoint's quantization_config alone, so an export can refuse before any work.
    """
    if qtype not in GPTQ_GRID:
        return f"GGUF type {qtype} holds no GPTQ codes"
    want_bits, want_zero = GPTQ_GRID[qtype]
    why = []
    if bits != want_bits:
        why.append(f"{qtype} holds {want_bits}-bit codes, the checkpoint has {bits}-bit")
    if want_zero is not None and not sym:
        why.append(f"{qtype} has no zero points (needs sym: true)")
    if group_size != -1 and group_size % BLOCK:
        why.append(f"group_size {group_size} does not fill whole {BLOCK}-weight blocks")
    if desc_act and not static_groups:
        why.append("act_order permutes g_idx across blocks")
    return "; ".join(why) or None


def check_gptq(qtype: str, bits: int, sym: bool, group_size: int, desc_act: bool = False,
               static_groups: bool = False) -> None:
    """Raise the one-line CompressError of `gptq_mismatch`, naming the settings that do match."""
    why = gptq_mismatch(qtype, bits, sym, group_size, desc_act, static_groups)
    if why:
        raise CompressError(f"cannot write this GPTQ checkpoint as GGUF {qtype} without rounding again ({why}); "
                            f"exact matches: {GPTQ_MATCHING}")


def block_groups(g_idx: torch.Tensor) -> torch.Tensor:
    """The group of each 32-column block [K/32], or CompressError when a block spans two groups."""
    K = g_idx.numel()
    if K % BLOCK:
        raise CompressError(f"in_features {K} is not a multiple of {BLOCK}: no GGML block type holds this layer")
    g = g_idx.to(torch.int64).view(K // BLOCK, BLOCK)                    # (nb, 32)
    if not bool((g == g[:, :1]).all()):
        bad = int((g != g[:, :1]).any(dim=1).nonzero()[0])
        raise CompressError(f"GPTQ g_idx puts two groups in the 32-column block {bad} (act_order or group_size "
                            f"< 32): no exact GGML encoding; exact matches: {GPTQ_MATCHING}")
    return g[:, 0]


def q4_1_offset(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """m = -s * z rounded to fp16 (the one rounding of the q4_1 re-encoding; see the module docstring)."""
    m = -(scales.float() * zeros.float())                                # exact in fp32 (11 x 4 significant bits)
    if not bool(torch.isfinite(m).all()) or float(m.abs().max()) > 65504:
        raise CompressError("a GPTQ group's offset -scale*zero overflows fp16: no q4_1 encoding")
    return m.to(torch.float16)


def encode_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
                qtype: str) -> np.ndarray:
    """GPTQ parameters -> GGML bytes [N, K/32 * block bytes], copying the codes (no rounding but q4_1's m).

    codes [N, K] integers (rows = out_features), scales [G, N] fp16-representable, zeros [G, N] integers,
    g_idx [K] group of each input column, bits of the codes; qtype one of GPTQ_GRID.
    """
    if qtype not in GPTQ_GRID:
        raise CompressError(f"GGUF type {qtype} holds no GPTQ codes; use one of {', '.join(GPTQ_GRID)}")
    want_bits, want_zero = GPTQ_GRID[qtype]
    if bits != want_bits:
        raise CompressError(f"GGUF {qtype} holds {want_bits}-bit codes, the layer has {bits}-bit; "
                            f"exact matches: {GPTQ_MATCHING}")
    g = block_groups(g_idx)                                              # (nb,)
    s = scales.to(torch.float16)[g].t()                                  # (N, nb)
    if not torch.equal(s.float(), scales.float()[g].t()):
        raise CompressError("GPTQ scales are not fp16 values: GGML blocks store fp16 scales")
    z = zeros.to(torch.int64)[g].t()                                     # (N, nb)
    c = codes.to(torch.int64)                                            # (N, K)
    if want_zero is not None and not bool((z == want_zero).all()):
        raise CompressError(f"GGUF {qtype} needs every GPTQ zero point == {want_zero} (sym: true); "
                            f"this layer has others; exact matches: {GPTQ_MATCHING}")
    if qtype == "q8_0":
        return pack_q8_0(s, c - 128)
    if qtype == "q4_0":
        return pack_q4_0(s, c)
    return pack_q4_1(s, q4_1_offset(s, z), c)


def encode_quantlinear(layer, qtype: str, rows: torch.Tensor | None = None, chunk_rows: int = 4096) -> np.ndarray:
    """A GPTQ QuantLinear's weight as GGML bytes [out_features, ...]; `rows` reorders output rows first.

    Works in chunks of output rows, so temporaries stay a few chunk_rows * in_features integers.
    """
    from compress.algorithms.gptq import unpack_cols, unpack_rows

    K, N = layer.in_features, layer.out_features
    zeros = (unpack_cols(layer.qzeros, layer.bits, N) + 1) & (2**layer.bits - 1)  # (G, N): v1 stores zero - 1
    order = torch.arange(N) if rows is None else rows.to(torch.int64)
    parts = []
    for r0 in range(0, N, chunk_rows):
        idx = order[r0:r0 + chunk_rows]
        codes = unpack_rows(layer.qweight[:, idx], layer.bits, K).t()    # (n, K)
        parts.append(encode_gptq(codes, layer.scales[:, idx], zeros[:, idx], layer.g_idx, layer.bits, qtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def gptq_offset_error(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """|fp16(-s z) - (-s z)| / s per group [G, N]: the q4_1 re-encoding's error in quantization steps."""
    exact = -(scales.float() * zeros.float())
    return (q4_1_offset(scales, zeros).float() - exact).abs() / scales.float()
