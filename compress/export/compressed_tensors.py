"""Export a GPTQ v1 checkpoint as a compressed-tensors "pack-quantized" checkpoint, the int-weight format that
vLLM's default quantized path reads (vLLM marks its `gptq` loader for deprecation). The integer codes and the
fp16 scales are carried over bit for bit: nothing is re-rounded.

    from compress.export import compressed_tensors as ct
    info = ct.export("artifacts/demo/03-gptq", "artifacts/demo/03-gptq-ct")   # a gptq stage folder
    info = ct.export(model, "out/ct", tokenizer)        # or a model that holds QuantLinear modules
    model = ct.load_with_library("out/ct")              # compressed-tensors' own decompression (checks an export)

Written per quantized linear `<name>` (N = out_features, K = in_features, b = bits, g = the group size written),
into model.safetensors:

    <name>.weight_packed      int32 [N, K*b/32]    codes along the input dim, 32/b per word, code j of a word at
                                                   bits j*b.., each stored unsigned (signed code + 2^(b-1))
    <name>.weight_scale       fp16  [N, K/g]       ([N, 1] for one group per row: strategy "channel")
    <name>.weight_zero_point  int32 [N*b/32, K/g]  asymmetric only: zero points packed the same way along the
                                                   OUTPUT dim, stored unsigned (signed zero + 2^(b-1))
    <name>.weight_shape       int64 [2]            (N, K)
    <name>.bias               unchanged
    W[n, k] = weight_scale[n, k // g] * (code[n, k] - zero[n, k // g])

How v1 maps onto it. compressed-tensors quantizes to signed codes c in [-2^(b-1), 2^(b-1)) with signed zero points
(0 when symmetric) and stores c + 2^(b-1). Our v1 codes q are unsigned with W = s (q - z): c = q - 2^(b-1) is
stored as q itself, so weight_packed is qweight transposed, word for word (the bit order within a word is the same
at 2, 4 and 8 bits). v1 stores z - 1 (the true zero is (stored + 1) & (2^b - 1)); compressed-tensors stores
(z - 2^(b-1)) + 2^(b-1) = z: zero points are unpacked, corrected and repacked. Symmetric GPTQ has z = 2^(b-1)
everywhere, a signed zero of 0, which is compressed-tensors' symmetric (no zero-point tensor). Symmetry is read
from the zero points themselves; a checkpoint whose config says sym but whose zeros differ is written asymmetric.

Groups. compressed-tensors and vLLM need K to be a multiple of the group size; GPTQ allows a last, partial group
(SmolLM2: K = 576 at group 128 is 4.5 groups). Such a layer is written with g = gcd(group_size, K) (576 at 128
-> 64), each GPTQ group's scale and zero repeated group_size/g times: exact, for 16*(group_size/g - 1)/group_size
more bits per weight on that layer. Layers whose K divides keep the configured size. When the written sizes
differ between layers, each size gets its own config group, targeted by regexes on module names.

config.json `quantization_config` (what compressed-tensors' QuantizationConfig and vLLM parse), e.g.:

    {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
         "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 128,
                     "dynamic": false, "actorder": null},
         "input_activations": null, "output_activations": null}},
     "ignore": ["lm_head"], "kv_cache_scheme": null, "global_compression_ratio": null,
     "sparsity_config": {}, "transform_config": {}}

`ignore` lists every nn.Linear left in full precision; actorder is "weight" (calibrated in activation order,
stored in plain order) when the source had desc_act with a monotone g_idx (static_groups).

Refused, in one line (CompressError): 3 bits (compressed-tensors 0.17, which vLLM 0.33 pins, packs 10 codes per
word with 2 bits spare, 0.18+ a dense bit stream: no one layout reads right everywhere); act_order without
static_groups (a non-monotone g_idx needs actorder "group", which compressed-tensors >= 0.19 and vLLM 0.33 no
longer load); GPTQ v2 checkpoints and pack dtypes other than int32; GPT-2-style Conv1D layers (the format
targets nn.Linear modules with [out, in] weights).

Checked here with compressed-tensors 0.17.0 (vLLM 0.33's pin) on CPU. What vLLM's GPU kernels take (Marlin:
group sizes -1/32/64/128, 4/8-bit symmetric, 4-bit asymmetric; with tensor parallelism each shard of K a multiple
of the group size) is read from vLLM 0.33's source, not run: each export lists what applies in `vllm_notes`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.algorithms.gptq import pack_rows, unpack_cols
from compress.errors import CompressError

FORMAT = "pack-quantized"
BITS = (2, 4, 8)               # 3 bits: see the module docstring
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM 0.33 marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
SKIP_FILES = ("config.json", "manifest.json", "model.safetensors.index.json")
PICKLES = (".bin", ".pt", ".pth", ".ckpt")
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's packed_modules_mapping shards


@dataclass(frozen=True)
class WeightArgs:
    """The QuantizationArgs of one config group: what every linear in it shares."""

    bits: int
    symmetric: bool
    group_size: int      # as written; -1 = one group per output row (strategy "channel")
    actorder: str | None  # "weight" or None: provenance only, the stored layout is the same

    def to_json(self) -> dict:
        channel = self.group_size == -1
        return {
            "num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else self.group_size,
            "dynamic": False, "actorder": self.actorder,
        }


# ----------------------------------------------------------------------------------------------------------------
# One linear


def convert_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, *,
    bits: int, group_size: int, symmetric: bool, name: str = "linear",
) -> tuple[dict[str, torch.Tensor], int]:
    """GPTQ v1 buffers of one linear -> ({weight_packed, weight_scale, [weight_zero_point], weight_shape}, g).

    g is the group size written (-1: channel). Exact: codes are copied, scales and zeros repeated when a partial
    last group forces a smaller g (module docstring). `symmetric` must match the zero points (see zeros_of).
    """
    if bits not in BITS:
        raise CompressError(_bits_message(bits))
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CompressError(f"{name}: qweight/qzeros must be int32 (pack_dtype int32), got {qweight.dtype}")
    K, N = g_idx.numel(), scales.shape[1]
    gs = K if group_size == -1 else group_size
    G = math.ceil(K / gs)
    if qweight.shape != (K * bits // 32, N) or scales.shape != (G, N) or qzeros.shape != (G, N * bits // 32):
        raise CompressError(
            f"{name}: GPTQ tensors do not fit in_features {K}, out_features {N}, {bits} bits, group {group_size}: "
            f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    check_g_idx(g_idx, gs, name)
    zeros = zeros_of(qzeros, bits, N)  # [G, N]
    mid = 2 ** (bits - 1)
    if symmetric and not bool((zeros == mid).all()):
        raise CompressError(f"{name}: zero points are not all {mid}; it cannot be written symmetric")

    g = -1 if group_size == -1 else math.gcd(gs, K)
    repeat, n_groups = (1, 1) if g == -1 else (gs // g, K // g)

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [G, N] -> [N, K/g], each GPTQ group repeated
        return t.t().repeat_interleave(repeat, dim=1)[:, :n_groups].contiguous()

    out = {
        "weight_packed": qweight.t().contiguous(),                 # [N, K*b/32], same words
        "weight_scale": per_group(scales),                         # [N, K/g], dtype kept (fp16)
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_rows(per_group(zeros), bits)  # [N*b/32, K/g], packed along N
    return out, g


def zeros_of(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """True zero points [G, N] of v1 qzeros (stored + 1, masked to b bits)."""
    return (unpack_cols(qzeros, bits, out_features) + 1) & (2**bits - 1)


def check_g_idx(g_idx: torch.Tensor, group_size: int, name: str = "linear") -> None:
    """Refuse a g_idx that is not k // group_size (act_order with dynamic groups: not representable)."""
    K = g_idx.numel()
    if not torch.equal(g_idx.to(torch.int64), torch.arange(K, dtype=torch.int64) // group_size):
        raise CompressError(
            f"compressed-tensors export: {name} was quantized with act_order groups in activation order (g_idx not "
            "k // group_size), which compressed-tensors >= 0.19 and vLLM 0.33 no longer load (actorder 'group'); "
            "quantize with gptq act_order: true and static_groups: true, or act_order: false "
            "(act_group_aware: true, the default, keeps most of its gain)"
        )


def _bits_message(bits: int) -> str:
    if bits == 3:
        return ("compressed-tensors export: 3-bit codes cannot be written so that every reader agrees "
                "(compressed-tensors 0.17, which vLLM pins, packs 10 per word, 0.18+ a dense bit stream); "
                "quantize with gptq bits: 4 or 8 (or 2)")
    return f"compressed-tensors export: {bits}-bit GPTQ is not supported; use gptq bits: 4 or 8 (or 2)"


# ----------------------------------------------------------------------------------------------------------------
# Config


def gptq_settings(qc: dict | None, where: str) -> tuple[int, int, bool]:
    """(bits, group_size, desc_act) of a GPTQ v1 quantization_config, or a one-line refusal."""
    if not qc or qc.get("quant_method") != "gptq":
        method = (qc or {}).get("quant_method")
        raise CompressError(
            f"{where}: quantization_config.quant_method is {method!r}; the compressed-tensors export converts a "
            "GPTQ v1 checkpoint (the output of a gptq stage)"
        )
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt != "gptq":
        raise CompressError(f"{where}: GPTQ checkpoint_format {fmt!r}; only v1 ('gptq') checkpoints are exported")
    if qc.get("pack_dtype", "int32") != "int32":
        raise CompressError(f"{where}: GPTQ pack_dtype {qc['pack_dtype']!r}; only int32 packing is exported")
    bits = int(qc["bits"])
    if bits not in BITS:
        raise CompressError(_bits_message(bits))
    return bits, int(qc.get("group_size", 128)), bool(qc.get("desc_act", False))


def quantization_config(assigned: dict[str, WeightArgs], ignore: list[str], layers_name: str | None) -> dict:
    """config.json's `quantization_config` for linears `assigned` (full name -> args) and `ignore`d linears.

    One kind of args: one config group targeting "Linear" (the usual form). Several: one group per kind, targeting
    `re:^<layers>\\.\\d+\\.<name in block>$` where a name in the block gets the same args in every block, else the
    full module name.
    """
    kinds = sorted(set(assigned.values()), key=lambda a: (a.bits, a.symmetric, -a.group_size))
    if len(kinds) == 1:
        targets = {kinds[0]: ["Linear"]}
    else:
        targets = {a: [] for a in kinds}
        by_rel: dict[str, set[WeightArgs]] = {}
        for full, a in assigned.items():
            by_rel.setdefault(_in_block(full, layers_name), set()).add(a)
        done = set()
        for full, a in sorted(assigned.items()):
            rel = _in_block(full, layers_name)
            if rel is not None and len(by_rel[rel]) == 1:
                if rel not in done:
                    targets[a].append(rf"re:^{re.escape(layers_name)}\.\d+\.{re.escape(rel)}$")
                    done.add(rel)
            else:
                targets[a].append(f"re:^{re.escape(full)}$")
    groups = {
        f"group_{i}": {"targets": targets[a], "weights": a.to_json(), "input_activations": None,
                       "output_activations": None, "format": FORMAT}
        for i, a in enumerate(kinds)
    }
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    }


