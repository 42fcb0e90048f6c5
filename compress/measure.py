"""Runtime memory: control what a CPU process keeps resident, and measure a stage's peak the way the planner predicts it.

The planner (compress/planner.py, with the terms of compress/memory.py) predicts bytes; this module makes the
measured number mean the same thing:

    with PeakMemory(device, model) as m:          # growth over the resident input model
        model, stats = stage.run(model, ...)
    m.measured_bytes, m.method                    # -> manifest memory.measured_peak_bytes / memory.method

and keeps a CPU process's resident set close to its live tensors: `fixed_mmap_threshold` (large allocations
get their own mmap and go back to the OS when freed), `mmap_threshold` (tighter while a stage makes many small
allocations), `release_free_heap` (malloc_trim), `page_out_mapped` (hand back the pages of memory-mapped
weights a stage has replaced). Everything here is Linux/glibc-specific and does nothing elsewhere, except
PeakMemory on CPU, which needs /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import sys
from typing import Any

from compress.errors import CompressError

KiB, MiB = 2**10, 2**20
CAST_SLAB_BYTES = 64 * MiB  # onload.cast_paged casts a large tensor this much at a time (the planner counts one)

# RSS noise of one CPU measurement: lazily paged-in kernel code and oneDNN scratch on first use of an op,
# malloc arenas. Measured 4-12 MiB for a 190k-parameter model; compare predictions to measurements with
# this floor (see `compare`).
RSS_NOISE_BYTES = 16 * MiB




def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (macOS, musl): nothing to tune


def release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so RSS before a measurement is live memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MADV_PAGEOUT = 21  # Linux >= 5.4 (<linux/mman.h>); Python's mmap module does not export it before 3.12


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings, from /proc/self/maps ([] elsewhere)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                # address perms offset dev inode [path]: inode 0 is anonymous memory (heap, stacks, malloc's mmaps)
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    start, end = parts[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return spans


def page_out_mapped(tensors) -> int:
    """Ask the kernel to reclaim the resident pages of CPU tensors that are views of a memory-mapped file
    (madvise MADV_PAGEOUT); return the bytes advised (0 where this is not Linux or nothing was mapped).

    Why: transformers loads a safetensors checkpoint as views of one private mapping of the file, and the
    mapping lives as long as any of its tensors does. A stage that replaces the model part by part (GPTQ/RTN
    block by block) drops its references to the old weights, but their pages, once read, stay resident and
    counted in RSS until the whole file is unmapped, so RSS would grow by the whole input.
    MADV_PAGEOUT never changes what the memory holds: clean pages are dropped and read again from the file
    if anyone touches them; pages a write made private (copy-on-write) are kept (no swap here) or swapped.
    So calling this on a tensor that is still in use costs a re-read, never correctness. Only the page-aligned
    interior of each tensor is advised, so a neighbouring tensor's pages are never touched."""
    if sys.platform != "linux":
        return 0
    spans = _file_mappings()
    libc = _libc()
    if not spans or libc is None or not hasattr(libc, "madvise"):
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.numel() or not t.is_contiguous():
            continue  # a non-contiguous view's bytes are not one span of its own
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        start, end = -(-start // page) * page, end // page * page
        for lo, hi in spans:
            a, b = max(start, lo), min(end, hi)
            if b > a:
                if madvise(a, b - a, MADV_PAGEOUT) != 0:
                    return advised  # EINVAL: a kernel older than 5.4; nothing else to do
                advised += b - a
    return advised


MMAP_THRESHOLD_ENV = "COMPRESS_MMAP_THRESHOLD"
DEFAULT_MMAP_THRESHOLD = 4 * MiB     # a whole CPU run (compress.pipeline.run, compress eval)
TIGHT_MMAP_THRESHOLD = 128 * KiB     # while a stage quantizes linear by linear (int8, rtn) or runs int8 kernels
_threshold = {"bytes": 0}            # what fixed_mmap_threshold last set (0: glibc's dynamic default)


def fixed_mmap_threshold(nbytes: int | None = None) -> int:
    """Serve every CPU allocation of at least `nbytes` with its own mmap, returned to the OS when freed (glibc
    mallopt M_MMAP_THRESHOLD, which also stops glibc raising the threshold to 32 MiB as big blocks are freed).

    Why: by default glibc serves freed activations of up to 32 MiB from its heap afterwards, and a heap only
    shrinks from its top, so RSS keeps the transients that sat below live tensors: a stage's measured peak then
    says more about the allocator than about the stage. A run uses 4 MiB (most of the saving for little CPU
    time); stages made of many small allocations tighten it while they run (`mmap_threshold`). The measured
    effect on SmolLM2-135M is in bench/results/memory.md. The environment variable COMPRESS_MMAP_THRESHOLD
    (bytes) sets the run's value; 0 keeps glibc's own behaviour everywhere.
    Returns the threshold set, 0 when none was (turned off, or malloc is not glibc's)."""
    if nbytes is None:
        raw = os.environ.get(MMAP_THRESHOLD_ENV, "").strip()
        try:
            nbytes = int(raw) if raw else DEFAULT_MMAP_THRESHOLD
        except ValueError:
            raise CompressError(f"{MMAP_THRESHOLD_ENV} must be a number of bytes (0 = glibc's default), got {raw!r}") from None
    libc = _libc()
    if nbytes <= 0 or libc is None or not hasattr(libc, "mallopt"):
        return 0
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) and libc.mallopt(M_TRIM_THRESHOLD, int(nbytes))
    _threshold["bytes"] = int(nbytes) if ok else 0
    return _threshold["bytes"]


