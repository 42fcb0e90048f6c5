"""Who does what when `accelerate launch` (torchrun) started several processes; one process does it all.

Only the main process (rank 0) writes: checkpoints, manifests, pipeline.yaml, the report. Stages whose module
says DISTRIBUTED = True (the training stages) run on every process, each on its own shard of the batches (DDP
through accelerate; FSDP from accelerate's config); everything else runs on the main process while the others
follow its progress through marker files (see `Ranks`).

The helpers at the end serve compress/train.py under FSDP2: an Accelerator that is FSDP also on CPU (accelerate
1.16 falls back to DDP there), and the Snapshot that gives the trained weights back to the caller's plain model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from compress import manifest
from compress.errors import CompressError


def fsdp_processes() -> int:
    """How many processes the training stages are sharded over: WORLD_SIZE under an FSDP launch config, else 1."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


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


# -- accelerate and FSDP (compress/train.py's fit)


def accelerator(cpu: bool):
    """This process's Accelerator (create the PartialState first: compress.train.process_state); under an FSDP
    launch config on a machine without CUDA, an FSDP2 one on gloo.

    accelerate 1.16 turns FSDP on only for accelerator devices: on CPU it silently trains with DDP instead. torch's
    FSDP2 (`fully_shard`) does run on CPU with gloo (FSDP1 refuses: "FSDP needs a non-CPU accelerator device"),
    so compress sets accelerate's state to FSDP with the plugin that accelerate reads from the launch config,
    and the CPU run takes the same code path (accelerate's fsdp2_prepare_model) as a GPU run.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=cpu)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and acc.distributed_type == DistributedType.MULTI_CPU:
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise CompressError("FSDP on CPU needs FSDP2: set `fsdp_version: 2` in the accelerate config "
                                "(FSDP1 runs on accelerator devices only)")
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise CompressError("compress trains with DDP or FSDP2; DeepSpeed launch configs are not supported")
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise CompressError("compress trains under FSDP2 only: set `fsdp_version: 2` in the accelerate config "
                            "(FSDP1 flattens parameters, which the optimizer groups and checkpoints here cannot use)")
    return acc


def is_fsdp(accelerator) -> bool:
    """Whether the training is sharded (FSDP), not replicated (DDP) or single."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True while FSDP holds `model`'s parameters as shards (inside fit): a forward is then a collective."""
    return any(is_dtensor(p) for p in model.parameters())


def canonical_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """named_parameters() with the names of the unwrapped model (activation checkpointing inserts a wrapper)."""
    return [(n.replace("._checkpoint_wrapped_module", ""), p) for n, p in model.named_parameters()]


def full_parameters(wrapped) -> dict[str, torch.Tensor]:
    """Every parameter of an FSDP2 model as a whole tensor on this process's device (all processes must call it:
    one all-gather per sharded tensor, in the same order everywhere)."""
    with torch.no_grad():
        return {n: (p.full_tensor() if is_dtensor(p) else p).detach() for n, p in canonical_parameters(wrapped)}


class Snapshot:
    """A model's modules as they were before FSDP2 rewrote them in place, to put them back after training.

    fully_shard swaps each wrapped module's class, registers hooks and replaces parameters by DTensor shards;
    accelerate may insert checkpoint wrappers and patch `forward`. The snapshot keeps every module's class and a
    copy of its attribute containers (parameters, buffers, children, hooks), so `restore` gives back exactly the
    modules, hooks (e.g. prune's mask hooks) and Parameter objects the caller had, holding the trained values.
    """

    def __init__(self, model: torch.nn.Module):
        self.modules = [(m, type(m), {k: _shallow(v) for k, v in vars(m).items()}) for m in model.modules()]
        self.params = {n: (p, p.dtype) for n, p in model.named_parameters()}

    def release_weights(self) -> None:
        """Free the full tensors FSDP has copied into shards (else every process keeps a whole model)."""
        for p, _ in self.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore(self, full: dict[str, torch.Tensor]) -> None:
        """Put the modules back and give each original Parameter its trained value, in its original dtype."""
        from torch.distributed import _composable_state

        if set(full) != set(self.params):
            raise CompressError(f"FSDP changed the model's parameter names: {sorted(set(full) ^ set(self.params))[:4]}")
        for m, cls, attrs in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m.__class__ = cls
            registry = getattr(_composable_state, "_module_state_mapping", None)
            if registry is not None:  # torch's record that `m` is sharded: drop it so `m` can be sharded again
                registry.pop(m, None)
        with torch.no_grad():
            for n, (p, dtype) in self.params.items():
                p.data = full[n].to(dtype)


def _shallow(v):
    return copy.copy(v) if isinstance(v, (dict, list, set)) else v


def as_shards(opt_state: dict, optimizer) -> dict:
    """An optimizer state dict read from one process's file, its per-parameter tensors made DTensor shards again
    (laid out like their parameter), so AdamW's update mixes DTensors only."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in opt_state["state"].items():
        p = params[int(i)]
        if not is_dtensor(p):
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.to_local().shape and v.ndim > 0:
                st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
    return opt_state