def _in_block(full: str, layers_name: str | None) -> str | None:
    """'model.layers.3.mlp.up_proj' -> 'mlp.up_proj' (None outside the repeated blocks)."""
    if not layers_name or not full.startswith(layers_name + "."):
        return None
    idx, _, rel = full[len(layers_name) + 1:].partition(".")
    return rel if idx.isdigit() and rel else None


def vllm_notes(kinds: set[WeightArgs], model_dtype: str | None, regrouped: dict[str, tuple[int, int]],
               split_fused: list[str]) -> list[str]:
    """What vLLM 0.33 (read from its source, not run here) will make of an export, beyond parsing it."""
    notes = []
    for a in sorted(kinds, key=lambda a: (a.bits, a.symmetric, a.group_size)):
        if a.group_size not in MARLIN_GROUP_SIZES:
            notes.append(f"group size {a.group_size}: Marlin takes {MARLIN_GROUP_SIZES[1:]} (or channel); "
                         "vLLM must find another kernel")
        if not a.symmetric and a.bits != 4:
            notes.append(f"asymmetric {a.bits}-bit: Marlin's zero-point path takes 4 bits only")
        if a.bits == 2:
            notes.append("2-bit: vLLM parses it (uint2b2) but Marlin and Exllama take 4/8 bits")
    if regrouped:
        pairs = sorted({v for v in regrouped.values()})
        notes.append(f"{len(regrouped)} linears with a partial last group written at a smaller group size "
                     f"(in_features, group): {pairs}; exact, scales repeated")
    if model_dtype in ("bfloat16", "torch.bfloat16"):
        notes.append("model dtype bfloat16: vLLM casts the fp16 scales to bfloat16 (not exact); "
                     "quantize with gptq dtype: float16 for an exact vLLM load")
    if split_fused:
        notes.append(f"linears vLLM fuses are quantized in part ({split_fused[:3]}...): vLLM requires every shard "
                     "of a fused layer (q/k/v, gate/up) to share a scheme; skip whole groups")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def export(source, dest: str | Path, tokenizer=None) -> dict:
    """Write `source` (a GPTQ v1 checkpoint folder, or a model holding QuantLinear modules) to `dest` as a
    compressed-tensors pack-quantized checkpoint; return what was written (counts, group sizes, vllm_notes)."""
    dest = Path(dest)
    if isinstance(source, (str, Path)):
        return _export_folder(Path(source), dest)
    if isinstance(source, nn.Module):
        return _export_model(source, dest, tokenizer)
    raise CompressError(f"export takes a checkpoint folder or a model, got {type(source).__name__}")