@contextlib.contextmanager
def mmap_threshold(nbytes: int = TIGHT_MMAP_THRESHOLD):
    """Within the block, a tighter mmap threshold (see fixed_mmap_threshold), then back to the run's. Does
    nothing where the run set none (COMPRESS_MMAP_THRESHOLD=0, not glibc, or outside a run: library use)."""
    before = _threshold["bytes"]
    if not before or nbytes >= before:
        yield
        return
    fixed_mmap_threshold(nbytes)
    try:
        yield
    finally:
        fixed_mmap_threshold(before)


def fault_in(model) -> None:
    """Touch every parameter and buffer so memory-mapped weights are resident (counted in RSS) before a
    measurement starts; otherwise the first stage that reads them shows the model itself as growth."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read per 4 KiB page


class PeakMemory:
    """Measure a block the way the planner predicts it:

        with PeakMemory(device, model) as m:
            model, stats = stage.run(model, ...)
        m.measured_bytes, m.method   # -> manifest memory.measured_peak_bytes / memory.method

    The input model's tensors are held (references, no copies) until the block ends, so a stage that
    replaces tensors in place (`.to()`, swapping linears for quantized ones) is measured on top of its
    resident input, whether the input was memory-mapped from safetensors or built in memory: the
    definition of StagePlan.growth_bytes.
    CPU ("rss-growth"): fault in the input model, collect garbage, give free heap back (malloc_trim), reset
    the peak RSS (VmHWM) and read RSS; after: VmHWM - RSS before. Compare with StagePlan.growth_bytes.
    CUDA ("cuda-max-allocated"): reset peak stats; after: torch.cuda.max_memory_allocated() (the input model
    on the GPU included). Compare with StagePlan.allocated_bytes."""

    def __init__(self, device: Any = "cpu", model=None, pin: bool = True, resident: bool = True):
        import torch

        self.device = torch.device(device)
        self.model = model
        self.pin = pin
        self.resident = resident  # False: an onloaded input stays memory-mapped; the pages it reads count as growth
        self.method = "cuda-max-allocated" if self.device.type == "cuda" else "rss-growth"
        self.before = self.peak = self.measured_bytes = None
        self._pinned: list = []

    def __enter__(self):
        import torch

        if self.model is not None and self.pin:
            self._pinned = list(self.model.state_dict().values())
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        if self.model is not None and self.resident:
            fault_in(self.model)
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            raise CompressError("cannot reset peak RSS (/proc/self/clear_refs): CPU memory is measured on Linux only") from None
        self.before = _read_status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.measured_bytes = self.peak
        else:
            self.peak = _read_status("VmHWM")
            self.measured_bytes = max(0, self.peak - self.before)
        self._pinned = []
        self.model = None  # the caller decides how long the model lives
        return False


def compare(predicted: int, measured: int, rel: float = 0.25, floor: int = RSS_NOISE_BYTES) -> tuple[float, bool]:
    """(relative error, ok): ok when |predicted - measured| <= max(rel * measured, floor). The floor is the
    measurement noise of a CPU process (see RSS_NOISE_BYTES); tiny models live entirely below it."""
    err = abs(predicted - measured)
    return (err / measured if measured else math.inf), err <= max(rel * measured, floor)
