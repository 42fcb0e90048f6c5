"""Save and load every stage's output format, and the round-trip check that proves a save is faithful.

Formats (detected from config.json's `quantization_config`):

    plain     ordinary HF checkpoint (any dtype)          -> AutoModelFor*.from_pretrained
    gptq      GPTQ v1 packed int32 qweight/qzeros/scales  -> our QuantLinear (dequantizes in torch)
    bnb-int8  bitsandbytes LLM.int8() weight + SCB        -> bitsandbytes Linear8bitLt

A folder may also hold `adapter/` (PEFT LoRA: adapter_config.json + adapter_model.safetensors, the `lora`
stage's output): `save` of a peft model writes the base as above plus adapter/, and `load` applies it.

Every checkpoint is a folder of safetensors + config.json + tokenizer files that transformers (and, for the
quantized formats, transformers with optimum+gptqmodel or bitsandbytes) loads as is. Quantized MoE checkpoints
hold their experts per expert, under the names of the family's original checkpoints (compress/moe.py): GPTQModel
and vLLM read that layout; transformers 5 fuses experts on load and its quantized loaders do not handle them. Pickled weights
(`pytorch_model.bin`) are refused unless the caller passes `allow_pickle=True`; `trust_remote_code` is off
unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from compress import measure
from compress.errors import CompressError

MAX_SHARD_BYTES = 2**30  # safetensors files of at most 1 GiB: saving holds one shard's bytes twice, not the model's

WEIGHT_GLOBS = ("*.safetensors",)
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class Format:
    name: str
    tolerance: float                       # max relative logit error the round-trip check accepts
    prepare: Callable | None = None        # (skeleton, quantization_config) -> None: swap modules before loading
    empty_skeleton: bool = False           # build the skeleton's parameters on the meta device and load by assignment


def _gptq_prepare(model, qc):
    from compress.algorithms import gptq

    gptq.prepare_for_load(model, qc)


def _int8_prepare(model, qc):
    from compress.algorithms import int8

    int8.prepare_for_load(model, qc)


# Reloading the very tensors we saved must give the same logits; quantized formats may re-derive caches
# (dequantized weights, int8 kernels) in a different order of operations, hence their looser bound.
FORMATS = {
    "plain": Format("plain", tolerance=1e-5),
    "gptq": Format("gptq", tolerance=1e-3, prepare=_gptq_prepare, empty_skeleton=True),
    "bnb-int8": Format("bnb-int8", tolerance=1e-2, prepare=_int8_prepare),
}


def format_of(config: dict) -> str:
    """The format name of a checkpoint from its config.json dict."""
    qc = config.get("quantization_config")
    if not qc:
        return "plain"
    method = qc.get("quant_method")
    if method == "gptq":
        return "gptq"
    if method == "bitsandbytes" and qc.get("load_in_8bit"):
        return "bnb-int8"
    raise CompressError(f"unsupported quantization_config.quant_method {method!r} (supported: gptq, bitsandbytes 8-bit)")


# --------------------------------------------------------------------------------------------- checks before loading


def check_folder(folder: Path, allow_pickle: bool = False, weights: bool = True) -> dict:
    """Validate a checkpoint folder before loading it; return its config.json dict. weights=False: a folder with
    only config.json is enough (planning before downloading the weights)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CompressError(f"{folder} has no config.json: not a model checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{cfg_path} is corrupt: {e}") from None
    if not weights:
        return config
    has_st = any(p for g in WEIGHT_GLOBS for p in folder.glob(g))
    has_pickle = any(p for g in PICKLE_GLOBS for p in folder.glob(g))
    if not has_st:
        if has_pickle and not allow_pickle:
            raise CompressError(
                f"{folder} holds only pickled weights (.bin/.pt), which can run arbitrary code when loaded; "
                "set `allow_pickle: true` in the pipeline if you trust it"
            )
        if not has_pickle:
            raise CompressError(f"{folder} has no weights (*.safetensors)")
    return config