def _export_folder(src: Path, dest: Path) -> dict:
    from safetensors import safe_open
    from transformers import AutoConfig

    from compress.checkpoint import auto_class, check_folder

    config = check_folder(src)
    settings = gptq_settings(config.get("quantization_config"), str(src))
    hf_config = AutoConfig.from_pretrained(src)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    skeleton = _meta_model(lambda: auto_class(config).from_config(hf_config))
    with contextlib.ExitStack() as stack:
        where = {}
        for f in sorted(src.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(f, framework="pt"))
            where.update({k: handle for k in handle.keys()})
        state, qc, info = _convert(where.keys(), lambda k: where[k].get_tensor(k), config, settings, skeleton, src)
    _check_dest(dest)
    _write(dest, state, {**config, "quantization_config": qc})
    for f in sorted(src.iterdir()):  # tokenizer, generation config, chat template ...
        if f.is_file() and f.name not in SKIP_FILES and f.suffix not in (".safetensors", *PICKLES):
            shutil.copy2(f, dest / f.name)
    return _finish(info, dest)


def _export_model(model: nn.Module, dest: Path, tokenizer) -> dict:
    from compress.checkpoint import _tied_keys

    qc_src = getattr(model.config, "quantization_config", None)
    qc_src = qc_src if isinstance(qc_src, dict) or qc_src is None else qc_src.to_dict()
    settings = gptq_settings(qc_src, type(model).__name__)
    hf_config = copy.deepcopy(model.config)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    skeleton = _meta_model(lambda: type(model)(hf_config))
    tied = _tied_keys(model)
    tensors = {k: v for k, v in model.state_dict().items() if k not in tied}
    config = json.loads(json.dumps(model.config.to_dict(), default=str))
    state, qc, info = _convert(tensors.keys(), tensors.__getitem__, config, settings, skeleton, type(model).__name__)
    _check_dest(dest)
    config["quantization_config"] = qc
    _write(dest, state, config)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return _finish(info, dest)


