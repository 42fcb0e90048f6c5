"""A stage's manifest: what was measured about its output (size, memory, accuracy, speed, provenance).

The presence of `manifest.json` in a stage folder means "this stage finished": the pipeline writes it after
the checkpoint, the round-trip check and the evaluation, through a temp file + os.replace, inside a folder
that is itself renamed into place only when complete. `Manifest` is its one shape; `read` gives a finished
folder's manifest back as the JSON dict it was written as (what reports and users read).

Peak memory during a stage is measured by compress.measure.PeakMemory, the way the memory planner predicts
it (growth over the resident input model: peak RSS on CPU, max allocated on CUDA).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Manifest:
    stage: str                     # stage type (base for 00-base)
    name: str                      # the stage's name; its folder is NN-name
    index: int                     # NN: 0 is the base model
    folder: str
    config: dict                   # the stage's Config as run
    config_hash: str | None        # stage type + config + seed + data (resume decides on it)
    input: dict                    # {"from": stage or model spec, "path": folder, "hash": content hash}
    output_hash: str               # content hash of the checkpoint written (a stage with no weights: its input's)
    format: str | None             # plain | gptq | bnb-int8 ...
    size: dict | None              # disk_bytes, params, bits_per_weight
    memory: dict                   # weights, predicted and measured peaks of the stage and its evaluation, how
    stats: dict                    # what the stage returned about its work
    seconds: float                 # the stage's own time
    env: dict                      # versions, device, git commit, argv
    eval_hash: str | None = None   # the eval protocol it was evaluated under (a change re-evaluates, not rebuilds)
    round_trip: dict | None = None # the reload check: max relative logit error and the format's tolerance
    checkpoint: str | None = None  # a stage that writes no weights: the folder it describes
    accuracy: dict = field(default_factory=dict)   # {metric: {source: {value, protocol}}}
    speed: dict = field(default_factory=dict)      # eval and decode tokens/s with their protocol
    complete: bool = True

    def to_dict(self) -> dict:
        keys = ["stage", "name", "index", "folder", "complete", "config", "config_hash", "eval_hash", "input",
                "checkpoint", "output_hash", "format", "size", "memory", "round_trip", "stats", "seconds", "env",
                "accuracy", "speed"]
        return {k: getattr(self, k) for k in keys if k != "checkpoint" or self.checkpoint is not None}

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


def write(folder: Path, manifest: Manifest | dict) -> Path:
    """Write manifest.json atomically (temp file + fsync + os.replace)."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
