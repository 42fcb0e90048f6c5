"""What a stage may ask of the pipeline while it runs: device, seed, data, scratch space, earlier models.

Stages get a `Context` and never touch files, YAML or manifests themselves (shared/DESIGN.md). Tests build
one with `Context.for_tests(tmp_path)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


@dataclass
class Context:
    device: torch.device                      # where stages compute (CUDA when present, else CPU)
    seed: int = 0                             # the pipeline's seed; stages seed their own generators from it
    data: dict = field(default_factory=dict)  # the pipeline's `data:` block, e.g. {"calibration": "zoo:austen", "train": [...]}
    work_dir: Path | None = None              # scratch folder of this stage (mid-stage checkpoints for resume)
    base_path: Path | None = None             # folder of 00-base, for stages that need the original model
    stage_paths: dict = field(default_factory=dict)  # stage name or index (str) -> finished output folder
    trust_remote_code: bool = False
    log: Callable[[str], None] = print        # one-line progress messages (the CLI routes them to stderr)
    quiet: bool = False                       # no progress bars (tests, CI)
    stats: dict = field(default_factory=dict) # extra numbers a stage wants in its manifest (also returned by run)
    out_dir: Path | None = None               # a stage that writes no checkpoint may write files of its own here (export)
    eval: Any = None                          # the pipeline's eval protocol (evaluate.EvalConfig), for stages that measure
    onload: bool = False                      # the input stays on the host; stages that can run it a block at a time on `device`

    def progress(self, iterable: Iterable, desc: str, total: int | None = None, unit: str = "it"):
        """A tqdm progress bar over `iterable` (silent when quiet)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)

    def resolve_model_ref(self, ref: str) -> Path:
        """Folder of an earlier output: 'base', a stage name, or a stage index."""
        from compress.errors import CompressError

        if ref == "base" and self.base_path is not None:
            return self.base_path
        if str(ref) in self.stage_paths:
            return self.stage_paths[str(ref)]
        raise CompressError(f"no finished stage named {ref!r}; known: {', '.join(['base', *self.stage_paths])}")

    def load_model(self, ref: str, on_host: bool = False) -> tuple[Any, Any]:
        """Load an earlier output (see resolve_model_ref) as (model, tokenizer) on this context's device, or left
        on the host (memory-mapped) for running it a block at a time."""
        from compress import checkpoint

        return checkpoint.load(self.resolve_model_ref(ref), device="cpu" if on_host else self.device)

    @classmethod
    def for_tests(cls, tmp_path: Path, **kw) -> "Context":
        work = Path(tmp_path) / "work"
        work.mkdir(parents=True, exist_ok=True)
        return cls(device=torch.device("cpu"), work_dir=work, quiet=True, log=lambda m: None, **kw)