def _meta_model(build) -> nn.Module:
    """The float architecture on the meta device (no memory): which modules are nn.Linear, where the blocks are."""
    with torch.device("meta"):
        return build()


def _convert(keys, get, config: dict, settings: tuple[int, int, bool], skeleton: nn.Module, where) -> tuple:
    """(state dict to write, quantization_config, info) from a v1 checkpoint's tensors (`get(key)`)."""
    from compress.modeling import decoder_layers_with_name

    bits, group_size, desc_act = settings
    keys = list(keys)
    names = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    if not names:
        raise CompressError(f"{where}: no quantized linears (no *.qweight tensors) to export")
    modules = dict(skeleton.named_modules())
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            kind = "missing from" if m is None else f"a {type(m).__name__} in"
            raise CompressError(
                f"compressed-tensors export: {name} is {kind} the model built from its config; the format "
                "quantizes nn.Linear layers ([out, in] weights), so GPT-2-style Conv1D models cannot be exported"
            )
    try:
        layers_name = decoder_layers_with_name(skeleton)[0]
    except CompressError:
        layers_name = None

    # First pass (small tensors only): refuse a permuted g_idx before writing anything; read symmetry off the zeros.
    symmetric = True
    for name in names:
        scales = get(f"{name}.scales")
        g_idx = get(f"{name}.g_idx")
        check_g_idx(g_idx, g_idx.numel() if group_size == -1 else group_size, name)
        zeros = zeros_of(get(f"{name}.qzeros"), bits, scales.shape[1])
        symmetric = symmetric and bool((zeros == 2 ** (bits - 1)).all())

    actorder = "weight" if desc_act else None
    state, assigned, regrouped = {}, {}, {}
    for name in names:
        t = {k: get(f"{name}.{k}") for k in GPTQ_KEYS}
        out, g = convert_linear(**t, bits=bits, group_size=group_size, symmetric=symmetric, name=name)
        state.update({f"{name}.{k}": v for k, v in out.items()})
        assigned[name] = WeightArgs(bits, symmetric, g, actorder)
        K = t["g_idx"].numel()
        if group_size != -1 and K % group_size:
            regrouped[name] = (K, group_size)
    quantized_keys = {f"{n}.{k}" for n in names for k in GPTQ_KEYS}
    for k in keys:  # embeddings, norms, lm_head, biases of quantized linears ...
        if k not in quantized_keys:
            state[k] = get(k).contiguous()

    linear_names = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linear_names if n not in assigned]
    qc = quantization_config(assigned, ignore, layers_name)
    src_qc = config.get("quantization_config") or {}
    info = {
        "format": f"compressed-tensors/{FORMAT}", "bits": bits, "symmetric": symmetric, "group_size": group_size,
        "written_group_sizes": sorted({a.group_size for a in assigned.values()}), "actorder": actorder,
        "quantized_linears": len(names), "ignore": qc["ignore"], "config_groups": len(qc["config_groups"]),
        "vllm_notes": vllm_notes(set(assigned.values()), str(config.get("dtype") or config.get("torch_dtype")),
                                 regrouped, _split_fused(assigned, linear_names, src_qc)),
    }
    if src_qc.get("sym", True) and not symmetric:
        info["vllm_notes"].append("the GPTQ config says sym but its zero points vary: written asymmetric")
    return state, qc, info