def auto_class(config: dict):
    """The transformers Auto class matching the checkpoint's head."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return AutoModelForCausalLM
    if arch.endswith("ForMaskedLM"):
        return AutoModelForMaskedLM
    return AutoModel


# --------------------------------------------------------------------------------------------- load


def load(
    folder: str | Path,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) from a checkpoint folder in any of FORMATS, in eval mode on `device`."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = check_folder(folder, allow_pickle)
    fmt = FORMATS[format_of(config)]
    try:
        if fmt.prepare is None:
            model = auto_class(config).from_pretrained(
                folder, dtype="auto", use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
            )
        else:
            model = _load_quantized(folder, config, fmt, trust_remote_code)
    except CompressError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CompressError(f"cannot load checkpoint {folder}: {str(e).splitlines()[0]}") from None
    if has_adapter(folder):
        model = load_adapter(model, folder)
    model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def _load_quantized(folder: Path, config: dict, fmt: Format, trust_remote_code: bool):
    """Build the float skeleton from config, swap in the format's modules, then load the saved tensors.

    With `fmt.empty_skeleton` the skeleton's parameters and the swapped-in modules' buffers are never allocated
    (meta device; buffers such as rotary tables stay real) and the saved tensors are assigned, not copied: a
    70B GPTQ checkpoint does not first build a 140 GB float16 model."""
    import contextlib

    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig

    qc = dict(config["quantization_config"])
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    dtype = _config_dtype(config)
    empty = fmt.empty_skeleton
    with init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext():
        model = auto_class(config).from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    if empty:
        model.tie_weights()  # from_config leaves an empty skeleton untied
    with init_empty_weights(include_buffers=True) if empty else contextlib.nullcontext():
        fmt.prepare(model, qc)
    from_disk = _renamer(model, to_disk=False)
    tied = _tied_keys(model)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update({from_disk(k): v for k, v in load_file(f).items()})
    result = model.load_state_dict(state, strict=False, assign=empty)
    del state
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CompressError(
            f"checkpoint {folder} does not match its {fmt.name} skeleton: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    if tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CompressError(f"checkpoint {folder} left {len(left)} tensors unloaded, e.g. {left[0]}")
    model.config.quantization_config = qc
    return model


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


def _tied_keys(model) -> set[str]:
    """State-dict keys whose tensor is the very tensor of an earlier key: tied output embeddings (lm_head.weight),
    BERT's cls.predictions.decoder.bias (its cls.predictions.bias). Saved once, under the first key, as
    save_pretrained does; loading one fills both."""
    seen, tied = set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        if t.device.type == "meta":  # an empty skeleton: tied parameters are one object
            ident = id(t)
        else:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            tied.add(key)
        seen.add(ident)
    return tied


# --------------------------------------------------------------------------------------------- save


def save(model, tokenizer, folder: str | Path) -> None:
    """Write safetensors + config.json (+ generation_config) + tokenizer into `folder` (created)."""
    if is_adapted(model):
        return save_adapted(model, tokenizer, folder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_BYTES)
    else:
        # Quantized modules hold packed buffers that save_pretrained's quantizer hooks do not know; write the
        # state dict ourselves (tied duplicates dropped, contiguous CPU tensors) and the config with qc in it.
        tied = _tied_keys(model)
        to_disk = _renamer(model, to_disk=True)
        state = {to_disk(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in tied}
        _save_sharded(state, folder)
        cfg = model.config.to_dict()
        cfg["quantization_config"] = dict(qc) if not isinstance(qc, dict) else qc
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _save_sharded(state: dict, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `state` as safetensors shards of at most `max_shard_bytes` (one tensor may exceed it), with the
    model.safetensors.index.json that transformers and vLLM read; one file model.safetensors when it fits.
    safetensors serializes a file's tensors as one buffer, so the shard size bounds the extra memory of saving."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        save_file(part, folder / name, metadata={"format": "pt"})
        measure.page_out_mapped(list(part.values()))  # tensors held as views of a file (spilled): pages back
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _renamer(model, to_disk: bool):
    """Tensor-name translation between the model in memory and its family's checkpoints (compress/families.py
    `saved_names`: Mixtral's mlp is block_sparse_moe on disk, as save_pretrained writes it and vLLM reads it)."""
    from compress import families

    fam = families.find(model)
    if fam is None or not fam.saved_names:
        return lambda name: name
    return fam.to_disk if to_disk else fam.from_disk


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's model files (no caches, no pickles) into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not any(f.match(g) for g in PICKLE_GLOBS):
            shutil.copy2(f, dst / f.name)


# --------------------------------------------------------------------------------------------- adapters (PEFT)

ADAPTER_DIR = "adapter"  # a LoRA adapter over the folder's base checkpoint, in PEFT's format


