"""Measure a stage's output (size, memory, environment) and write its manifest.json atomically and last.

The presence of `manifest.json` in a stage folder means "this stage finished": the pipeline writes it after
the checkpoint, the round-trip check and the evaluation, through a temp file + os.replace, inside a folder
that is itself renamed into place only when complete.

Peak memory during a stage is measured by compress.memory.PeakMemory, the way the memory planner predicts
it (growth over the resident input model: peak RSS on CPU, max allocated on CUDA).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------- size


def weights_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer as held in memory (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def count_params(model) -> int:
    """Logical parameter count: for quantized linears the in x out weights they stand for, not packed words."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if "qweight" in module._buffers:  # a packed quantized linear (GPTQ): it stands for in x out weights
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            total += bias.numel() if bias is not None else 0
            for t in module.parameters(recurse=False):
                seen.add(t.data_ptr())
            for t in module.buffers(recurse=False):
                seen.add(t.data_ptr())
            continue
        for t in module.parameters(recurse=False):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel()
    return total


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix == ".safetensors")


def size_of(model, folder: Path) -> dict:
    params = count_params(model)
    disk = disk_bytes(folder)
    return {
        "disk_bytes": disk,
        "params": params,
        "bits_per_weight": round(8 * disk / params, 3) if params else None,  # everything on disk / logical params
    }


# --------------------------------------------------------------------------------------------- env


def env(device: torch.device) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------- io


def write(folder: Path, manifest: dict) -> Path:
    """Write manifest.json atomically (temp file + fsync + os.replace)."""
    path = Path(folder) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read(folder: Path) -> dict | None:
    """The manifest of a finished stage folder, or None when the stage did not finish."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("complete") else None


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def now() -> float:
    return time.perf_counter()
