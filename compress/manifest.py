"""Measure a stage's output (size, memory, environment) and write its manifest.json atomically and last.

The presence of `manifest.json` in a stage folder means "this stage finished": the pipeline writes it after
the checkpoint, the round-trip check and the evaluation, through a temp file + os.replace, inside a folder
that is itself renamed into place only when complete.

Peak memory during a stage:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only, not the caching
  allocator's reserve).
- CPU: peak resident set size growth of this process: the kernel's high-water mark (VmHWM) is reset by
  writing 5 to /proc/self/clear_refs at the start, then peak = VmHWM at the end - VmRSS at the start. Where
  that file cannot be written, a 5 ms sampling thread reads VmRSS instead (can miss short spikes; the method
  is recorded either way).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    value = _status_kb("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager: peak memory used by the code inside it, beyond what was in use when it started.

    `with PeakMemory(device) as pm: ...` then `pm.peak_bytes` and `pm.method`.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda-max-allocated"
            return self
        import gc

        gc.collect()
        self._start = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "rss-growth (VmHWM)"
        except OSError:
            self.method = "rss-growth (sampled 5 ms)"
            self._max = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, rss_bytes())
        else:
            peak = _status_kb("VmHWM") or rss_bytes()
        self.peak_bytes = max(0, peak - self._start)


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