def is_adapted(model) -> bool:
    """True for a peft model (LoRA adapters applied, not merged). peft is never imported to find out."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def has_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_DIR / "adapter_config.json").is_file()


def adapter_files(folder: str | Path) -> list[Path]:
    """The files of folder/adapter/ (empty when there is none), sorted: part of the checkpoint's content."""
    sub = Path(folder) / ADAPTER_DIR
    return sorted(f for f in sub.iterdir() if f.is_file()) if sub.is_dir() else []


def save_adapted(model, tokenizer, folder: str | Path) -> None:
    """A peft model: the frozen base exactly as `save` writes it (adapter layers swapped out, not copied), then
    the adapter into folder/adapter/ with peft's save_pretrained (safetensors)."""
    from compress.algorithms import lora

    folder = Path(folder)
    with lora.without_adapters(model) as base:
        save(base, tokenizer, folder)
    model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)


def load_adapter(model, folder: str | Path):
    """Apply folder/adapter/ to the base `model` just loaded from `folder`; returns the PeftModel."""
    from compress.algorithms import lora

    try:
        return lora.load_adapter(model, Path(folder) / ADAPTER_DIR)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CompressError(f"cannot apply the adapter in {folder}/{ADAPTER_DIR}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------- checks


def content_hash(folder: Path) -> str:
    """sha256 over the names and bytes of a checkpoint's model files (weights, config, tokenizer)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()) + adapter_files(folder):
        if not f.is_file() or f.name == "manifest.json":
            continue
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def probe_input(model, n: int = 2, length: int = 16) -> torch.Tensor:
    """A fixed small batch of token ids (seeded, independent of the global RNG) for logit comparisons."""
    g = torch.Generator().manual_seed(1234)
    vocab = int(getattr(model.config, "vocab_size", 256))
    return torch.randint(0, vocab, (n, length), generator=g)


@torch.no_grad()
def outputs(model, ids: torch.Tensor, onload_to=None) -> torch.Tensor:
    """Logits (LM heads) or last hidden states (bare encoders) in float32 on CPU; `onload_to`: a device to run
    the model on one block at a time (compress/onload.py; causal LMs), the model staying where it is."""
    if onload_to is not None:
        from compress import onload

        return next(onload.logits_by_block(model, [ids], onload_to))[1].float().cpu()
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device))
    t = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return t.float().cpu()


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: one number that is 0 for identical outputs and scale-free otherwise."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def round_trip(model, folder: Path, device, trust_remote_code: bool = False,
               onload: bool = False) -> tuple[dict, torch.nn.Module]:
    """Reload `folder` through load() and compare its outputs with the in-memory `model` on a fixed input.

    Returns the check's record and the reloaded model (what the pipeline evaluates: the checkpoint as saved),
    with any weight cache the check's forward built dropped, so it is as a fresh load. onload: both models stay on
    the host and run one block at a time on `device` (a model bigger than the device)."""
    return check_reload(folder, reference_outputs(model, device, onload), device, trust_remote_code, onload)


def reference_outputs(model, device, onload: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe ids, the in-memory model's outputs on them): the first half of the round trip, so that the caller can
    let go of the model before the reload (two copies of a large model need not be resident at once)."""
    ids = probe_input(model)
    return ids, outputs(model, ids, device if onload else None)


def check_reload(folder: Path, reference: tuple[torch.Tensor, torch.Tensor], device, trust_remote_code: bool = False,
                 onload: bool = False) -> tuple[dict, torch.nn.Module]:
    """The second half of the round trip: reload `folder` and compare its outputs with `reference`."""
    config = check_folder(folder)
    fmt = FORMATS[format_of(config)]
    ids, expected = reference
    reloaded, _ = load(folder, device="cpu" if onload else device, trust_remote_code=trust_remote_code)
    err = max_rel_error(expected, outputs(reloaded, ids, device if onload else None))
    drop_caches(reloaded)
    if not err <= fmt.tolerance:  # also catches NaN
        raise CompressError(
            f"round-trip check failed for {folder.name}: reloaded logits differ by {err:.3g} (relative), "
            f"above the {fmt.name} format's tolerance {fmt.tolerance:g}; the checkpoint is not faithful"
        )
    return {"max_rel_error": err, "tolerance": fmt.tolerance, "format": fmt.name}, reloaded


def drop_caches(model) -> None:
    """Forget what forwards cached inside modules (dequantized GPTQ weights), as a fresh load would not have it."""
    for m in model.modules():
        if hasattr(m, "clear_cache"):
            m.clear_cache()