def _split_fused(assigned: dict, linear_names: list[str], src_qc: dict) -> list[str]:
    """Sibling linears that vLLM fuses into one layer (q/k/v, gate/up; or a group of GPTQ's
    modules_in_block_to_quantize, which read one input) but that are quantized in part."""
    shard_sets = [set(s) for s in VLLM_FUSED]
    in_block = src_qc.get("modules_in_block_to_quantize") or []
    shard_sets += [{n.rpartition(".")[2] for n in g} for g in in_block if len(g) > 1]
    by_parent: dict[str, set[str]] = {}
    for name in linear_names:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, set()).add(child)
    out = []
    for parent, children in sorted(by_parent.items()):
        for shards in shard_sets:
            present = sorted(shards & children)
            got = [f"{parent}.{c}" in assigned for c in present]
            if len(present) > 1 and any(got) and not all(got):
                out.append(f"{parent}: {present}")
    return sorted(set(out))


def _check_dest(dest: Path) -> None:
    if dest.exists() and ((dest / "config.json").exists() or any(dest.glob("*.safetensors"))):
        raise CompressError(f"{dest} already holds a checkpoint; export into a new folder")


def _write(dest: Path, state: dict, config: dict) -> None:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def _finish(info: dict, dest: Path) -> dict:
    info["disk_bytes"] = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    info["path"] = str(dest)
    return info


