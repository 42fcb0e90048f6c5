"""Who does what when `accelerate launch` (torchrun) started several processes; one process does it all.

Only the main process (rank 0) writes: checkpoints, manifests, pipeline.yaml, the report. Stages whose module
says DISTRIBUTED = True (the training stages) run on every process, each on its own shard of the batches (DDP
through accelerate; FSDP from accelerate's config); everything else runs on the main process while the others
follow its progress through marker files (see `Ranks`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from compress import manifest
from compress.errors import CompressError


def is_main_process() -> bool:
    """False in the processes other than rank 0 that `accelerate launch` / torchrun started."""
    return int(os.environ.get("RANK", "0")) == 0


class Ranks:
    """Who does what when `accelerate launch` (torchrun) started several processes; one process does it all.

    Only the main process (rank 0) writes: checkpoints, manifests, pipeline.yaml, the report. Stages that train
    (their module says DISTRIBUTED = True: prune, train, distill) run on every process, each process on its own
    shard of the batches (DDP through accelerate; FSDP from accelerate's config); every other stage, the saves,
    round-trip checks and evaluations run on the main process alone. The other processes follow through marker
    files the main one writes into <run>/.sync-<token>/: NN.start (whether stage NN runs) and NN.done (its
    folder, output hash, status); they poll them rather than wait in a collective, so a GPTQ or an evaluation
    that keeps the main process busy for hours hits no process-group timeout. When a process fails, torchrun
    ends the others; the main process also leaves a `failed` marker that stops the followers.
    """

    POLL_SECONDS = 0.5

    def __init__(self, out: Path, device: torch.device):
        self.n = int(os.environ.get("WORLD_SIZE", "1"))
        self.out, self.device, self.main, self.sync = out, device, True, None
        if self.n > 1:
            from accelerate import PartialState

            state = PartialState(cpu=device.type == "cpu")  # on CPU: a gloo group (see compress/train.py)
            self.main, self.device, self.state = state.is_main_process, state.device, state

    def begin(self) -> None:
        """Agree on this invocation's marker folder (one broadcast)."""
        if self.n == 1:
            return
        from accelerate.utils import broadcast_object_list

        token = [uuid.uuid4().hex[:12] if self.main else None]
        broadcast_object_list(token)
        self.sync = self.out / f".sync-{token[0]}"
        if self.main:
            self.sync.mkdir(parents=True, exist_ok=True)

    def started(self, index: int, runs: bool) -> None:
        self._write(f"{index:02d}.start", {"runs": runs})

    def done(self, index: int, folder: Path, output_hash: str, status: str) -> None:
        self._write(f"{index:02d}.done", {"folder": str(folder), "hash": output_hash, "status": status})

    def failed(self, error: BaseException) -> None:
        self._write("failed", {"error": f"{type(error).__name__}: {error}"})

    def wait(self, name: str) -> dict:
        path = self.sync / name
        while not path.is_file():
            if (self.sync / "failed").is_file():
                err = json.loads((self.sync / "failed").read_text())["error"]
                raise CompressError(f"the main process stopped ({err}); this process stops too")
            time.sleep(self.POLL_SECONDS)
        return json.loads(path.read_text())

    def end(self) -> None:
        if self.n == 1:
            return
        self.state.wait_for_everyone()  # every follower has read the last marker
        if self.main:
            shutil.rmtree(self.sync, ignore_errors=True)

    def _write(self, name: str, obj: dict) -> None:
        if self.n > 1 and self.main:
            manifest.write_text_atomic(self.sync / name, json.dumps(obj))