# ----------------------------------------------------------------------------------------------------------------
# Reading an export back through the library (verification)


def load_with_library(folder: str | Path, dtype: torch.dtype | None = None, via: str = "compressor"):
    """(model, tokenizer) of an exported folder, its quantized weights decompressed by compressed-tensors itself.

    via "compressor": the float model from config.json, and for every module the library's own matcher assigns to
    a config group (targets minus ignore), the library's PackedQuantizationCompressor.decompress of its tensors;
    works alike with compressed-tensors 0.17 and 0.20.1. via "transformers": AutoModelFor*.from_pretrained with
    transformers' compressed-tensors quantizer (apply_quantization_config, compress_model, load), then the library's
    ModelCompressor.decompress_model; from compressed-tensors 0.18 on this path cannot load asymmetric checkpoints
    (its meta-device compress leaves weight_zero_point unpacked, [N, G] against the stored [N*b/32, G]; run with
    0.20.1, read in 0.18/0.19).
    dtype: of everything not quantized and of the decompressed weights (default: the checkpoint's).
    """
    if importlib.util.find_spec("compressed_tensors") is None:
        raise CompressError("loading a compressed-tensors checkpoint needs the compressed-tensors package "
                            "(pip install compressed-tensors==0.17.0, the version vLLM 0.33 pins)")
    from transformers import AutoTokenizer

    from compress.checkpoint import auto_class, check_folder

    folder = Path(folder)
    config = check_folder(folder)
    if (config.get("quantization_config") or {}).get("quant_method") != "compressed-tensors":
        raise CompressError(f"{folder} is not a compressed-tensors checkpoint (quantization_config.quant_method)")
    if via == "transformers":
        model = auto_class(config).from_pretrained(folder, dtype=dtype or "auto", device_map="cpu")
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        if compressor is None:
            raise CompressError(f"{folder} did not load through transformers' compressed-tensors quantizer")
        compressor.decompress_model(model)
    elif via == "compressor":
        model = _decompress_into_skeleton(folder, config, dtype)
    else:
        raise CompressError(f"load_with_library: via must be 'compressor' or 'transformers', got {via!r}")
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _decompress_into_skeleton(folder: Path, config: dict, dtype: torch.dtype | None) -> nn.Module:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from compress.checkpoint import _config_dtype, _tied_keys, auto_class

    qc = config["quantization_config"]
    qconf = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    hf_config = AutoConfig.from_pretrained(folder)
    del hf_config.quantization_config
    dtype = dtype or _config_dtype(config)
    model = auto_class(config).from_config(hf_config, dtype=dtype)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    done = set()
    for scheme in qconf.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qconf.format)
        for name, _ in match_named_modules(model, scheme.targets, qconf.ignore):
            if name in done:
                raise CompressError(f"{folder}: {name} matches more than one config group")
            done.add(name)
            local = {k[len(name) + 1:]: state.pop(k) for k in list(state)
                     if k.startswith(name + ".") and k[len(name) + 1:].startswith("weight_")}
            # scales in the model's dtype, as transformers' and vLLM's parameters hold them
            local = {k: v.to(dtype) if v.is_floating_point() else v for k, v in local.items()}
            state[f"{name}.weight"] = compressor.decompress(local, scheme)["weight"].to(dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
    if missing or result.unexpected_keys:
        raise CompressError(f"{folder} does not match its model: missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    return model
